"""Pruning-ratio sweep: accuracy, realised visual tokens, FLOPs and latency for methods x ratios."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from lightning_modules.common import exact_match, score
from lvlm_prune.runner import per_sample_flops

log = logging.getLogger(__name__)

COLUMNS = ("method", "prune_ratio", "realised_prune_ratio", "avg_visual_tokens", "text_tokens", "tflops",
           "tflops_llm", "tflops_plugins", "tflops_total", "latency_ms", "accuracy", "num_samples", "status")


class PruningSweep(L.Callback):
    """Evaluates every (method, prune ratio) pair on a split and writes `sweep.csv`, `sweep.json` and
    `accuracy_vs_flops.png` into the run's log directory; logs `sweep/<method>/acc@r=<r>` scalars and the
    figure to TensorBoard.

    `tflops` is the LLM prefill per sample in the chosen convention (the papers' number); `tflops_total` adds
    the vision tower, projector and the method's own modules (caption model, selector, pruners: exact count).
    A (method, ratio) whose schedule cannot reach the ratio on this model is recorded with status
    'unreachable' and skipped.

    Args:
        methods: short names ('full', 'random', 'pool', 'fastv', 'pdrop', 'visionzip', 'dart', and the
            module's compensation plug-in, e.g. 'rcp' or 'accm').
        prune_ratios: layer-averaged ratios r; 'full' always runs once at r = 0.
        split: 'val' or 'test' dataloader of the datamodule.
        run_after_fit: sweep when `fit` ends (on the trained plug-ins).
        run_after_test: sweep when `test` ends.
        limit_batches: evaluate at most this many batches per pair (None: all).
        flops_convention: 'fastv' or 'exact' for the LLM prefill count.
        dirpath: output directory (default: the logger's log_dir).
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
    ):
        if split not in ("val", "test"):
            raise ValueError(f"sweep split={split!r}; choose 'val' or 'test'")
        for ratio in prune_ratios:
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"sweep prune ratio {ratio} must be in [0, 1)")
        self.methods = list(methods)
        self.prune_ratios = [float(r) for r in prune_ratios]
        self.split = split
        self.run_after_fit = run_after_fit
        self.run_after_test = run_after_test
        self.limit_batches = limit_batches
        self.flops_convention = flops_convention
        self.dirpath = dirpath
        self.rows: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """A misspelt method fails here, before any training, not as an 'unreachable' row hours later."""
        known = getattr(pl_module, "method_names", None)
        unknown = [m for m in self.methods if callable(known) and m not in known()]
        if unknown:
            raise ValueError(f"sweep methods {unknown} are unknown to {type(pl_module).__name__}; known: {known()}")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_after_fit and not trainer.sanity_checking:
            self.run(trainer, pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.run_after_test:
            self.run(trainer, pl_module)

    def pairs(self) -> list[tuple[str, float]]:
        pairs = [("full", 0.0)] if "full" in self.methods else []
        pairs += [(m, r) for m in self.methods if m != "full" for r in self.prune_ratios]
        return pairs

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict[str, Any]]:
        datamodule = trainer.datamodule
        loader = datamodule.val_dataloader() if self.split == "val" else datamodule.test_dataloader()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        was_training = pl_module.training
        pl_module.eval()
        self.rows = []
        for name, ratio in self.pairs():
            try:
                pl_module.make_method(name, ratio)
            except ValueError as error:
                log.warning("sweep: skipping %s at r=%s: %s", name, ratio, error)
                self.rows.append({"method": name, "prune_ratio": ratio, "status": f"unreachable: {error}"})
                continue
            self.rows.append(self._evaluate_pair(pl_module, loader, name, ratio, rank, world))
            if trainer.is_global_zero:
                row = self.rows[-1]
                print(f"sweep {name:>9s} r={ratio:<6} acc={row['accuracy']:.3f} visual={row['avg_visual_tokens']:.1f} "
                      f"TFLOPs={row['tflops']:.5f} latency={row['latency_ms']:.1f}ms", flush=True)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            self._write(trainer)
        return self.rows

    def _evaluate_pair(self, pl_module, loader, name: str, ratio: float, rank: int, world: int) -> dict[str, Any]:
        metric = exact_match(pl_module.categories).to(pl_module.device)
        sums = torch.zeros(8, dtype=torch.float64, device=pl_module.device)
        evaluated, spare = 0, None
        for index, batch in enumerate(loader):
            if self.limit_batches is not None and index >= self.limit_batches:
                break
            if index % world != rank:  # shard batches over ranks; the metric and sums are reduced below
                spare = batch if spare is None else spare
                continue
            evaluated += 1
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            predictions, result, seconds = pl_module.run_method(batch, name, ratio)
            score(metric, predictions, batch)
            flops = per_sample_flops(pl_module.base.config, result, self.flops_convention)
            n = len(predictions)
            counts = result.visual_tokens_per_layer.double()
            # each sample's own input count: LLaVA-NeXT images give different numbers of visual tokens
            inputs = (batch["prompt_input_ids"] == pl_module.engine.image_token_id).sum(1).double().to(counts.device)
            sums += torch.tensor([
                n, counts.mean(1).sum().item(), result.text_tokens.double().sum().item(),
                sum(f["llm_prefill"] for f in flops), sum(f["total"] - f["llm_prefill"] - f["vision"] - f["projector"] for f in flops),
                sum(f["total"] for f in flops), seconds * 1000.0, (counts.mean(1) / inputs).sum().item(),
            ], dtype=torch.float64, device=sums.device)
        if world > 1:
            # Every rank runs as many batches as the busiest one: under ZeRO-3 each module call gathers weights
            # collectively, so a rank with one batch fewer would leave the others waiting. The extra run (another
            # rank's batch) is discarded.
            rounds = math.ceil(sweep_batch_count(loader, self.limit_batches) / world)
            for _ in range(rounds - evaluated):
                pl_module.run_method(pl_module.transfer_batch_to_device(spare, pl_module.device, 0), name, ratio)
            dist.all_reduce(sums)
        values = {k: float(v) for k, v in metric.compute().items()}
        n = max(1.0, float(sums[0]))
        return {
            "method": name,
            "prune_ratio": ratio,
            "realised_prune_ratio": 1.0 - float(sums[7]) / n,
            "avg_visual_tokens": float(sums[1]) / n,
            "text_tokens": float(sums[2]) / n,
            "tflops": float(sums[3]) / n / 1e12,
            "tflops_llm": float(sums[3]) / n / 1e12,
            "tflops_plugins": float(sums[4]) / n / 1e12,
            "tflops_total": float(sums[5]) / n / 1e12,
            "latency_ms": float(sums[6]) / n,
            "accuracy": values["acc"],
            "num_samples": int(sums[0]),
            "status": "ok",
            "accuracy_by_category": {k.removeprefix("acc/"): v for k, v in values.items() if k != "acc"},
        }

    def _write(self, trainer: L.Trainer) -> None:
        directory = Path(self.dirpath or (trainer.logger.log_dir if trainer.logger else trainer.default_root_dir))
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "sweep.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k, "") for k in COLUMNS})
        (directory / "sweep.json").write_text(json.dumps({"flops_convention": self.flops_convention,
                                                           "split": self.split, "rows": self.rows}, indent=2))
        figure = accuracy_vs_flops_figure(self.rows, self.flops_convention)
        figure.savefig(directory / "accuracy_vs_flops.png", dpi=120, bbox_inches="tight")
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


def sweep_batch_count(loader, limit: int | None) -> int:
    """Batches the sweep takes from `loader` (all of them, or the first `limit`)."""
    return len(loader) if limit is None else min(len(loader), limit)


def accuracy_vs_flops_figure(rows: list[dict[str, Any]], convention: str):
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
    axis.set_xlabel("total GFLOPs per sample (LLM prefill [%s] + vision + plug-ins)" % convention)
    axis.set_ylabel("accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if ok and not math.isnan(sum(r["accuracy"] for r in ok)):
        axis.set_ylim(0, 1.02)
    return figure
