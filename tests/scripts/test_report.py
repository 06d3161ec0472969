"""scripts/report.py on a tiny run directory: it writes the report from complete inputs, and on a missing run
directory, missing main-job outputs or a damaged input it names the file and leaves the existing report as it was."""

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest

from callbacks.sweep import COLUMNS

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("report", ROOT / "scripts" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

OLD_REPORT = "# Measured results\n\nthe report of an earlier run\n"


def row(method, ratio, status="ok", realised=None, accuracy=0.5):
    if status.startswith("unreachable") and realised is None:  # never ran: only its name and status
        return {"method": method, "prune_ratio": ratio, "status": status}
    realised = ratio if realised is None else realised
    return {"method": method, "prune_ratio": ratio, "realised_prune_ratio": realised,
            "avg_visual_tokens": 16 * (1 - realised), "text_tokens": 15.0, "tflops": 1e-4, "tflops_llm": 1e-4,
            "tflops_llm_exact": 2e-4, "tflops_plugins": 0.0, "tflops_total": 2e-4 * (1 - ratio) + 1e-4, "latency_ms": 2.0,
            "accuracy": accuracy, "num_samples": 16, "status": status}


def sweep_csv(rows) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in COLUMNS})
    return text.getvalue()


@pytest.fixture
def run_dir(tmp_path):
    """What `make demo` leaves, on a tiny scale."""
    run = tmp_path / "demo"
    files = {
        "timings.json": json.dumps({"base": 600.0, "sweep": 60.0}),
        "base_eval.json": json.dumps({"all visual tokens": {"acc": 0.6, "acc/count": 0.5}}),
        "sweep/run/sweep.csv": sweep_csv([
            row("full", 0.0), row("random", 0.5, accuracy=0.4), row("pool", 0.5, accuracy=0.3),
            row("pool", 0.1, "unreachable: realised r=0.000 is 0.100 from the requested 0.1 (ratio_tolerance 0.05)",
                realised=0.0),
            row("fastv", 0.9, "unreachable: fastv: prune_ratio=0.9 cannot be reached")]),
        "rcp_r0.889/run/sweep.csv": sweep_csv([row("rcp", 0.889, accuracy=0.45)]),
        "rcp_r0.778/run/sweep.csv": sweep_csv([row("rcp", 0.778, accuracy=0.47)]),
        "accm_r0.969/run/sweep.csv": sweep_csv([row("accm", 0.969, accuracy=0.42)]),
        "sweep/run/config_test.yaml": "data:\n  init_args:\n    min_objects: 8\n    max_objects: 12\n",
        "base_model/config.json": json.dumps({"text_config": {"num_hidden_layers": 12}}),
    }
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return run


def run_report(run_dir, out):
    if not out.exists():
        out.write_text(OLD_REPORT)
    report.main(["--run-dir", str(run_dir), "--out", str(out), "--benchmark", str(out.parent / "no_benchmark.json"),
                 "--rcp-cost", str(out.parent / "no_rcp_cost.json")])


def refused(run_dir, out) -> str:
    """The report's error message; the earlier report must be untouched."""
    with pytest.raises(SystemExit) as error:
        run_report(run_dir, out)
    assert out.read_text() == OLD_REPORT
    assert not list(out.parent.glob(".*.tmp"))
    return str(error.value.code)


def test_complete_inputs_make_the_report(run_dir, tmp_path):
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    (run_dir / "accuracy_vs_flops.png").write_bytes(b"png")
    run_report(run_dir, out)
    text = out.read_text()
    assert "| random | 0.5000 | 0.500 |" in text and "| rcp@0.778 | 0.7780 |" in text and "| accm | 0.9690 |" in text
    # a pair whose realised ratio missed the requested one is listed, not tabulated as meeting the budget
    assert "| pool | 0.1000 |" not in text
    assert "- pool at r = 0.1 (realised r = 0.000)" in text and "- fastv at r = 0.9\n" in text
    assert "more than the sweep's ratio_tolerance from r" in text
    assert (out.parent / "accuracy_vs_flops.png").read_bytes() == b"png"


def test_a_missing_run_directory_is_refused(tmp_path):
    assert "--run-dir" in refused(tmp_path / "nowhere", tmp_path / "results.md")
    assert "nowhere: no such directory" in refused(tmp_path / "nowhere", tmp_path / "results.md")


