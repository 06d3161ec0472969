"""scripts/report.py, the parts test_report.py leaves open: the curve reading at its edges, which rows and
settings each section takes (measured unreachable pairs, every sweep's FLOPs convention, question counts, stage
times), the optional sections' text, and damaged inputs it must name instead of crashing."""

from __future__ import annotations

import json

import pytest

from test_report import plane_row, refused, report, report_text, row, run_dir, sweep_csv  # noqa: F401  (fixture)

UNREACHABLE = "unreachable: realised r=0.700 is 0.200 from the requested 0.9 (ratio_tolerance 0.05)"


def cells(text: str, first: str) -> list[str]:
    """The cells of the table row of `text` whose first cell is `first`."""
    for line in text.splitlines():
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and parts[0] == first:
            return parts
    raise AssertionError(f"no row {first!r}")


def test_interpolate_reads_unsorted_points_both_ends_and_a_repeated_x():
    points = [(3.0, 0.7), (1.0, 0.1), (2.0, 0.5)]
    assert report.interpolate(points, 1.5) == pytest.approx(0.3)
    assert report.interpolate(points, 2.5) == pytest.approx(0.6)
    assert report.interpolate(points, 3.0) == pytest.approx(0.7)  # the most expensive point itself
    assert report.interpolate(points, 3.5) is None and report.interpolate(points, 0.5) is None
    # two points at the same FLOPs (a method realising one schedule at two ratios): no division by zero
    assert report.interpolate([(1.0, 0.4), (1.0, 0.4), (2.0, 0.8)], 1.0) == pytest.approx(0.4)


def test_accm_rows_on_the_plane_follow_the_ratio():
    baselines = [plane_row("full", 0.0, 1.0, 0.6), plane_row("fastv", 0.5, 0.5, 0.5)]
    accm = [plane_row("accm", 0.969, 0.3, 0.4), plane_row("accm", 0.9375, 0.4, 0.45)]
    lines = report.accm_on_flops_plane(baselines, accm)[0].splitlines()
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["0.9375", "0.9690"]


@pytest.mark.parametrize("column", ["status", "method"])
def test_a_table_without_the_status_or_method_column_is_refused(run_dir, tmp_path, column):
    path = run_dir / "sweep" / "run" / "sweep.csv"
    lines = path.read_text().splitlines()
    index = lines[0].split(",").index(column)
    kept = [",".join(c for i, c in enumerate(line.split(",")) if i != index) for line in lines]
    path.write_text("\n".join(kept) + "\n")
    assert f"{path}: not a sweep table, it has no column(s) {column}" in refused(run_dir, tmp_path / "results.md")


@pytest.mark.parametrize("bad, message", [
    ({**row("random", 0.5), "prune_ratio": "half"}, "line 3: prune_ratio='half' is not a number"),
    ({**row("pool", 0.9, UNREACHABLE, realised=0.7), "tflops_total": "n/a"}, "line 3: tflops_total='n/a' is not"),
    ({**row("random", 0.5), "num_samples": "sixteen"}, "line 3: num_samples='sixteen' is not a number"),
])
def test_a_non_number_in_a_measured_row_is_named(run_dir, tmp_path, bad, message):
    """'ok' rows and the measured unreachable ones are read as numbers: a damaged one is named, not a traceback."""
    path = run_dir / "sweep" / "run" / "sweep.csv"
    path.write_text(sweep_csv([row("full", 0.0), bad]))
    assert f"{path}: {message}" in refused(run_dir, tmp_path / "results.md")


@pytest.mark.parametrize("name", ["rcp_r0.889", "rcp_r0.778", "accm_r0.969"])
def test_every_sweeps_convention_is_compared(run_dir, tmp_path, name):
    (run_dir / "sweep" / "run" / "sweep.json").write_text(json.dumps({"flops_convention": "fastv"}))
    (run_dir / name / "run" / "sweep.json").write_text(json.dumps({"flops_convention": "exact"}))
    assert f"exact in {run_dir / name / 'run' / 'sweep.json'}" in refused(run_dir, tmp_path / "results.md")


def test_settings_without_a_convention_were_counted_the_fastv_way(run_dir, tmp_path):
    (run_dir / "sweep" / "run" / "sweep.json").write_text(json.dumps({"flops_convention": "fastv"}))
    (run_dir / "rcp_r0.889" / "run" / "sweep.json").write_text(json.dumps({"rows": []}))  # an older sweep
    assert "LLM prefill in the FastV convention" in report_text(run_dir, tmp_path)


def test_a_directory_in_place_of_a_main_output_is_missing(run_dir, tmp_path):
    (run_dir / "timings.json").unlink()
    (run_dir / "timings.json").mkdir()
    assert "lacks the main job's output(s) timings.json;" in refused(run_dir, tmp_path / "results.md")


