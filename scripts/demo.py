"""The main job on the embedded default.

    data -> base LVLM (trained from scratch: 4 LLM layers on descriptions, then the full mix, then grown to 12) -> its
         evaluation -> training-free pruning sweep
         -> RCP (trained on the frozen base) -> ACCM (trained on the frozen base) -> summary

Every stage writes under one run directory and is skipped when its output exists, so re-running continues
where a previous run stopped (an interrupted training resumes from its last.ckpt). The outputs made from the base
(its evaluation, the sweep, the plug-ins) record which base they were made from, and one made from another base
(retrained since) is named instead of reused. `timings.json` holds each stage's time, written after each stage; a
stage that was interrupted and finished in a later invocation is listed in its "interrupted" entry and its time is
the sum over the attempts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from callbacks.sweep import FinishedRunNotSwept  # noqa: E402
from cli import cli_main  # noqa: E402
from lvlm_prune.archives import weights_digest, write_atomically  # noqa: E402

STAGES = ("data", "base_describe", "base_stage1", "base", "base_eval", "sweep", "rcp", "rcp_r0.778", "accm")


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_cli(args: list[str]) -> dict[str, float]:
    cli = cli_main(args)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def resume_args(run_dir: Path, name: str) -> list[str]:
    last = run_dir / name / "run" / "checkpoints" / "last.ckpt"
    if last.exists():
        print(f"resuming from {last}")
        return ["--ckpt_path", str(last)]
    return []


def logger_args(run_dir: Path, name: str, version: str = "run") -> list[str]:
    return ["--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", name,
            "--trainer.logger.init_args.version", version, "--trainer.default_root_dir", str(run_dir / name)]


def base_args(run_dir: Path) -> list[str]:
    path = str(run_dir / "base_model")
    return ["--model.init_args.base_model_path", path, "--data.init_args.processor_path", path]


class RunDirectoryProblem(RuntimeError):
    """What the run directory holds stops the run: it ends with this message, and nothing made so far is touched."""


class StaleOutput(RunDirectoryProblem):
    """An output of the run directory was made from another base model than the one there now."""


class DamagedRecord(RunDirectoryProblem):
    """One of the run directory's own records (stage times, which base made what) is not readable."""


def read_json(path: Path, default: Any, meaning: str) -> Any:
    """The JSON in `path` (`default` when there is none); a damaged file is named with what it holds and what
    removing it costs, since the run's outputs themselves are intact."""
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedRecord(f"{path} ({meaning}) is not readable JSON ({error}); remove it to go on") from None


def read_timings(path: Path) -> dict:
    """{"seconds": {stage: seconds}, "interrupted": [stages]}; also reads the flat {stage: seconds} of earlier runs."""
    data = read_json(path, None, "the stage times so far; without it they start again from zero")
    if data is None:
        return {"seconds": {}, "interrupted": []}
    if "seconds" not in data:
        return {"seconds": {k: v for k, v in data.items() if k != "total"}, "interrupted": []}
    return data