def test_a_run_directory_without_the_main_outputs_is_refused(run_dir, tmp_path):
    for name in ("base_eval.json", "rcp_r0.778/run/sweep.csv"):
        (run_dir / name).unlink()
    message = refused(run_dir, tmp_path / "results.md")
    assert "lacks the main job's output(s) base_eval.json, rcp_r0.778/run/sweep.csv;" in message
    assert "timings.json" not in message
    assert message.endswith(f"nothing written: {tmp_path / 'results.md'} is unchanged")


@pytest.mark.parametrize("damage, expected", [
    (lambda text: text[:len(text) - 40], r"line 6 ends in the middle of a row"),
    (lambda text: text.rsplit(",", 3)[0] + "\n", r"line 6: fewer fields than the header's 14"),
    (lambda text: text.replace(",ok\n", ",ok,extra\n", 1), r"line 2: more fields than the header's 14"),
    (lambda text: text.replace(",ok\n", ",o\n", 1), r"line 2: unknown status 'o'"),
    (lambda text: text.replace("0.4,16,ok", "zero,16,ok"), r"line 3: accuracy='zero' is not a number"),
    (lambda text: "", r"not a sweep table, it has no column\(s\) prune_ratio"),
])
def test_a_damaged_sweep_table_is_named(run_dir, tmp_path, damage, expected):
    path = run_dir / "sweep" / "run" / "sweep.csv"
    path.write_text(damage(path.read_text()), newline="")
    assert re.search(rf"^report\.py: {re.escape(str(path))}: {expected}", refused(run_dir, tmp_path / "results.md"))


@pytest.mark.parametrize("name, text, expected", [
    ("base_eval.json", '{"all visual tokens": {"acc": 0.6', "not valid JSON (Expecting ',' delimiter at line 1"),
    ("base_eval.json", '{"all visual tokens": 0.6}', "unexpected content (TypeError"),
    ("timings.json", '{"base": "ten minutes"}', "unexpected content (TypeError"),
])
def test_a_damaged_json_input_is_named(run_dir, tmp_path, name, text, expected):
    (run_dir / name).write_text(text)
    assert f"report.py: {run_dir / name}: {expected}" in refused(run_dir, tmp_path / "results.md")


def test_a_damaged_optional_input_is_named(run_dir, tmp_path):
    out = tmp_path / "results.md"
    out.write_text(OLD_REPORT)
    (tmp_path / "no_rcp_cost.json").write_text(json.dumps({"threads": 2}))
    assert f"{tmp_path / 'no_rcp_cost.json'}: unexpected content (KeyError: 'batch')" in refused(run_dir, out)


def test_interrupted_stages_are_marked_and_a_missing_figure_is_not_shown(run_dir, tmp_path):
    (run_dir / "timings.json").write_text(json.dumps(
        {"seconds": {"base": 600.0, "sweep": 90.0}, "interrupted": ["sweep"], "total": 690.0}))
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    (out.parent / "accuracy_vs_flops.png").write_bytes(b"an earlier run's figure")
    run_report(run_dir, out)
    text = out.read_text()
    assert "| base | 10.0 |" in text and "| total | 11.5 |" in text
    assert "| sweep (interrupted, finished by a later invocation: the attempts' sum) | 1.5 |" in text
    assert "![accuracy vs FLOPs]" not in text and "accuracy_vs_flops.png is missing" in text


def test_the_question_count_and_flops_convention_come_from_the_sweep(run_dir, tmp_path):
    (run_dir / "sweep" / "run" / "sweep.json").write_text(json.dumps({"flops_convention": "exact", "rows": []}))
    out = tmp_path / "results.md"
    run_report(run_dir, out)
    text = out.read_text()
    assert "synthetic test split (16 questions, 8-12 objects per scene)" in text  # the fixture's num_samples
    assert "LLM prefill counted exactly (a multiply-add counts twice)" in text and "FastV convention" not in text


def plane_row(method, ratio, gflops, accuracy, status="ok"):
    return {"method": method, "prune_ratio": ratio, "tflops_total": gflops / 1e3, "accuracy": accuracy,
            "status": status}


