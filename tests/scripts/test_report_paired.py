"""scripts/report.py's paired comparisons, read from the sweeps' answer files: RCP against the most accurate
training-free method at each ratio, ACCM's pick against a random candidate and its pruning alone, the oracle against
the pick; no section without answer files; a damaged or mismatched answer file is named and nothing is written."""

from __future__ import annotations

import json

from test_report import refused, report, row, run_dir, run_report, sweep_csv  # noqa: F401

ANSWERS = ["yes", "no", "two", "red", "circle", "one", "blue", "no"]


def write_answers(path, right: list[int], model_id: str, num: int = len(ANSWERS)) -> None:
    """An answer file of `num` questions whose answers are right exactly at the indices in `right`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"question_id": i, "prompt": f"q{i}", "text": ANSWERS[i] if i in right else "wrong",
                         "answer": ANSWERS[i], "category": "exist", "model_id": model_id}) for i in range(num)]
    path.write_text("\n".join(lines) + "\n")


def with_answers(run):
    (run / "sweep/run/sweep.csv").write_text(sweep_csv([
        row("full", 0.0), row("visionzip", 0.889, accuracy=0.5), row("fastv", 0.889, accuracy=0.375),
        row("pool", 0.889, "unreachable: realised r=0.5 is far", realised=0.5, accuracy=0.9)]))
    (run / "rcp_r0.889/run/sweep.csv").write_text(sweep_csv([row("rcp", 0.889, accuracy=0.75)]))
    (run / "accm_r0.969/run/sweep.csv").write_text(sweep_csv([
        row("accm", 0.969, accuracy=0.5), row("accm_random", 0.969, accuracy=0.25),
        row("accm_prune_only", 0.969, accuracy=0.5), row("accm_oracle", 0.969, accuracy=0.75)]))
    write_answers(run / "sweep/run/answers/visionzip_r0.889.jsonl", [0, 1, 2, 3], "visionzip@r=0.889")
    write_answers(run / "sweep/run/answers/fastv_r0.889.jsonl", [0, 1, 2], "fastv@r=0.889")
    write_answers(run / "rcp_r0.889/run/answers/rcp_r0.889.jsonl", [0, 1, 2, 4, 5, 6], "rcp@r=0.889")
    accm = run / "accm_r0.969/run/answers"
    write_answers(accm / "accm_r0.969.jsonl", [0, 1, 2, 3], "accm@r=0.969")
    write_answers(accm / "accm_random_r0.969.jsonl", [0, 1], "accm_random@r=0.969")
    write_answers(accm / "accm_prune_only_r0.969.jsonl", [4, 5, 6, 7], "accm_prune_only@r=0.969")
    write_answers(accm / "accm_oracle_r0.969.jsonl", [0, 1, 2, 3, 4, 5], "accm_oracle@r=0.969")
    return run


def paired_rows(text: str) -> dict[str, list[str]]:
    section = text.split("## Paired comparisons on the same test questions")[1].split("\n## ")[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")][1:]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_the_paired_section_compares_the_targets_pairs_question_by_question(run_dir, tmp_path):  # noqa: F811
    out = tmp_path / "results.md"
    run_report(with_answers(run_dir), out)
    rows = paired_rows(out.read_text())
    # the best ok training-free method at 0.889 is visionzip (the unreachable pool row is not a candidate)
    assert list(rows) == ["rcp vs visionzip (best training-free at r)", "accm vs accm_random",
                          "accm vs accm_prune_only", "accm_oracle vs accm"]
    # visionzip right on 0-3, rcp on 0-2 and 4-6: only visionzip 1 (q3), only rcp 3 (q4-6); p = 2 * 5/16
    assert rows["rcp vs visionzip (best training-free at r)"][:9] == [
        "0.8890", "8", "0.500", "0.750", "+25.0", rows["rcp vs visionzip (best training-free at r)"][5], "1", "3",
        "0.62"]
    assert rows["accm vs accm_random"][2:5] == ["0.250", "0.500", "+25.0"]
    assert rows["accm vs accm_random"][6:] == ["0", "2", "0.5"]
    # disjoint right answers: 4 against 4, difference 0, p = 1
    assert rows["accm vs accm_prune_only"][4] == "+0.0" and rows["accm vs accm_prune_only"][6:] == ["4", "4", "1"]
    assert rows["accm_oracle vs accm"][6:] == ["0", "2", "0.5"]


def test_without_answer_files_there_is_no_paired_section(run_dir, tmp_path):  # noqa: F811
    out = tmp_path / "results.md"
    run_report(run_dir, out)
    assert "Paired comparisons" not in out.read_text()


def test_a_damaged_answer_file_is_named_and_nothing_is_written(run_dir, tmp_path):  # noqa: F811
    run = with_answers(run_dir)
    damaged = run / "accm_r0.969/run/answers/accm_random_r0.969.jsonl"
    damaged.write_text(damaged.read_text() + "{cut short\n")
    message = refused(run, tmp_path / "results.md")
    assert f"{damaged}: line 9: not valid JSON" in message


def test_answer_files_of_different_questions_are_refused(run_dir, tmp_path):  # noqa: F811
    run = with_answers(run_dir)
    write_answers(run / "rcp_r0.889/run/answers/rcp_r0.889.jsonl", [0, 1], "rcp@r=0.889", num=6)
    message = refused(run, tmp_path / "results.md")
    assert "rcp_r0.889.jsonl does not answer the questions of" in message and "visionzip_r0.889.jsonl" in message


def test_a_pair_is_left_out_without_both_answer_files_or_when_rcp_missed_its_budget(run_dir, tmp_path):  # noqa: F811
    run = with_answers(run_dir)
    (run / "accm_r0.969/run/answers/accm_oracle_r0.969.jsonl").unlink()  # the second file of its row
    (run / "rcp_r0.889/run/sweep.csv").write_text(sweep_csv([
        row("rcp", 0.889, "unreachable: realised r=0.700 is 0.189 from the requested 0.889", realised=0.7)]))
    out = tmp_path / "results.md"
    run_report(run, out)
    assert list(paired_rows(out.read_text())) == ["accm vs accm_random", "accm vs accm_prune_only"]


def test_the_label_free_picks_are_compared_with_the_selectors_pick_when_swept(run_dir, tmp_path):  # noqa: F811
    run = with_answers(run_dir)
    accm = run / "accm_r0.969/run/answers"
    write_answers(accm / "accm_top_beam_r0.969.jsonl", [0, 1, 2], "accm_top_beam@r=0.969")
    write_answers(accm / "accm_confidence_r0.969.jsonl", [0, 1, 2, 3, 4, 5, 6, 7], "accm_confidence@r=0.969")
    write_answers(accm / "accm_confidence_gate_r0.969.jsonl", [4, 5], "accm_confidence_gate@r=0.969")
    write_answers(accm / "accm_gated_r0.969.jsonl", [0, 1, 4, 5, 6], "accm_gated@r=0.969")
    out = tmp_path / "results.md"
    run_report(run, out)
    rows = paired_rows(out.read_text())
    assert list(rows)[-6:] == ["accm_top_beam vs accm", "accm_confidence vs accm", "accm_confidence_gate vs accm",
                               "accm_confidence_gate vs accm_prune_only", "accm_gated vs accm",
                               "accm_gated vs accm_prune_only"]
    # the selector's pick is right on 0-3
    assert rows["accm_top_beam vs accm"][2:5] == ["0.500", "0.375", "-12.5"]
    assert rows["accm_top_beam vs accm"][6:8] == ["1", "0"]
    assert rows["accm_confidence vs accm"][2:5] == ["0.500", "1.000", "+50.0"]
    assert rows["accm_confidence vs accm"][6:8] == ["0", "4"]
    assert rows["accm_confidence_gate vs accm"][2:5] == ["0.500", "0.250", "-25.0"]
    assert rows["accm_confidence_gate vs accm"][6:8] == ["4", "2"]
    assert rows["accm_confidence_gate vs accm_prune_only"][2:5] == ["0.500", "0.250", "-25.0"]
    assert rows["accm_confidence_gate vs accm_prune_only"][6:8] == ["2", "0"]
    assert rows["accm_gated vs accm"][2:5] == ["0.500", "0.625", "+12.5"] and rows["accm_gated vs accm"][6:8] == ["2", "3"]
    assert rows["accm_gated vs accm_prune_only"][6:8] == ["1", "2"]