class Demo:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.timings: dict[str, float] = {}  # this invocation's stages that did work
        self.timings_path = run_dir / "timings.json"
        self.made_from_path = run_dir / "made_from_base.json"

    def timed(self, name: str, fn) -> None:
        """Runs a stage; records its time when it did work (a reused output costs nothing), and the time spent so far
        when it fails or is interrupted, so that the finishing attempt adds to it."""
        start = time.perf_counter()
        try:
            worked = fn()
        except RunDirectoryProblem:
            raise
        except BaseException:
            with contextlib.suppress(DamagedRecord):  # the stage's own error is the one to show
                self._record_time(name, time.perf_counter() - start, interrupted=True)
            raise
        if worked:
            self._record_time(name, time.perf_counter() - start, interrupted=False)

    def _record_time(self, name: str, seconds: float, interrupted: bool) -> None:
        timings = read_timings(self.timings_path)
        earlier = timings["seconds"].get(name, 0.0) if name in timings["interrupted"] else 0.0
        timings["seconds"][name] = earlier + seconds
        if interrupted and name not in timings["interrupted"]:
            timings["interrupted"].append(name)
        timings["total"] = sum(timings["seconds"].values())
        self.timings[name] = timings["seconds"][name]
        write_atomically(self.timings_path, json.dumps(timings, indent=2))

    def check_records(self) -> None:
        """Reads the run directory's records before any stage works, so a damaged one stops the run at once."""
        read_timings(self.timings_path)
        self._made_from()

    def base_digest(self) -> str:
        """sha256 of the base's weights: what the outputs made from it record."""
        return weights_digest(self.run_dir / "base_model")

    def _made_from(self) -> dict[str, str]:
        return read_json(self.made_from_path, {}, "which base each output was made from; without it the outputs "
                         "are reused unchecked")

    def _reuse(self, output: str, done: Path, made: Path) -> bool:
        """Whether the base-made `output` exists (`done`: its last file) and was made from the base there now; a
        `StaleOutput` naming what to remove (`made`) when it was made from another one."""
        if not done.exists():
            return False
        recorded = self._made_from().get(output)
        if recorded is not None and recorded != self.base_digest():
            raise StaleOutput(f"{made} was made from another base model than {self.run_dir / 'base_model'} (the base "
                              f"was retrained since): remove it (rm -r {made}) to make it again from this base, or use "
                              "a new run directory")
        print(f"reusing {done}")
        return True

    def _made(self, output: str) -> None:
        made = self._made_from()
        made[output] = self.base_digest()
        write_atomically(self.made_from_path, json.dumps(made, indent=2))

    def data(self) -> bool:
        from datamodules.synthetic import SyntheticVQADataModule

        target = self.run_dir / "data" / "test"
        if (target / "questions.jsonl").exists():
            print(f"reusing {target}")
            return False
        SyntheticVQADataModule(num_test=1024).export_llava_format("test", target)
        print(f"wrote the test split in LLaVA formats (questions.jsonl, instructions.json, images/) to {target}")
        return True

    def _reusable(self, *exports: str) -> bool:
        """A later stage's export makes the earlier stages unnecessary."""
        for done in exports:
            if (self.run_dir / done / "config.json").exists():
                print(f"reusing the trained base in {self.run_dir / done}")
                return True
        return False

    def base_describe(self) -> bool:
        if self._reusable("base_model", "base_stage1_model", "base_describe_model"):
            return False
        run_cli(["fit", "--config", "configs/synthetic/base_describe.yaml", *logger_args(self.run_dir, "base_describe"),
                 "--model.init_args.export_dir", str(self.run_dir / "base_describe_model"),
                 *resume_args(self.run_dir, "base_describe")])
        return True

    def base_stage1(self) -> bool:
        if self._reusable("base_model", "base_stage1_model"):
            return False
        run_cli(["fit", "--config", "configs/synthetic/base_stage1.yaml", *logger_args(self.run_dir, "base_stage1"),
                 "--model.init_args.init_from", str(self.run_dir / "base_describe_model"),
                 "--model.init_args.export_dir", str(self.run_dir / "base_stage1_model"),
                 *resume_args(self.run_dir, "base_stage1")])
        return True

    def base(self) -> bool:
        if (self.run_dir / "base_model" / "config.json").exists():
            print(f"reusing the trained base model in {self.run_dir / 'base_model'}")
            return False
        run_cli(["fit", "--config", "configs/synthetic/base.yaml", *logger_args(self.run_dir, "base"),
                 "--model.init_args.init_from", str(self.run_dir / "base_stage1_model"),
                 "--model.init_args.export_dir", str(self.run_dir / "base_model"), *resume_args(self.run_dir, "base")])
        return True

    def base_eval(self) -> bool:
        path = self.run_dir / "base_eval.json"
        if self._reuse("base_eval", path, path):
            return False
        settings = {
            "all visual tokens": [],
            "random 11% of visual tokens (before the LLM)": ["--data.init_args.eval_hidden_visual_fraction", "0.889"],
            "object tokens only (empty cells hidden)": ["--data.init_args.eval_visual_tokens", "objects"],
            "tokens of the objects that matter only (oracle pruner)": ["--data.init_args.eval_visual_tokens", "relevant"],
            "description of the objects that matter, no image": [
                "--data.init_args.eval_context", "relevant", "--data.init_args.eval_hidden_visual_fraction", "1.0"],
        }
        results = {}
        for name, extra in settings.items():
            print(f"-- test: {name}")
            metrics = run_cli(["test", "--config", "configs/synthetic/sweep.yaml", *base_args(self.run_dir),
                               *logger_args(self.run_dir, "base_eval", name.split()[0]),
                               "--trainer.callbacks", "[]", *extra])
            results[name] = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
        write_atomically(path, json.dumps(results, indent=2))
        self._made("base_eval")
        return True

    def sweep(self) -> bool:
        if self._reuse("sweep", self.run_dir / "sweep" / "run" / "sweep.csv", self.run_dir / "sweep"):
            return False
        run_cli(["test", "--config", "configs/synthetic/sweep.yaml", *base_args(self.run_dir),
                 *logger_args(self.run_dir, "sweep")])
        self._made("sweep")
        return True

    def _compensation(self, config: str, name: str, extra: tuple[str, ...] = ()) -> bool:
        if self._reuse(name, self.run_dir / name / "run" / "sweep.csv", self.run_dir / name):
            return False
        common = [*base_args(self.run_dir), *logger_args(self.run_dir, name),
                  "--model.init_args.plugin_export_path", str(self.run_dir / name / "plugin.safetensors"), *extra]
        resume = resume_args(self.run_dir, name)
        try:
            run_cli(["fit", "--config", config, *common, *resume])
        except FinishedRunNotSwept:  # interrupted after training, during the sweep: sweep the final checkpoint
            print(f"{name}: training had ended before the interruption; sweeping its final checkpoint")
            run_cli(["test", "--config", config, *common, *resume, "--trainer.callbacks.init_args.run_after_test",
                     "true"])
        self._made(name)
        return True

    def rcp(self) -> bool:
        return self._compensation("configs/synthetic/rcp.yaml", "rcp_r0.889")

    def rcp_r0778(self) -> bool:
        """A second RCP checkpoint, trained for r = 0.778 (the sweep also meets 0.778 with the 0.889 one)."""
        return self._compensation("configs/synthetic/rcp.yaml", "rcp_r0.778", (
            "--model.init_args.compensation.init_args.target_prune_ratio", "0.778",
            "--trainer.callbacks.init_args.methods", "[rcp]", "--trainer.callbacks.init_args.prune_ratios", "[0.778]"))

    def accm(self) -> bool:
        return self._compensation("configs/synthetic/accm.yaml", "accm_r0.969")

    def summary(self) -> None:
        banner("summary")
        base_eval = self.run_dir / "base_eval.json"
        if base_eval.exists():
            print(f"{'base LVLM, test split':52s} {'accuracy':>9s}")
            for name, metrics in json.loads(base_eval.read_text()).items():
                print(f"{name:52s} {metrics.get('acc', float('nan')):9.3f}")
        rows = []
        for name in ("sweep", "rcp_r0.889", "rcp_r0.778", "accm_r0.969"):
            path = self.run_dir / name / "run" / "sweep.csv"
            if path.exists():
                found = [r for r in csv.DictReader(path.open()) if r["status"] == "ok"]
                if name == "rcp_r0.778":  # a second checkpoint of the same method
                    found = [{**r, "method": "rcp@0.778"} for r in found]
                rows += found
        if rows:
            print(f"\n{'method':>16s} {'r':>7s} {'realised':>8s} {'visual':>7s} {'GFLOPs(LLM)':>11s} "
                  f"{'GFLOPs(total)':>13s} {'acc':>6s}")
            unique: dict[tuple[str, str], dict] = {}
            for r in rows:  # a pair two sweeps measured (full tokens, on the same base): the first one's row
                unique.setdefault((r["method"], r["prune_ratio"]), r)
            for r in unique.values():
                print(f"{r['method']:>16s} {float(r['prune_ratio']):7.4f} {float(r['realised_prune_ratio']):8.3f} "
                      f"{float(r['avg_visual_tokens']):7.1f} {float(r['tflops']) * 1e3:11.3f} "
                      f"{float(r['tflops_total']) * 1e3:13.3f} {float(r['accuracy']):6.3f}")
            from callbacks.sweep import accuracy_vs_flops_figure

            figure_rows = [{**r, "status": "ok", **{k: float(r[k]) for k in ("tflops_total", "accuracy")}}
                           for r in unique.values()]
            accuracy_vs_flops_figure(figure_rows).savefig(self.run_dir / "accuracy_vs_flops.png", dpi=120,
                                                                 bbox_inches="tight")
            print(f"\nall methods on one plot: {self.run_dir / 'accuracy_vs_flops.png'}")
        if self.timings:
            print("\nstage times (the stages that ran): "
                  + ", ".join(f"{k} {v / 60:.1f} min" for k, v in self.timings.items()))
        print(f"outputs in {self.run_dir} (TensorBoard: tensorboard --logdir {self.run_dir})")