def test_accm_is_compared_with_the_best_baseline_point_at_no_more_flops():
    baselines = [plane_row("full", 0.0, 1.0, 0.6),
                 # not monotone in FLOPs: its curve reads 0.41 at 0.19 GFLOPs, where 0.50 costs less
                 plane_row("fastv", 0.9, 0.10, 0.50), plane_row("fastv", 0.8, 0.20, 0.40),
                 plane_row("fastv", 0.6, 0.40, 0.55),
                 # measured, but its realised ratio missed the requested one: still a point on the FLOPs axis
                 plane_row("pdrop", 0.95, 0.05, 0.52, "unreachable: realised r=0.88 is 0.07 from the requested 0.95"),
                 {"method": "dart", "prune_ratio": 0.97, "status": "unreachable: cannot be reached"}]
    accm = [plane_row("accm", 0.969, 0.19, 0.45), plane_row("accm_oracle", 0.969, 0.19, 0.70),
            plane_row("accm_random", 0.9375, 1.2, 0.50)]
    lines = report.accm_on_flops_plane(report.measured(baselines), accm)[0].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"accm", "accm_random"}  # the oracle's KL passes are not in its FLOPs
    assert header[4:] == ["fastv at same FLOPs", "pdrop at same FLOPs", "best point at no more FLOPs",
                          "points over best"]
    assert rows["accm"]["fastv at same FLOPs"] == "0.410" and rows["accm"]["best point at no more FLOPs"] == "0.520"
    # pdrop's curve, (0.05, 0.52) to full (1.0, 0.6), reads 0.532 there: the margin is over it
    assert rows["accm"]["pdrop at same FLOPs"] == "0.532" and rows["accm"]["points over best"] == "-8.2"
    # beyond the full-token point no curve reads a value, but full tokens reach 0.6 for less
    assert rows["accm_random"]["fastv at same FLOPs"] == "-" and rows["accm_random"]["points over best"] == "-10.0"


def test_sweeps_in_different_flops_conventions_are_refused(run_dir, tmp_path):
    (run_dir / "sweep" / "run" / "sweep.json").write_text(json.dumps({"flops_convention": "fastv", "rows": []}))
    (run_dir / "accm_r0.969" / "run" / "sweep.json").write_text(json.dumps({"flops_convention": "exact", "rows": []}))
    message = refused(run_dir, tmp_path / "results.md")
    assert "count the LLM's FLOPs in different conventions" in message
    assert f"exact in {run_dir / 'accm_r0.969' / 'run' / 'sweep.json'}" in message


def test_accm_scored_on_other_questions_than_the_baselines_is_refused(run_dir, tmp_path):
    (run_dir / "accm_r0.969" / "run" / "sweep.csv").write_text(sweep_csv([{**row("accm", 0.969), "num_samples": 8}]))
    message = refused(run_dir, tmp_path / "results.md")
    assert "different numbers of questions (sweep/run/sweep.csv: [16], accm_r0.969/run/sweep.csv: [8])" in message


def test_the_ablation_table_is_marked_unless_it_was_made_from_this_runs_base(run_dir, tmp_path):
    from lvlm_prune.archives import weights_digest

    (run_dir / "base_model").mkdir(exist_ok=True)
    (run_dir / "base_model" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "rcp_ablations.md").write_text("| variant | test accuracy |\n|---|---|\n| rcp (full method) | 0.495 |\n")
    out = tmp_path / "results.md"
    section = "## RCP ablations (`python scripts/rcp_ablations.py`)\n\n"
    run_report(run_dir, out)
    assert section + "**Not checked against this run's base**" in out.read_text()
    (run_dir / "rcp_ablations.json").write_text(json.dumps({"base_weights_sha256": weights_digest(run_dir / "base_model")}))
    run_report(run_dir, out)
    assert section + "| variant | test accuracy |" in out.read_text()
    (run_dir / "base_model" / "model.safetensors").write_bytes(b"retrained")
    run_report(run_dir, out)
    assert section + "**Made from another base**" in out.read_text() and "| rcp (full method) | 0.495 |" in out.read_text()


def report_text(run_dir, tmp_path) -> str:
    out = tmp_path / "results.md"
    run_report(run_dir, out)
    return out.read_text()


