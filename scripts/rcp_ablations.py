"""RCP results and ablations on the embedded default (needs the trained base of `make demo`).

    python scripts/rcp_ablations.py [--run-dir runs/demo] [--ratio 0.889]

Trains RCP at the given layer-averaged ratio once per variant (full method; without the repair loss; without the
adapter; without the learned score, i.e. the LLM's own attention + bias; mean-only repair statistics; the last,
noise-free 20 % of training on the inference token budget instead of the threshold), evaluates each at that ratio on
the test split, reads each run's last validation accuracy (what may choose between variants; the test split only
reports), and writes `rcp_ablations.csv` / `.md` in the run directory, with `rcp_ablations.json` (the base's weight
digest, which `scripts/report.py` checks the table against). Reuses variants whose result exists.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cli import cli_main  # noqa: E402
from lvlm_prune.archives import weights_digest  # noqa: E402

PLUGIN = "--model.init_args.compensation.init_args."
VARIANTS = {
    "rcp (full method)": [],
    "without repair loss": [f"{PLUGIN}use_repair_loss", "false"],
    "without adapter": [f"{PLUGIN}use_adapter", "false"],
    "without learned score (LLM attention + bias)": [f"{PLUGIN}use_learned_score", "false"],
    "mean-only repair statistics": [f"{PLUGIN}variance_weight", "0.0"],
    "noise-free phase on the inference budget": [f"{PLUGIN}noise_free_keep", "budget"],
}


def last_validation_accuracy(log_dir: Path) -> float | None:
    """The last `val/acc` a training run logged to TensorBoard (None when it logged none)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "val/acc" not in events.Tags()["scalars"]:
        return None
    return events.Scalars("val/acc")[-1].value


@functools.lru_cache(maxsize=None)
def base_fingerprints(base: str) -> tuple[str, ...]:
    """The fingerprints of the base at `base` (loaded once for all variants)."""
    from lightning_modules.compensation import fingerprints
    from lvlm_prune.modeling.loading import load_base_model

    return fingerprints(load_base_model(base))


def same_base(variant_dir: Path, base: str) -> bool | None:
    """Whether the variant was trained on the base at `base`, by the fingerprint its plug-in export records (a copied
    or moved run directory records another path for the same base, a base retrained in place the same path for
    another); None when there is no export to tell."""
    record = variant_dir / "plugin.safetensors.json"
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text()).get("base_fingerprint")
    return recorded is not None and recorded in base_fingerprints(base)


def expected_settings(ratio: float, extra: list[str]) -> dict:
    """The plug-in settings this variant trains with: RCPCompensation's defaults, `configs/synthetic/rcp.yaml`'s
    settings, the ratio and the variant's override (values the YAML interpolates are left out: the saved config
    holds them resolved)."""
    import inspect

    import yaml

    from lvlm_prune.rcp.compensation import RCPCompensation

    settings = {name: parameter.default for name, parameter in
                inspect.signature(RCPCompensation.__init__).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    config = yaml.safe_load((ROOT / "configs/synthetic/rcp.yaml").read_text())
    settings.update({key: value for key, value in config["model"]["init_args"]["compensation"]["init_args"].items()
                     if not (isinstance(value, str) and "${" in value)})
    settings = json.loads(json.dumps(settings))  # tuples as the saved YAML's lists
    settings["target_prune_ratio"] = ratio
    settings.update({key.removeprefix(PLUGIN): yaml.safe_load(value) for key, value in zip(extra[::2], extra[1::2])})
    return settings


def check_reusable(run: Path, base: str, ratio: float, extra: list[str]) -> None:
    """A variant's earlier run is reused only when its saved config has this variant's plug-in settings (those of
    `configs/synthetic/rcp.yaml` with its override, at this ratio) and it was trained on this base."""
    import yaml

    saved = yaml.safe_load((run / "config.yaml").read_text())
    model = saved["model"]["init_args"]
    settings = model["compensation"]["init_args"]
    differing = [f"{key}={settings.get(key)!r} (wanted {value!r})"
                 for key, value in expected_settings(ratio, extra).items() if settings.get(key) != value]
    trained_on_base = same_base(run.parent, base)
    if trained_on_base is False:
        differing.append("the base fingerprint recorded beside its plugin.safetensors (another base, or the base "
                         f"was retrained since; wanted that of {base!r})")
    elif trained_on_base is None and Path(model["base_model_path"]).resolve() != Path(base).resolve():
        differing.append(f"base_model_path={model['base_model_path']!r} (wanted {base!r}; no plug-in export records "
                         "its base's fingerprint)")
    if differing:
        raise ValueError(f"{run.parent} was trained with other settings: {', '.join(differing)}; remove it "
                         f"(rm -r {run.parent}) to train this variant again, or use another --run-dir")


def three_decimals(value: str) -> str:
    return f"{float(value):.3f}" if value else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--ratio", type=float, default=0.889)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    base = str(run_dir / "base_model")
    rows = []
    for index, (name, extra) in enumerate(VARIANTS.items()):
        tag = f"rcp_ablation_{index}"
        sweep_csv = run_dir / tag / "run" / "sweep.csv"
        if not sweep_csv.exists():
            cli_main([
                "fit", "--config", "configs/synthetic/rcp.yaml",
                "--model.init_args.base_model_path", base, "--data.init_args.processor_path", base,
                f"{PLUGIN}target_prune_ratio", str(args.ratio),
                "--trainer.logger.init_args.save_dir", str(run_dir), "--trainer.logger.init_args.name", tag,
                "--trainer.default_root_dir", str(run_dir / tag),
                "--model.init_args.plugin_export_path", str(run_dir / tag / "plugin.safetensors"),
                "--trainer.callbacks.init_args.methods", "[rcp]",
                "--trainer.callbacks.init_args.prune_ratios", f"[{args.ratio}]",
                *extra,
            ])
        else:
            check_reusable(run_dir / tag / "run", base, args.ratio, extra)
        matching = [r for r in csv.DictReader(sweep_csv.open())
                    if r["method"] == "rcp" and abs(float(r["prune_ratio"]) - args.ratio) < 1e-9]
        if not matching:
            raise ValueError(f"{sweep_csv} holds no rcp row at r = {args.ratio}")
        result = matching[0]
        validation = last_validation_accuracy(run_dir / tag / "run")
        rows.append({"variant": name, **result, "val_accuracy": "" if validation is None else f"{validation:.4f}"})
        print(f"{name:48s} acc={float(result['accuracy']):.3f} val={rows[-1]['val_accuracy']} "
              f"realised r={float(result['realised_prune_ratio']):.3f}")
    with open(run_dir / "rcp_ablations.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| variant | test accuracy | validation accuracy | realised r | visual tokens (layer avg) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {float(r['accuracy']):.3f} | {three_decimals(r['val_accuracy'])} | "
              f"{float(r['realised_prune_ratio']):.3f} | {float(r['avg_visual_tokens']):.1f} |" for r in rows]
    (run_dir / "rcp_ablations.md").write_text("\n".join(lines) + "\n")
    # what report.py checks the table against: the base of the run directory it reports
    (run_dir / "rcp_ablations.json").write_text(json.dumps({"base_weights_sha256": weights_digest(base)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