def record_machine_speed(path: Path, stages: list[str]) -> None:
    """Appends this invocation's fp32 matmul GFLOP/s to `path`: stage times are only comparable at equal speed (a
    shared 2-core machine measured 130-210 GFLOP/s within minutes, and a base step twice as slow on another day)."""
    import torch

    from benchmarks.timing import matmul_gflops

    records = read_json(path, [], "the machine speed of each invocation; without it the earlier ones are lost")
    records.append({"stages": list(stages), "threads": torch.get_num_threads(),
                    "fp32_matmul_gflops": round(matmul_gflops(), 1), "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_atomically(path, json.dumps(records, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo", help="where every output goes")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run, in order")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    demo = Demo(run_dir)
    start = time.perf_counter()
    titles = {"data": "synthetic benchmark",
              "base_describe": "base LVLM, stage 0 (4 LLM layers from scratch, a description turn per image)",
              "base_stage1": "base LVLM, stage 1 (4 LLM layers, the full training mix)",
              "base": "base LVLM, stage 2 (grown to 12 LLM layers)",
              "base_eval": "evaluation of the base", "sweep": "training-free pruning sweep",
              "rcp": "RCP (frozen base, r = 0.889)", "rcp_r0.778": "RCP trained for r = 0.778",
              "accm": "ACCM (frozen base, r = 0.969)"}
    try:
        demo.check_records()
        record_machine_speed(run_dir / "machine.json", args.stages)
        for index, stage in enumerate(args.stages, 1):
            banner(f"{index}/{len(args.stages)} {titles[stage]}")
            demo.timed(stage, getattr(demo, stage.replace(".", "")))
    except RunDirectoryProblem as error:
        sys.exit(f"demo.py: {error}")
    demo.summary()
    total = time.perf_counter() - start
    print(f"total: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
