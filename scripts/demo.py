"""The main job on the embedded default: data -> base LVLM -> evaluation -> summary.

Every stage writes under one run directory and is skipped when its output exists, so re-running
continues where a previous run stopped (an interrupted base training resumes from its last.ckpt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import cli_main  # noqa: E402

BASE_CONFIG = "configs/synthetic/base.yaml"


def stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_cli(args: list[str]) -> dict[str, float]:
    cli = cli_main(args)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def export_data(run_dir: Path) -> Path:
    from datamodules.synthetic import SyntheticVQADataModule

    data_dir = run_dir / "data"
    if (data_dir / "test" / "questions.jsonl").exists():
        print(f"reusing {data_dir}")
        return data_dir
    data = SyntheticVQADataModule(num_test=1024)
    for split in ("test",):
        data.export_llava_format(split, data_dir / split)
    print(f"wrote the test split in LLaVA formats to {data_dir}")
    return data_dir


def train_base(run_dir: Path) -> float:
    export_dir = run_dir / "base_model"
    if (export_dir / "config.json").exists():
        print(f"reusing the trained base model in {export_dir}")
        return float("nan")
    last = run_dir / "base" / "run" / "checkpoints" / "last.ckpt"
    args = ["fit", "--config", BASE_CONFIG, *_run_dir_args(run_dir)]
    if last.exists():
        print(f"resuming base training from {last}")
        args += ["--ckpt_path", str(last)]
    start = time.perf_counter()
    run_cli(args)
    return time.perf_counter() - start


def _run_dir_args(run_dir: Path) -> list[str]:
    return [
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.default_root_dir", str(run_dir / "base"),
        "--model.init_args.export_dir", str(run_dir / "base_model"),
    ]


def evaluate_base(run_dir: Path) -> dict[str, dict[str, float]]:
    results_path = run_dir / "base_eval.json"
    if results_path.exists():
        print(f"reusing {results_path}")
        return json.loads(results_path.read_text())
    last = run_dir / "base" / "run" / "checkpoints" / "last.ckpt"
    settings = {
        "all visual tokens": [],
        "random 11% of visual tokens": ["--data.init_args.eval_hidden_visual_fraction", "0.889"],
        "description, no image": ["--data.init_args.eval_context", "relevant",
                                  "--data.init_args.eval_hidden_visual_fraction", "1.0"],
    }
    results = {}
    for name, extra in settings.items():
        print(f"-- test: {name}")
        metrics = run_cli(["test", "--config", BASE_CONFIG, *_run_dir_args(run_dir), "--ckpt_path", str(last),
                           "--trainer.logger.init_args.version", "test", *extra])
        results[name] = {k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}
    results_path.write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="runs/demo", help="where every output goes")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    stage("1/3 synthetic benchmark")
    export_data(run_dir)
    stage("2/3 base LVLM (tiny LLaVA, trained from scratch)")
    train_seconds = train_base(run_dir)
    stage("3/3 evaluation of the base")
    results = evaluate_base(run_dir)

    stage("summary")
    print(f"{'setting':32s} {'accuracy':>9s}")
    for name, metrics in results.items():
        print(f"{name:32s} {metrics.get('acc', float('nan')):9.3f}")
    if train_seconds == train_seconds:
        print(f"base training: {train_seconds / 60:.1f} min")
    print(f"total: {(time.perf_counter() - start) / 60:.1f} min; outputs in {run_dir}")


if __name__ == "__main__":
    main()