def test_the_sweep_table_shows_the_realised_ratio_and_every_question_count(run_dir, tmp_path):
    never_ran = row("fastv", 0.9, "unreachable: fastv: prune_ratio=0.9 cannot be reached")
    rows = [row("full", 0.0), row("random", 0.5, realised=0.4375), never_ran]
    (run_dir / "sweep" / "run" / "sweep.csv").write_text(sweep_csv(rows))
    (run_dir / "rcp_r0.889" / "run" / "sweep.csv").write_text(sweep_csv([{**row("rcp", 0.889), "num_samples": 8}]))
    text = report_text(run_dir, tmp_path)
    assert cells(text, "random")[1:4] == ["0.5000", "0.438", "9.0"]  # 16 visual tokens, 43.75 % removed
    assert "synthetic test split (8 or 16 questions, 8-12 objects per scene)" in text
    # no pair missed its ratio after running: the note about the tolerance is left out
    assert "- fastv at r = 0.9\n" in text and "ratio_tolerance" not in text


def test_scene_sizes_and_the_models_depth_come_from_the_runs_own_configs(run_dir, tmp_path):
    (run_dir / "sweep" / "run" / "config_test.yaml").write_text("data:\n  init_args:\n    min_objects: 4\n"
                                                                "    max_objects: 7\n")
    (run_dir / "base_model" / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 32}}))
    text = report_text(run_dir, tmp_path)
    assert "synthetic test split (16 questions, 4-7 objects per scene)" in text
    assert "cannot remove that many tokens on the 32-layer model" in text
    (run_dir / "sweep" / "run" / "config_test.yaml").unlink()
    (run_dir / "base_model" / "config.json").unlink()
    text = report_text(run_dir, tmp_path)  # neither file: the report says no more than it knows
    assert "synthetic test split (16 questions) unless" in text and "objects per scene" not in text
    assert "cannot remove that many tokens on the base model" in text


def test_a_damaged_config_the_report_reads_is_named(run_dir, tmp_path):
    (run_dir / "base_model" / "config.json").write_text(json.dumps({"text_config": {}}))
    message = refused(run_dir, tmp_path / "results.md")
    assert "base_model/config.json: unexpected content (KeyError: 'num_hidden_layers')" in message
    (run_dir / "base_model" / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 12}}))
    (run_dir / "sweep" / "run" / "config_test.yaml").write_text("data: [unclosed\n")
    assert "sweep/run/config_test.yaml: cannot be read as YAML" in refused(run_dir, tmp_path / "results.md")


@pytest.mark.parametrize(("timings", "rows"), [
    ({"base": 600.0, "sweep": 60.0, "total": 9999.0}, "| sweep | 1.0 |\n| total | 11.0 |"),
    ({"seconds": {"base_describe": 120.0, "base_stage1": 180.0, "base": 600.0}},
     "| base | 10.0 |\n| base training (stage 0 + stage 1 + stage 2) | 15.0 |\n| total | 15.0 |"),
    ({"seconds": {"base_describe": 120.0, "base": 600.0}}, "| base training (stage 0 + stage 2) | 12.0 |"),
])
def test_the_total_is_the_stages_sum_and_the_base_row_names_its_stages(run_dir, tmp_path, timings, rows):
    (run_dir / "timings.json").write_text(json.dumps(timings))
    assert rows in report_text(run_dir, tmp_path)


def test_question_families_are_columns_in_name_order(run_dir, tmp_path):
    families = ["size", "count", "shape", "exists", "color", "position"]
    results = {"all visual tokens": {"acc": 0.5, **{f"acc/{name}": i / 10 for i, name in enumerate(families)}}}
    (run_dir / "base_eval.json").write_text(json.dumps(results))
    assert cells(report_text(run_dir, tmp_path), "setting") == ["setting", "accuracy", *sorted(families)]


def test_the_plane_reads_measured_unreachable_baselines_and_only_ok_accm_rows(run_dir, tmp_path):
    (run_dir / "sweep" / "run" / "sweep.csv").write_text(sweep_csv([
        row("full", 0.0, accuracy=0.6), row("pdrop", 0.9, UNREACHABLE, realised=0.7, accuracy=0.52)]))
    (run_dir / "accm_r0.969" / "run" / "sweep.csv").write_text(sweep_csv([
        row("accm", 0.969, accuracy=0.42), row("accm_random", 0.5, UNREACHABLE, realised=0.7, accuracy=0.4)]))
    plane = report_text(run_dir, tmp_path).split("## ACCM on the accuracy-vs-total-FLOPs plane")[1]
    # pdrop costs 2e-4 * 0.1 + 1e-4 TFLOPs = 0.120 GFLOPs, accm 0.106: no curve reaches that low
    assert cells(plane, "method")[4] == "pdrop at same FLOPs"
    assert cells(plane, "accm")[1:] == ["0.9690", "0.106", "0.420", "-", "-", "-"]
    assert "accm_random" not in plane


def test_the_machine_speed_line(run_dir, tmp_path):
    records = [{"fp32_matmul_gflops": 41.6, "threads": 2, "time": "2024-05-01 10:00", "stages": ["base", "sweep"]},
               {"fp32_matmul_gflops": 39.2, "threads": 2, "time": "2024-05-01 12:00", "stages": ["rcp"]}]
    (run_dir / "machine.json").write_text(json.dumps(records))
    assert ("fp32 512x512 matmul GFLOP/s (stage times scale with it): 42 (2 threads, 2024-05-01 10:00, stages base "
            "sweep); 39 (2 threads, 2024-05-01 12:00, stages rcp).") in report_text(run_dir, tmp_path)


