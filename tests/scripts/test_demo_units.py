"""scripts/demo.py's records on tiny run directories: damaged records, repeated interruptions, and the summary."""

import csv
import json

import pytest

from test_demo import demo, write_base

SWEEP_COLUMNS = ("method", "prune_ratio", "realised_prune_ratio", "avg_visual_tokens", "tflops", "tflops_total",
                 "accuracy", "status")


def test_a_record_that_is_not_text_is_named_as_damaged(tmp_path):
    path = tmp_path / "timings.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(demo.DamagedRecord, match=rf"{path} \(the stage times\) is not readable JSON .*remove it"):
        demo.read_json(path, None, "the stage times")


def test_a_missing_record_reads_as_its_default(tmp_path):
    default = ["kept as given"]
    assert demo.read_json(tmp_path / "machine.json", default, "machine speeds") is default


@pytest.mark.parametrize("record", ["timings.json", "made_from_base.json"])
def test_check_records_stops_at_either_damaged_record(tmp_path, record):
    (tmp_path / record).write_text("{")
    with pytest.raises(demo.DamagedRecord, match=rf"{tmp_path / record} \("):
        demo.Demo(tmp_path).check_records()


def test_check_records_accepts_readable_and_missing_records(tmp_path):
    (tmp_path / "timings.json").write_text(json.dumps({"seconds": {"data": 1.0}, "interrupted": []}))
    assert demo.Demo(tmp_path).check_records() is None


def test_a_stage_interrupted_twice_is_listed_once_with_its_attempts_summed(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now[0])

    def interrupted():
        now[0] += 10.0
        raise KeyboardInterrupt

    def finishing():
        now[0] += 5.0
        return True

    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            demo.Demo(tmp_path).timed("sweep", interrupted)
    last = demo.Demo(tmp_path)
    last.timed("sweep", finishing)
    assert json.loads((tmp_path / "timings.json").read_text()) == {
        "seconds": {"sweep": 25.0}, "interrupted": ["sweep"], "total": 25.0}
    assert last.timings == {"sweep": 25.0}  # the summary shows the stage's whole time, not the last attempt's


def write_sweep(run_dir, name, rows):
    path = run_dir / name / "run" / "sweep.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(dict(zip(SWEEP_COLUMNS, row)) for row in rows)


def test_the_summary_lists_each_method_and_ratio_once_and_plots_them(tmp_path, monkeypatch, capsys):
    import callbacks.sweep

    (tmp_path / "base_eval.json").write_text(json.dumps({"all visual tokens": {"acc": 0.75, "loss": 1.0},
                                                         "no image": {}}))
    write_sweep(tmp_path, "sweep", [
        ("full", "0.0", "0.0", "16", "0.002", "0.003", "0.75", "ok"),
        ("fastv", "0.5", "0.5", "8", "0.001", "0.002", "0.5", "failed: RuntimeError: out of memory")])
    # every plug-in run sweeps the unpruned base again: listed and plotted once, the first sweep's row (here it
    # differs, so the table and the figure could disagree)
    write_sweep(tmp_path, "rcp_r0.889", [("full", "0.0", "0.0", "16", "0.002", "0.003", "0.74", "ok"),
                                         ("rcp", "0.889", "0.875", "2", "0.0005", "0.001", "0.625", "ok")])
    write_sweep(tmp_path, "rcp_r0.778", [("rcp", "0.778", "0.75", "4", "0.001", "0.0015", "0.7", "ok")])
    plotted = []

    class Figure:
        def savefig(self, path, **kwargs):
            plotted.append(path)

    monkeypatch.setattr(callbacks.sweep, "accuracy_vs_flops_figure", lambda rows: plotted.append(rows) or Figure())
    runner = demo.Demo(tmp_path)
    runner.timings = {"sweep": 90.0}
    runner.summary()
    lines = capsys.readouterr().out.splitlines()
    assert f"{'all visual tokens':52s} {0.75:9.3f}" in lines and f"{'no image':52s} {'nan':>9s}" in lines
    table = [line.split() for line in lines if line.split()[:1] in (["full"], ["fastv"], ["rcp"], ["rcp@0.778"])]
    assert table == [["full", "0.0000", "0.000", "16.0", "2.000", "3.000", "0.750"],
                     ["rcp", "0.8890", "0.875", "2.0", "0.500", "1.000", "0.625"],
                     ["rcp@0.778", "0.7780", "0.750", "4.0", "1.000", "1.500", "0.700"]]
    rows, path = plotted
    assert path == tmp_path / "accuracy_vs_flops.png"
    assert [(r["method"], r["prune_ratio"], r["tflops_total"], r["accuracy"], r["status"]) for r in rows] == [
        ("full", "0.0", 0.003, 0.75, "ok"), ("rcp", "0.889", 0.001, 0.625, "ok"),
        ("rcp@0.778", "0.778", 0.0015, 0.7, "ok")]
    assert "stage times (the stages that ran): sweep 1.5 min" in lines


def test_the_summary_of_an_empty_run_directory_names_only_where_outputs_go(tmp_path, capsys):
    demo.Demo(tmp_path).summary()
    assert capsys.readouterr().out.strip().splitlines() == [
        "=== summary ===", f"outputs in {tmp_path} (TensorBoard: tensorboard --logdir {tmp_path})"]


def test_main_stops_at_a_damaged_record_before_any_stage_or_speed_record(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    (tmp_path / "made_from_base.json").write_text("{")
    ran = []
    monkeypatch.setattr(demo, "record_machine_speed", lambda path, stages: ran.append("speed"))
    monkeypatch.setattr(demo.Demo, "data", lambda self: ran.append("data") or True)
    monkeypatch.setattr("sys.argv", ["demo.py", "--run-dir", str(tmp_path), "--stages", "data"])
    with pytest.raises(SystemExit, match=rf"demo.py: {tmp_path / 'made_from_base.json'} \(which base"):
        demo.main()
    assert ran == []
