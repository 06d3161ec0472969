"""scripts/report.py's prose says what its tables hold: the sweep section names every stage whose rows it shows, the
caption of the sweep table says that accm_oracle's total leaves out its KL passes (far more than the scoring costs
the caption bounds at 3.1 %), and the FLOPs plane describes the oracle's passes as `candidate_kl` runs them."""

import csv
import importlib.util
import io
import json
from pathlib import Path

import pytest

from callbacks.sweep import COLUMNS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("report_audit_target", ROOT / "scripts" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def row(method, ratio, accuracy=0.5):
    return {"method": method, "prune_ratio": ratio, "realised_prune_ratio": ratio, "avg_visual_tokens": 16 * (1 - ratio),
            "text_tokens": 15.0, "tflops": 1e-4, "tflops_llm": 1e-4, "tflops_llm_exact": 2e-4, "tflops_plugins": 0.0,
            "tflops_total": 2e-4 * (1 - ratio) + 1e-4, "latency_ms": 2.0, "accuracy": accuracy, "num_samples": 16,
            "status": "ok"}


def sweep_csv(rows) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in COLUMNS})
    return text.getvalue()


def write_run(tmp_path, accm_methods) -> Path:
    run = tmp_path / "demo"
    files = {
        "timings.json": json.dumps({"base": 600.0, "sweep": 60.0}),
        "base_eval.json": json.dumps({"all visual tokens": {"acc": 0.6}}),
        "sweep/run/sweep.csv": sweep_csv([row("full", 0.0, 0.6), row("random", 0.5, 0.4), row("fastv", 0.5, 0.55)]),
        "rcp_r0.889/run/sweep.csv": sweep_csv([row("rcp", 0.889, 0.45)]),
        "rcp_r0.778/run/sweep.csv": sweep_csv([row("rcp", 0.778, 0.47)]),
        "accm_r0.969/run/sweep.csv": sweep_csv([row(m, 0.969, 0.42) for m in accm_methods]),
    }
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return run


def report_text(tmp_path, accm_methods) -> str:
    run = write_run(tmp_path, accm_methods)
    out = tmp_path / "results.md"
    report.main(["--run-dir", str(run), "--out", str(out), "--benchmark", str(tmp_path / "no_benchmark.json"),
                 "--rcp-cost", str(tmp_path / "no_rcp_cost.json")])
    return out.read_text()


def sweep_caption(text: str) -> str:
    section = text.split("## Accuracy vs FLOPs")[1]
    return section.split("| method |")[0]


def test_the_sweep_section_names_the_stage_of_the_rcp_at_0778_rows(tmp_path):
    text = report_text(tmp_path, ["accm"])
    assert "| rcp@0.778 | 0.7780 |" in text
    assert "## Accuracy vs FLOPs (`make demo`, stages sweep, rcp, rcp_r0.778, accm)" in text


@pytest.mark.parametrize("with_oracle", [True, False])
def test_the_sweep_caption_says_the_oracle_total_leaves_out_its_kl_passes(tmp_path, with_oracle):
    text = report_text(tmp_path, ["accm", "accm_oracle"] if with_oracle else ["accm"])
    caption = sweep_caption(text)
    assert "up to about 3.1 % more" in caption
    assert ("`accm_oracle`'s total also leaves out its pick's KL passes" in caption) is with_oracle
    assert ("| accm_oracle | 0.9690 |" in text) is with_oracle


def test_the_flops_plane_describes_the_oracle_passes_as_they_run(tmp_path):
    plane = report_text(tmp_path, ["accm", "accm_oracle"]).split("## ACCM on the accuracy-vs-total-FLOPs plane")[1]
    # candidate_kl: one reference pass with all visual tokens; the candidates run on the kept tokens
    assert "it runs the base with all visual tokens (the reference) and on every candidate" in plane
    assert "every candidate with all visual tokens" not in plane
    assert "| accm_oracle |" not in plane


def test_the_flops_plane_does_not_say_the_random_pick_counts_a_selector(tmp_path):
    plane = report_text(tmp_path, ["accm", "accm_random"]).split("## ACCM on the accuracy-vs-total-FLOPs plane")[1]
    # ACCMCompensation.generate counts 'selector' FLOPs only for the selector's pick; accm_random is on the plane too
    assert "| accm_random | 0.9690 |" in plane
    assert "caption model, selector and caption tokens included" not in plane
    assert "the selector where it picks: the random pick runs none" in plane
