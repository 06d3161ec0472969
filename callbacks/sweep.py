"""Pruning-ratio sweep: accuracy, realised visual tokens, FLOPs and latency for methods x ratios."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.exceptions import MisconfigurationException

from callbacks.answer_writer import as_written, image_prompts, merged_answer_lines
from lightning_modules.common import exact_match, prediction_records, score
from lvlm_prune.archives import write_atomically
from lvlm_prune.flops import CONVENTIONS
from lvlm_prune.runner import per_sample_flops

log = logging.getLogger(__name__)

COLUMNS = ("method", "prune_ratio", "realised_prune_ratio", "avg_visual_tokens", "text_tokens", "tflops",
           "tflops_llm", "tflops_llm_exact", "tflops_plugins", "tflops_total", "latency_ms", "accuracy", "num_samples",
           "status")
# What a (method, ratio) pair adds up over its samples, in one float64 tensor so that one all_reduce sums it over
# ranks: samples, visual tokens (layer mean), text tokens, LLM prefill FLOPs in the sweep's convention, plug-in
# FLOPs, total FLOPs (exact), generation milliseconds, fraction of input visual tokens kept, LLM prefill FLOPs
# (exact), input visual tokens.
SUM_FIELDS = ("samples", "visual_tokens", "text_tokens", "llm_flops", "plugin_flops", "total_flops_exact",
              "latency_ms", "kept_fraction", "llm_flops_exact", "input_visual_tokens")


class FinishedRunNotSwept(RuntimeError):
    """Fit resumed from a checkpoint where training had ended: the sweep after fit did not run (see the message)."""


def _training_batches(trainer: L.Trainer) -> str:
    """The training batches per epoch, for an error message. With `limit_train_batches` 0 Lightning skips the training
    loop before it loads the data, and `num_training_batches` keeps its initial inf: the setting is named instead."""
    if getattr(trainer, "limit_train_batches", None) == 0:
        return "trainer.limit_train_batches=0"
    return f"{trainer.num_training_batches} training batches per epoch"


class PruningSweep(L.Callback):
    """Evaluates every (method, prune ratio) pair on a split and writes `sweep.csv`, `sweep.json` and
    `accuracy_vs_flops.png` into the run's log directory; logs `sweep/<method>/acc@r=<r>` scalars and the
    figure to TensorBoard.

    `tflops` is the LLM prefill per sample in the chosen convention (the papers' number); `tflops_llm_exact` the
    exact count of the same prefill; `tflops_total` is in one unit, exact: the LLM prefill, the vision tower,
    projector and the method's own modules (caption model, selector, pruners).
    A (method, ratio) whose schedule cannot reach the ratio on this model is recorded with status
    'unreachable' and skipped; one whose realised ratio lies more than `ratio_tolerance` from the requested one, or
    whose kept visual tokens miss the budget's count by more than `kept_tolerance` of it and one token, keeps its
    measurements but is also marked 'unreachable', so that it is not read as meeting the budget. A method
    that cannot run at any ratio (e.g. PyramidDrop stage ends outside the model's layers) is an error at setup.

    The split is checked when the stage that sweeps starts (before any training): a missing or empty split is an
    error. After each pair the finished rows are written to `sweep.partial.csv` / `sweep.partial.json`; only a
    complete sweep writes `sweep.csv` (whose presence scripts/demo.py takes for "done") and removes them. A pair
    that raises is recorded there as 'failed: ...' and the error is re-raised naming it. A rerun starts the sweep
    over: rows from an earlier process may come from other weights or settings.

    With `answers`, each pair's answers are also written as a LLaVA answer `.jsonl` (`<method>_r<ratio>.jsonl`, the
    records `test` writes, reference answers included where the split has them) for the benchmark's official scorer
    (`lvlm_prune.evaluation.score_answer_file`) and for paired comparisons (`scripts/compare_answers.py`). They go
    to `answers.partial/` as each pair ends; a complete sweep then replaces `answers/` with that folder, so
    `answers/` always holds one whole sweep's files, beside its `sweep.csv`.

    Args:
        methods: short names ('full', 'random', 'pool', 'fastv', 'pdrop', 'visionzip', 'dart', and the
            module's compensation plug-in, e.g. 'rcp' or 'accm').
        prune_ratios: layer-averaged ratios r; 'full' always runs once at r = 0.
        split: 'val' or 'test' dataloader of the datamodule.
        run_after_fit: sweep when `fit` ends (on the trained plug-ins).
        run_after_test: sweep when `test` ends.
        limit_batches: evaluate at most this many batches per pair (None: on the test split the trainer's
            `limit_test_batches`, a count per rank or a fraction, so that it covers the samples Lightning's test
            loop takes (a count of N batches is N x world size batches of the unsharded split); on the validation
            split all of it, since `limit_val_batches` keeps the checks during training cheap, not the sweep).
        flops_convention: 'fastv' or 'exact' for the LLM prefill count.
        dirpath: output directory (default: the logger's log_dir).
        ratio_tolerance: largest accepted |realised - requested| prune ratio. 0.05 passes rounding to whole
            tokens and pooling grids down to 16 visual tokens (a 4 x 4 pool at r = 0.1 realises 0: no grid fits).
        kept_tolerance: largest accepted error in the visual tokens kept (layer-averaged), relative to the budget's
            count, beyond one whole token. At high r an absolute ratio tolerance is loose: 0.05 would pass 46 kept
            tokens of 576 for r = 0.969's 18; 0.25 passes 18 +- 5.5.
        answers: write each pair's answer file (above).
    """

    def __init__(
        self,
        methods: list[str] = ("full", "random", "pool", "fastv", "pdrop", "visionzip", "dart"),
        prune_ratios: list[float] = (0.5, 0.667, 0.778, 0.889, 0.9375),
        split: str = "test",
        run_after_fit: bool = True,
        run_after_test: bool = True,
        limit_batches: int | None = None,
        flops_convention: str = "fastv",
        dirpath: str | None = None,
        ratio_tolerance: float = 0.05,
        kept_tolerance: float = 0.25,
        answers: bool = False,
    ):
        if split not in ("val", "test"):
            raise ValueError(f"sweep split={split!r}; choose 'val' or 'test'")
        if not methods:
            raise ValueError("sweep methods=[] (PruningSweep init_args.methods) is empty: it would write a sweep.csv "
                             "without rows; list the methods to evaluate, e.g. [full, random, fastv]")
        pruned = [m for m in methods if m != "full"]
        if pruned and not prune_ratios:
            raise ValueError(f"sweep prune_ratios=[] (PruningSweep init_args.prune_ratios) is empty, so {pruned} "
                             "would not run ('full' alone runs at r = 0); list the ratios, e.g. [0.5, 0.75]")
        if flops_convention not in CONVENTIONS:
            raise ValueError(f"sweep flops_convention={flops_convention!r} (PruningSweep init_args.flops_convention); "
                             f"choose one of {list(CONVENTIONS)}")
        for ratio in prune_ratios:
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"sweep prune ratio {ratio} must be in [0, 1)")
        if limit_batches is not None and limit_batches < 1:
            raise ValueError(f"sweep limit_batches={limit_batches} must be at least 1 (None: all batches)")
        if not 0.0 <= ratio_tolerance < 1.0:
            raise ValueError(f"sweep ratio_tolerance={ratio_tolerance} must be in [0, 1)")
        if not kept_tolerance >= 0.0:
            raise ValueError(f"sweep kept_tolerance={kept_tolerance} must be >= 0")
        self.methods = list(methods)
        self.prune_ratios = [float(r) for r in prune_ratios]
        self.split = split
        self.run_after_fit = run_after_fit
        self.run_after_test = run_after_test
        self.limit_batches = limit_batches
        self.batch_limit: int | None = limit_batches  # in effect for the current run (`_loader`)
        self.flops_convention = flops_convention
        self.dirpath = dirpath
        self.ratio_tolerance = ratio_tolerance
        self.kept_tolerance = kept_tolerance
        self.answers = answers
        self.rows: list[dict[str, Any]] = []
        self._pair_records: list[dict[str, Any]] = []  # this rank's answer records of the running pair
        self._answers_to: Path | None = None  # where rank 0 writes them (None: answers off, or another rank)
        self._image_prompts = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A misspelt method or a split without data fails here, before any training, not hours later."""
        known = getattr(pl_module, "method_names", None)
        unknown = [m for m in self.methods if callable(known) and m not in known()]
        if unknown:
            raise ValueError(f"sweep methods {unknown} are unknown to {type(pl_module).__name__}; known: {known()}")
        self._check_methods_run(pl_module)
        if (stage == "fit" and self.run_after_fit) or (stage == "test" and self.run_after_test):
            self._loader(trainer)

    def _check_methods_run(self, pl_module: L.LightningModule) -> None:
        """Every schedule reaches r = 0, so a method that cannot be built at r = 0 has a configuration error (layers
        outside the model, a model family it refuses), which would otherwise be filed as an 'unreachable' row at
        every ratio, after the fit. A ratio too high for the model's depth stays an 'unreachable' row."""
        make = getattr(pl_module, "make_method", None)
        if not callable(make):
            return
        options = getattr(pl_module, "method_options", None) or {}
        for name in dict.fromkeys(self.methods):
            try:
                make(name, 0.0)
            except ValueError as error:
                setting = f" (model.method_options.{name}={options[name]})" if name in options else ""
                raise ValueError(f"sweep method {name!r} (PruningSweep init_args.methods) cannot run on this model at "
                                 f"any prune ratio: {error}{setting}") from error

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swept_after_fit = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_end, not on_fit_end: Lightning tears the strategy down (module to CPU) before on_fit_end
        if not self.run_after_fit or trainer.sanity_checking:
            return
        self._swept_after_fit = True
        self._check_trained(trainer)
        export = getattr(pl_module, "export_plugin", None)  # the module's own on_train_end comes after this hook:
        if callable(export):  # write the trained plug-in first, so a sweep that fails loses nothing of the training
            export()
        self.run(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # with no training batch at all Lightning skips the training loop, and on_train_end with it
        if not self.run_after_fit:
            return
        self._check_trained(trainer)
        if getattr(self, "_swept_after_fit", True):
            return
        if not trainer.fit_loop.done:
            raise ValueError(
                f"the sweep after fit did not run: fit resumed at step {trainer.global_step} but ran no training "
                f"batch ({_training_batches(trainer)}), so Lightning skipped the "
                "training loop, at whose end the sweep runs. Check trainer.limit_train_batches and that the training "
                "set holds at least one batch; to sweep the checkpoint's plug-ins, run `test` with "
                "--trainer.callbacks.init_args.run_after_test true")
        # resumed where training had ended: Lightning skipped the training loop. The module is past its
        # strategy's teardown, so the sweep cannot run here; the export can (the module's on_fit_end).
        export = getattr(pl_module, "export_after_finished_resume", None)
        if callable(export):
            export()
        checkpoint = trainer.ckpt_path or "<that checkpoint>"
        raise FinishedRunNotSwept(
            f"the sweep after fit did not run: fit resumed from a checkpoint at step {trainer.global_step}, "
            "where training had already ended, so Lightning ran no training loop (the sweep runs at its end). "
            "Sweep the checkpoint's plug-ins with test: python cli.py test --config <this run's config> "
            f"--ckpt_path {checkpoint} --trainer.callbacks.init_args.run_after_test true")

    def _check_trained(self, trainer: L.Trainer) -> None:
        if trainer.global_step == 0:
            raise ValueError(
                f"the sweep after fit did not run: fit ran 0 training steps (trainer.global_step == 0, "
                f"{_training_batches(trainer)}), so it would evaluate untrained "
                "plug-ins. Check that the training set holds at least one batch (data.batch_size per process; "
                "the last incomplete batch is dropped), trainer.max_steps and trainer.limit_train_batches; to "
                "sweep saved plug-ins, run `test` with model.plugin_weights_path instead")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_after_test:
            self.run(trainer, pl_module)

    def pairs(self) -> list[tuple[str, float]]:
        pairs = [("full", 0.0)] if "full" in self.methods else []
        pairs += [(m, r) for m in self.methods if m != "full" for r in self.prune_ratios]
        return pairs

    def _loader(self, trainer: L.Trainer):
        """The split's dataloader; an error naming the sweep's split and the data settings when it has no data."""
        setting = f"the sweep's split={self.split!r} (PruningSweep init_args.split)"
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(f"{setting} reads the datamodule's {self.split} split, and this run has no datamodule")
        other = "test" if self.split == "val" else "val"
        related = [f"data.{key}" for key in getattr(datamodule, "hparams", {}) if self.split in key.split("_")]
        fix = (f"give the {self.split} split data ({', '.join(related) or f'{type(datamodule).__name__} settings'}) "
               f"or set the sweep's split to {other!r}")
        try:
            loader = datamodule.val_dataloader() if self.split == "val" else datamodule.test_dataloader()
        except (ValueError, MisconfigurationException) as error:
            raise ValueError(f"{setting}: {type(datamodule).__name__} has no {self.split} data ({error}); {fix}") from error
        self.batch_limit = self._batch_limit(trainer, loader)
        try:
            empty = sweep_batch_count(loader, self.batch_limit) == 0
        except TypeError:  # an iterable loader without a length: found out when evaluated
            empty = False
        if empty:
            raise ValueError(f"{setting}: the {self.split} split of {type(datamodule).__name__} is empty; {fix}")
        return loader

    def _batch_limit(self, trainer: L.Trainer, loader) -> int | None:
        if self.limit_batches is not None:
            return self.limit_batches
        if self.split != "test":
            return None
        limit = getattr(trainer, "limit_test_batches", None)
        if not limit or isinstance(limit, bool):  # 0 turns Lightning's loop off, not the sweep
            return None
        if isinstance(limit, int):  # Lightning's is per rank; the sweep's counts batches of the unsharded loader
            return limit * max(1, int(getattr(trainer, "world_size", 1)))
        if limit >= 1.0:  # the whole split
            return None
        try:
            return max(1, int(len(loader) * limit))
        except TypeError:  # a loader without a length: a fraction of it is unknown
            return None

    def directory(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir))

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        loader = self._loader(trainer)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        was_training = pl_module.training
        pl_module.eval()
        self.rows = []
        self._answers_to = None
        if self.answers and trainer.is_global_zero:
            self._answers_to = self.directory(trainer) / "answers.partial"
            shutil.rmtree(self._answers_to, ignore_errors=True)  # an earlier, unfinished sweep's
            self._answers_to.mkdir(parents=True)
        self._image_prompts = image_prompts(trainer)
        # the precision's autocast, as for validation and test (the sweep runs outside their loops)
        precision = getattr(trainer, "precision_plugin", None)
        with precision.forward_context() if precision is not None else contextlib.nullcontext():
            self._run_pairs(trainer, pl_module, loader, rank, world, was_training)
        if trainer.is_global_zero:
            self._write(trainer)
            for suffix in ("csv", "json"):
                (self.directory(trainer) / f"sweep.partial.{suffix}").unlink(missing_ok=True)
            if self._answers_to is not None:
                final = self._answers_to.with_name("answers")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(self._answers_to, final)
        return self.rows

    def _run_pairs(self, trainer, pl_module, loader, rank: int, world: int, was_training: bool) -> None:
        name, ratio = "full", 0.0
        warmed: set[str] = set()
        try:
            for name, ratio in self.pairs():
                try:
                    pl_module.make_method(name, ratio)
                except ValueError as error:
                    log.warning("sweep: skipping %s at r=%s: %s", name, ratio, error)
                    self.rows.append({"method": name, "prune_ratio": ratio, "status": f"unreachable: {error}"})
                else:
                    self.rows.append(self._evaluate_pair(pl_module, loader, name, ratio, rank, world,
                                                         warm_up=name not in warmed))
                    warmed.add(name)
                    if trainer.is_global_zero:
                        row = self.rows[-1]
                        print(f"sweep {name:>9s} r={ratio:<6} acc={row['accuracy']:.3f} "
                              f"visual={row['avg_visual_tokens']:.1f} TFLOPs={row['tflops']:.5f} "
                              f"latency={row['latency_ms']:.1f}ms" + ("" if row["status"] == "ok" else
                                                                      f" [{row['status']}]"), flush=True)
                if trainer.is_global_zero:
                    self._write_partial(trainer)
        except Exception as error:
            finished = len(self.rows)
            context = (f"sweep stopped at {name} r={ratio}: the {finished} finished pair(s) are in "
                       f"{self.directory(trainer) / 'sweep.partial.csv'}; a rerun starts the sweep over")
            if trainer.is_global_zero:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
                self.rows.append({"method": name, "prune_ratio": ratio,
                                  "status": f"failed: {type(error).__name__}: {reason}"})
                self._write_partial(trainer)
            named = with_context(error, context)
            if named is error:
                raise
            raise named from error
        finally:
            pl_module.train(was_training)

    @staticmethod
    def _warm_up(pl_module, loader, name: str, ratio: float) -> None:
        """One untimed batch before a method's first timed pair, on every rank (ZeRO-3 gathers in step): otherwise
        that pair alone pays the method's one-time costs (CUDA kernel selection, the allocator's growth, the
        plug-ins' cached FLOPs counts, which run their modules under a FLOP counter). Every method's randomness
        is keyed by image or question, so the extra batch changes no answer."""
        batch = next(iter(loader), None)
        if batch is not None:
            pl_module.run_method(pl_module.transfer_batch_to_device(batch, pl_module.device, 0), name, ratio)

    def _evaluate_pair(self, pl_module, loader, name: str, ratio: float, rank: int, world: int,
                       warm_up: bool = False) -> dict[str, Any]:
        metric = exact_match(pl_module.categories).to(pl_module.device)
        sums = torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=pl_module.device)
        self._pair_records = []
        try:
            if warm_up:  # inside the try: a rank that fails here must tell the others too
                self._warm_up(pl_module, loader, name, ratio)
            evaluated, spare = self._evaluate_batches(pl_module, loader, name, ratio, rank, world, metric, sums)
            if world > 1:
                # Every rank runs as many batches as the busiest one: under ZeRO-3 each module call gathers
                # weights collectively, so a rank with one batch fewer would leave the others waiting. The extra run
                # (another rank's batch) is discarded.
                rounds = math.ceil(sweep_batch_count(loader, self.batch_limit) / world)
                for _ in range(rounds - evaluated):
                    pl_module.run_method(pl_module.transfer_batch_to_device(spare, pl_module.device, 0), name, ratio)
        except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks know
            failure: Exception | None = error
        else:
            failure = None
        if world > 1:
            # a rank that fails must not leave the others waiting in the reductions below: all learn it first
            failed = torch.tensor([float(failure is not None)], device=sums.device)
            dist.all_reduce(failed)
            if failed.item() and failure is None:
                failure = RuntimeError(f"sweep: {name} at r={ratio} failed on another rank; its log names the error")
        if failure is not None:
            raise failure
        if world > 1:
            dist.all_reduce(sums)
        row = self._row(metric, sums, name, ratio)
        if self.answers:
            self._write_answers(name, ratio, world)
        return row

    def _write_answers(self, name: str, ratio: float, world: int) -> None:
        records = self._pair_records
        if world > 1:
            gathered: list[list[dict[str, Any]]] = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(gathered, records)
            records = [record for part in gathered for record in part]
        if self._answers_to is not None:
            lines = merged_answer_lines([as_written(record, self._image_prompts) for record in records])
            write_atomically(self._answers_to / f"{name}_r{ratio:g}.jsonl", "".join(lines))
        self._pair_records = []

    def _evaluate_batches(self, pl_module, loader, name: str, ratio: float, rank: int, world: int, metric,
                          sums: torch.Tensor) -> tuple[int, Any]:
        """This rank's share of the split: scores into `metric`, counts into `sums`; (batches run, a spare batch)."""
        evaluated, spare = 0, None
        for index, batch in enumerate(loader):
            if self.batch_limit is not None and index >= self.batch_limit:
                break
            if index % world != rank:  # shard batches over ranks; the metric and sums are reduced below
                spare = batch if spare is None else spare
                continue
            evaluated += 1
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            predictions, result, seconds = pl_module.run_method(batch, name, ratio)
            score(metric, predictions, batch)
            if self.answers:
                self._pair_records.extend(prediction_records(batch, predictions, f"{name}@r={ratio}"))
            flops = per_sample_flops(pl_module.base.config, result, self.flops_convention)
            # the total in one unit: the exact LLM count (2 FLOPs per multiply-add, as the vision tower's and the
            # plug-ins'); the FastV number counts a multiply-add once and is for comparing with the papers
            exact = flops if self.flops_convention == "exact" else per_sample_flops(pl_module.base.config, result, "exact")
            n = len(predictions)
            counts = result.visual_tokens_per_layer.double()
            # each sample's own input count: LLaVA-NeXT images give different numbers of visual tokens
            inputs = (batch["prompt_input_ids"] == pl_module.engine.image_token_id).sum(1).double().to(counts.device)
            batch_sums = {
                "samples": n,
                "visual_tokens": counts.mean(1).sum().item(),
                "text_tokens": result.text_tokens.double().sum().item(),
                "llm_flops": sum(f["llm_prefill"] for f in flops),
                "plugin_flops": sum(f["total"] - f["llm_prefill"] - f["vision"] - f["projector"] for f in flops),
                "total_flops_exact": sum(f["total"] for f in exact),
                "latency_ms": seconds * 1000.0,
                "kept_fraction": (counts.mean(1) / inputs).sum().item(),
                "llm_flops_exact": sum(f["llm_prefill"] for f in exact),
                "input_visual_tokens": inputs.sum().item(),
            }
            sums += torch.tensor([batch_sums[field] for field in SUM_FIELDS], dtype=torch.float64, device=sums.device)
        return evaluated, spare

    def _row(self, metric, sums: torch.Tensor, name: str, ratio: float) -> dict[str, Any]:
        total = dict(zip(SUM_FIELDS, sums.tolist()))
        if total["samples"] == 0:
            raise ValueError(f"sweep: {name} at r={ratio} evaluated 0 samples of the {self.split} split (PruningSweep "
                             f"init_args.split, batches limited to {self.batch_limit}); not recording it")
        values = {k: float(v) for k, v in metric.compute().items()}
        n = total["samples"]
        realised = 1.0 - total["kept_fraction"] / n
        status = "ok"
        inputs = total["input_visual_tokens"] / n  # visual tokens of an input image, on average
        kept, budget = (1.0 - realised) * inputs, (1.0 - ratio) * inputs
        if abs(realised - ratio) > self.ratio_tolerance:
            status = (f"unreachable: realised r={realised:.3f} is {abs(realised - ratio):.3f} from the requested {ratio} "
                      f"(ratio_tolerance {self.ratio_tolerance})")
        elif abs(kept - budget) > self.kept_tolerance * budget + 1.0:
            status = (f"unreachable: realised r={realised:.3f} keeps {kept:.1f} visual tokens where r={ratio} keeps "
                      f"{budget:.1f} (kept_tolerance {self.kept_tolerance}, plus one token)")
        return {
            "method": name,
            "prune_ratio": ratio,
            "realised_prune_ratio": realised,
            "avg_visual_tokens": total["visual_tokens"] / n,
            "text_tokens": total["text_tokens"] / n,
            "tflops": total["llm_flops"] / n / 1e12,
            "tflops_llm": total["llm_flops"] / n / 1e12,
            "tflops_llm_exact": total["llm_flops_exact"] / n / 1e12,
            "tflops_plugins": total["plugin_flops"] / n / 1e12,
            "tflops_total": total["total_flops_exact"] / n / 1e12,
            "latency_ms": total["latency_ms"] / n,
            "accuracy": values["acc"],
            "num_samples": int(n),
            "status": status,
            "accuracy_by_category": {k.removeprefix("acc/"): v for k, v in values.items() if k != "acc"},
        }

    def _write_rows(self, directory: Path, stem: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=COLUMNS)
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
        write_atomically(directory / f"{stem}.csv", table.getvalue())
        write_atomically(directory / f"{stem}.json", json.dumps(
            {"flops_convention": self.flops_convention, "split": self.split, "rows": self.rows}, indent=2))

    def _write_partial(self, trainer: L.Trainer) -> None:
        self._write_rows(self.directory(trainer), "sweep.partial")

    def _write(self, trainer: L.Trainer) -> None:
        directory = self.directory(trainer)
        self._write_rows(directory, "sweep")
        figure = accuracy_vs_flops_figure(self.rows)
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=120, bbox_inches="tight")
        write_atomically(directory / "accuracy_vs_flops.png", image.getvalue())
        experiment = getattr(trainer.logger, "experiment", None)
        step = trainer.global_step
        if experiment is not None and hasattr(experiment, "add_scalar"):
            for row in self.rows:
                if row.get("status") == "ok":
                    tag = f"sweep/{row['method']}"
                    experiment.add_scalar(f"{tag}/acc@r={row['prune_ratio']}", row["accuracy"], step)
                    experiment.add_scalar(f"{tag}/tflops@r={row['prune_ratio']}", row["tflops"], step)
            experiment.add_figure("sweep/accuracy_vs_flops", figure, step)
        import matplotlib.pyplot as plt

        plt.close(figure)


def with_context(error: Exception, context: str) -> Exception:
    """`error` rebuilt as the same type with `context` appended (its message, the out-of-memory advice included,
    stays first); `error` itself with `context` as a note when its type cannot be rebuilt from one message."""
    message = f"{error}\n{context}"
    try:
        named = type(error)(message)
    except Exception:
        named = None
    if named is not None and str(named) == message:
        return named
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(context)
    else:
        log.error("%s", context)
    return error


def sweep_batch_count(loader, limit: int | None) -> int:
    """Batches the sweep takes from `loader` (all of them, or the first `limit`)."""
    return len(loader) if limit is None else min(len(loader), limit)


def accuracy_vs_flops_figure(rows: list[dict[str, Any]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.2, 4.2))
    ok = [r for r in rows if r.get("status") == "ok"]
    full = [r for r in ok if r["method"] == "full"]
    colors = plt.get_cmap("tab20").colors
    for index, method in enumerate(dict.fromkeys(r["method"] for r in ok if r["method"] != "full")):
        points = sorted(((r["tflops_total"], r["accuracy"]) for r in ok if r["method"] == method))
        axis.plot([p[0] * 1e3 for p in points], [p[1] for p in points], marker="o", label=method,
                  color=colors[index % len(colors)])
    for row in full:
        axis.scatter([row["tflops_total"] * 1e3], [row["accuracy"]], marker="*", s=150, color="black", label="full", zorder=5)
    axis.set_xlabel("total GFLOPs per sample, exact (LLM prefill + vision tower + projector + plug-ins)")
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if ok and not math.isnan(sum(r["accuracy"] for r in ok)):
        axis.set_ylim(0, 1.02)
    return figure