def benchmark(timing=None, **args):
    data = {"args": {"batch": 1, "device": "cpu", "dtype": "fp32", "layers": 2, "hidden": 32, "text_tokens": 10,
                     "ratio": 0.5, "repeats": 3, **args},
            "rows": [{"method": "full", "realised_ratio": 0.0, "flops_reduction": 0.0, "latency_ms": 20.0,
                      "latency_reduction": 0.0, "ratio_of_reductions": None, "scoring_overhead": 0.0},
                     {"method": "fastv", "realised_ratio": 0.5, "flops_reduction": 0.4, "latency_ms": 20.0,
                      "latency_reduction": 0.0, "ratio_of_reductions": 0.0, "scoring_overhead": 0.0},
                     {"method": "dart", "status": "failed: RuntimeError: out of memory"}],
            "throughput": {"1": 3.0, "8": 10.0}}
    return "\n".join(report.benchmark_section({**data, **({"timing": timing} if timing else {})}))


def test_the_benchmark_section_rows_and_settings():
    text = benchmark()
    assert "| full | 0.000 | 0.000 | 20 | 0.000 | - | 0.00% |" in text  # no FLOPs reduction: no ratio
    assert "| fastv | 0.500 | 0.400 | 20 | 0.000 | 0.00 | 0.00% |" in text
    assert "| dart | - | - | - | - | - | failed |" in text
    assert "r = 0.5, median of 3 runs." in text and "PyramidDrop" not in text
    text = benchmark(timing="interleaved", pdrop_stage_ends=[1, 2])
    assert ("r = 0.5, PyramidDrop stage ends [1, 2], median of 3 rounds, each timing every row once (scoring: median "
            "of 3 runs after one warm-up).") in text


def test_the_rcp_cost_section_names_its_layers_and_rounds():
    cost = {"threads": 2, "batch": 4, "ratio": 0.889, "full_forward_ms": 10.0, "rcp_train_step_ms": 41.0,
            "train_step_over_forward": 4.1, "full_generate_ms": 30.0, "rcp_generate_ms": 21.5,
            "rcp_over_full_generate": 0.72}
    text = "\n".join(report.rcp_cost_section(cost))
    assert "RCP pruning layers of the paper, scaled, CPU (2 threads), batch 4, measured in one run (median of 5 " \
           "rounds)." in text
    text = "\n".join(report.rcp_cost_section({**cost, "pruning_layers": [2, 3], "repeats": 7}))
    assert "RCP pruning layers [2, 3], CPU (2 threads), batch 4, measured in one run (median of 7 rounds, each " \
           "timing every row once)." in text


def accm_report(run_dir, tmp_path, methods) -> str:
    (run_dir / "accm_r0.969" / "run" / "sweep.csv").write_text(sweep_csv([row(m, 0.969, accuracy=0.42) for m in methods]))
    return report_text(run_dir, tmp_path)


def test_the_sweep_section_names_the_stage_of_the_rcp_at_0778_rows(run_dir, tmp_path):
    text = accm_report(run_dir, tmp_path, ["accm"])
    assert "| rcp@0.778 | 0.7780 |" in text
    assert "## Accuracy vs FLOPs (`make demo`, stages sweep, rcp, rcp_r0.778, accm)" in text


@pytest.mark.parametrize("with_oracle", [True, False])
def test_the_sweep_caption_says_the_oracle_total_leaves_out_its_kl_passes(run_dir, tmp_path, with_oracle):
    text = accm_report(run_dir, tmp_path, ["accm", "accm_oracle"] if with_oracle else ["accm"])
    caption = text.split("## Accuracy vs FLOPs")[1].split("| method |")[0]
    assert "up to about 3.1 % more" in caption
    assert ("`accm_oracle`'s total also leaves out its pick's KL passes" in caption) is with_oracle
    assert ("| accm_oracle | 0.9690 |" in text) is with_oracle


def test_the_flops_plane_describes_the_oracle_passes_as_they_run(run_dir, tmp_path):
    text = accm_report(run_dir, tmp_path, ["accm", "accm_oracle"])
    plane = text.split("## ACCM on the accuracy-vs-total-FLOPs plane")[1]
    # candidate_kl: one reference pass with all visual tokens; the candidates run on the kept tokens
    assert "it runs the base with all visual tokens (the reference) and on every candidate" in plane
    assert "every candidate with all visual tokens" not in plane
    assert "| accm_oracle |" not in plane


def test_the_flops_plane_does_not_say_the_random_pick_counts_a_selector(run_dir, tmp_path):
    text = accm_report(run_dir, tmp_path, ["accm", "accm_random"])
    plane = text.split("## ACCM on the accuracy-vs-total-FLOPs plane")[1]
    # ACCMCompensation.generate counts 'selector' FLOPs only for the selector's pick; accm_random is on the plane too
    assert "| accm_random | 0.9690 |" in plane
    assert "caption model, selector and caption tokens included" not in plane
    assert "the selector where it picks: the random pick runs none" in plane