def test_the_sweep_table_has_every_column_in_order_of_budget(run_dir, tmp_path):
    text = report_text(run_dir, tmp_path)
    # random at r = 0.5: 16 visual tokens halved, 15 text tokens, 1e-4 TFLOPs LLM, 2e-4 * 0.5 + 1e-4 in all
    assert "| random | 0.5000 | 0.500 | 8.0 | 15.0 | 0.100 | 0.200 | 2.0 | 0.400 |" in text
    assert "|---|---|---|---|---|---|---|---|---|\n| full | 0.0000 |" in text
    order = ["| full | 0.0000", "| pool | 0.5000", "| random | 0.5000", "| rcp@0.778 |", "| rcp | 0.8890 |",
             "| accm | 0.9690 |"]
    assert [text.index(cells) for cells in order] == sorted(text.index(cells) for cells in order)
    assert "LLM prefill in the FastV convention" in text  # a sweep without sweep.json settings: the default


@pytest.mark.parametrize(("timings", "rows"), [
    ({"base": 600.0, "sweep": 60.0, "total": 660.0}, "| base | 10.0 |\n| sweep | 1.0 |\n| total | 11.0 |"),
    ({"seconds": {"base_stage1": 180.0, "base": 600.0, "sweep": 60.0}},
     "| base_stage1 | 3.0 |\n| base | 10.0 |\n| base training (stage 1 + stage 2) | 13.0 |\n| sweep | 1.0 |\n"
     "| total | 14.0 |"),
])
def test_stage_times_sum_once_and_the_base_row_sums_its_stages(run_dir, tmp_path, timings, rows):
    (run_dir / "timings.json").write_text(json.dumps(timings))
    assert rows in report_text(run_dir, tmp_path)


def test_the_base_table_has_a_column_per_question_family(run_dir, tmp_path):
    results = {"all visual tokens": {"acc": 0.6, "acc/count": 0.5, "acc/color": 0.75}}
    (run_dir / "base_eval.json").write_text(json.dumps(results))
    assert ("| setting | accuracy | color | count |\n|---|---|---|---|\n| all visual tokens | 0.600 | 0.750 | 0.500 |"
            in report_text(run_dir, tmp_path))


def test_the_prune_only_row_is_not_put_on_the_flops_plane(run_dir, tmp_path):
    rows = [row("accm", 0.969, accuracy=0.42), row("accm_prune_only", 0.969, accuracy=0.3)]
    (run_dir / "accm_r0.969/run/sweep.csv").write_text(sweep_csv(rows))
    plane = report_text(run_dir, tmp_path).split("## ACCM on the accuracy-vs-total-FLOPs plane")[1]
    assert "| accm | 0.9690 |" in plane and "accm_prune_only" not in plane


def test_a_point_at_exactly_a_curves_cheapest_flops_reads_that_point():
    baselines = [plane_row("full", 0.0, 1.0, 0.6), plane_row("fastv", 0.9, 0.10, 0.50)]
    lines = report.accm_on_flops_plane(report.measured(baselines), [plane_row("accm", 0.969, 0.10, 0.55)])
    # fastv's curve starts at 0.10 GFLOPs (0.50), which costs no more: the margin is +5 points
    assert lines[0].splitlines()[2] == "| accm | 0.9690 | 0.100 | 0.550 | 0.500 | 0.500 | +5.0 |"


def test_the_benchmark_and_rcp_cost_sections_show_their_measurements():
    data = {"args": {"batch": 1, "device": "cpu", "dtype": "fp32", "layers": 2, "hidden": 32, "text_tokens": 10,
                     "ratio": 0.5, "repeats": 3},
            "rows": [{"method": "fastv", "realised_ratio": 0.5, "flops_reduction": 0.4, "latency_ms": 12.0,
                      "latency_reduction": 0.2, "ratio_of_reductions": 0.5, "scoring_overhead": 0.0123}],
            "throughput": {"1": 3.0, "8": 10.0}}
    text = "\n".join(report.benchmark_section(data))
    assert "| fastv | 0.500 | 0.400 | 12 | 0.200 | 0.50 | 1.23% |" in text
    assert "batch 1 3.00 samples/s, batch 8 10.00 samples/s" in text
    cost = {"threads": 2, "batch": 4, "ratio": 0.889, "full_forward_ms": 10.04, "rcp_train_step_ms": 41.0,
            "train_step_over_forward": 4.08, "full_generate_ms": 30.0, "rcp_generate_ms": 21.5,
            "rcp_over_full_generate": 0.716}
    text = "\n".join(report.rcp_cost_section(cost))
    assert "| RCP training step (teacher + soft student + backward + AdamW) | 41.0 | 4.08 x forward |" in text
    assert "| generation, RCP at r = 0.889 | 21.5 | 0.72 x full |" in text and "| 10.0 | 1.00 |" in text
