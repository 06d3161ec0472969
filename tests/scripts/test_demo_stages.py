"""scripts/demo.py's stages with `run_cli` replaced by a stand-in that writes what the real stage writes: a plug-in
stage's arguments, record and reuse, its resume from the last checkpoint, the sweep after an interrupted one, the base
stages an exported later stage makes unnecessary, the time a stage run again counts, machine-speed records."""

import json
import sys

import pytest

from test_demo import demo, write_base


def fake_cli(monkeypatch, run_dir, raise_on_fit=None):
    """run_cli that writes what the real stage writes: <name>/run/sweep.csv (a plug-in stage or the sweep)."""
    calls = []

    def run_cli(args):
        calls.append(list(args))
        if raise_on_fit is not None and args[0] == "fit":
            raise raise_on_fit
        name = args[args.index("--trainer.logger.init_args.name") + 1]
        out = run_dir / name / "run"
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.csv").write_text("method,status\n")
        return {}

    monkeypatch.setattr(demo, "run_cli", run_cli)
    return calls


def value(args, flag):
    return args[args.index(flag) + 1]


def test_a_plugin_stage_is_made_recorded_reused_and_named_when_stale(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    calls = fake_cli(monkeypatch, tmp_path)
    runner = demo.Demo(tmp_path)
    assert runner.rcp() is True
    (args,) = calls
    assert args[:3] == ["fit", "--config", "configs/synthetic/rcp.yaml"] and "--ckpt_path" not in args
    assert value(args, "--model.init_args.plugin_export_path") == str(tmp_path / "rcp_r0.889" / "plugin.safetensors")
    assert value(args, "--model.init_args.base_model_path") == str(tmp_path / "base_model")
    made = json.loads((tmp_path / "made_from_base.json").read_text())
    assert made["rcp_r0.889"] == demo.weights_digest(tmp_path / "base_model")
    assert runner.rcp() is False and len(calls) == 1  # reused
    write_base(tmp_path, b"retrained")
    with pytest.raises(demo.StaleOutput, match=rf"{tmp_path / 'rcp_r0.889'} was made from another base model"):
        runner.rcp()
    assert len(calls) == 1


def test_a_plugin_stage_without_its_sweep_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    stage = tmp_path / "accm_r0.969"
    last = stage / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"ckpt")
    (stage / "plugin.safetensors").write_bytes(b"exported, but the sweep after fit did not finish")
    calls = fake_cli(monkeypatch, tmp_path)
    assert demo.Demo(tmp_path).accm() is True
    (args,) = calls
    assert args[:3] == ["fit", "--config", "configs/synthetic/accm.yaml"] and value(args, "--ckpt_path") == str(last)


def test_a_finished_plugin_run_interrupted_in_its_sweep_is_swept_from_its_checkpoint(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    last = tmp_path / "rcp_r0.889" / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"ckpt")
    calls = fake_cli(monkeypatch, tmp_path, raise_on_fit=demo.FinishedRunNotSwept("swept nothing"))
    assert demo.Demo(tmp_path).rcp() is True
    fit, test = calls
    assert fit[0] == "fit" and test[:3] == ["test", "--config", "configs/synthetic/rcp.yaml"]
    assert value(test, "--ckpt_path") == str(last)
    assert value(test, "--trainer.callbacks.init_args.run_after_test") == "true"
    assert "rcp_r0.889" in json.loads((tmp_path / "made_from_base.json").read_text())


def test_the_second_rcp_stage_trains_for_its_own_ratio(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    calls = fake_cli(monkeypatch, tmp_path)
    demo.Demo(tmp_path).rcp_r0778()
    (args,) = calls
    assert value(args, "--model.init_args.compensation.init_args.target_prune_ratio") == "0.778"
    assert value(args, "--trainer.logger.init_args.name") == "rcp_r0.778"


def test_the_sweep_is_recorded_and_an_unfinished_one_runs_again(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    (tmp_path / "sweep" / "run").mkdir(parents=True)  # an interrupted sweep: no sweep.csv
    calls = fake_cli(monkeypatch, tmp_path)
    runner = demo.Demo(tmp_path)
    assert runner.sweep() is True and len(calls) == 1
    assert calls[0][:3] == ["test", "--config", "configs/synthetic/sweep.yaml"]
    made = json.loads((tmp_path / "made_from_base.json").read_text())
    assert made["sweep"] == demo.weights_digest(tmp_path / "base_model")
    assert runner.sweep() is False and len(calls) == 1  # finished now: reused
    write_base(tmp_path, b"retrained")
    with pytest.raises(demo.StaleOutput, match=f"{tmp_path / 'sweep'} was made from another base model"):
        runner.sweep()
    assert len(calls) == 1


def test_an_exported_later_base_stage_makes_the_earlier_ones_unnecessary(tmp_path, monkeypatch):
    calls = fake_cli(monkeypatch, tmp_path)
    (tmp_path / "base_stage1_model").mkdir()
    (tmp_path / "base_stage1_model" / "config.json").write_text("{}")
    runner = demo.Demo(tmp_path)
    assert runner.base_describe() is False and calls == []
    write_base(tmp_path, b"base")
    (tmp_path / "base_stage1_model" / "config.json").unlink()
    assert runner.base_stage1() is False and runner.base_describe() is False and calls == []


def test_a_stage_run_again_after_a_finished_run_counts_only_its_new_time(tmp_path, monkeypatch):
    write_base(tmp_path, b"base")
    now = [0.0]
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now[0])

    def run_cli(args):  # each of the five settings takes 30 s
        now[0] += 30.0
        return {"test/acc": 0.5}

    monkeypatch.setattr(demo, "run_cli", run_cli)
    first = demo.Demo(tmp_path)
    first.timed("base_eval", first.base_eval)
    (tmp_path / "base_eval.json").unlink()  # removed by hand: made again, not resumed
    again = demo.Demo(tmp_path)
    again.timed("base_eval", again.base_eval)
    assert json.loads((tmp_path / "timings.json").read_text())["seconds"] == {"base_eval": 150.0}


def test_machine_speed_records_are_appended(tmp_path, monkeypatch):
    import benchmarks.timing

    monkeypatch.setattr(benchmarks.timing, "matmul_gflops", lambda: 123.44)
    path = tmp_path / "machine.json"
    demo.record_machine_speed(path, ["data"])
    demo.record_machine_speed(path, ["rcp", "accm"])
    records = json.loads(path.read_text())
    assert [r["stages"] for r in records] == [["data"], ["rcp", "accm"]]
    assert all(r["fp32_matmul_gflops"] == 123.4 for r in records)


def test_main_turns_a_stale_output_into_a_named_exit(tmp_path, monkeypatch):
    write_base(tmp_path, b"first")
    (tmp_path / "base_eval.json").write_text("{}")
    (tmp_path / "made_from_base.json").write_text(json.dumps({"base_eval": "another digest"}))
    monkeypatch.setattr(demo, "record_machine_speed", lambda path, stages: None)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--run-dir", str(tmp_path), "--stages", "base_eval"])
    with pytest.raises(SystemExit, match=r"demo.py: .*base_eval.json was made from another base model"):
        demo.main()


@pytest.mark.parametrize("record", ["made_from_base.json", "timings.json", "machine.json"])
def test_main_names_a_damaged_record_and_leaves_the_outputs(tmp_path, monkeypatch, record):
    write_base(tmp_path, b"base")
    (tmp_path / "base_eval.json").write_text("{}")
    (tmp_path / record).write_text('{"base_eval": "trunc')  # a record cut short
    calls = fake_cli(monkeypatch, tmp_path)
    if record != "machine.json":
        monkeypatch.setattr(demo, "record_machine_speed", lambda path, stages: None)
    else:
        import benchmarks.timing

        monkeypatch.setattr(benchmarks.timing, "matmul_gflops", lambda: 1.0)
    stages = ["base_eval"] if record == "made_from_base.json" else ["sweep"]
    monkeypatch.setattr(sys, "argv", ["demo.py", "--run-dir", str(tmp_path), "--stages", *stages])
    with pytest.raises(SystemExit, match=rf"demo.py: {tmp_path / record} \(.+\) is not readable JSON .+ remove it"):
        demo.main()
    assert calls == [] and (tmp_path / "base_eval.json").read_text() == "{}"
    assert (tmp_path / record).read_text() == '{"base_eval": "trunc'


def test_a_failing_stage_shows_its_own_error_over_a_damaged_timings_file(tmp_path, monkeypatch):
    (tmp_path / "timings.json").write_text("{")
    runner = demo.Demo(tmp_path)

    def stage():
        raise ValueError("the stage's own error")

    with pytest.raises(ValueError, match="the stage's own error"):
        runner.timed("sweep", stage)


def test_bookkeeping_files_are_written_whole(tmp_path, monkeypatch):
    """timings.json, made_from_base.json and base_eval.json go through the atomic writer, so an interruption
    while writing leaves the previous version."""
    import benchmarks.timing

    write_base(tmp_path, b"base")
    written = []
    monkeypatch.setattr(demo, "write_atomically", lambda path, text: written.append(path.name) or path.write_text(text))
    monkeypatch.setattr(demo, "run_cli", lambda args: {"test/acc": 0.5})
    monkeypatch.setattr(benchmarks.timing, "matmul_gflops", lambda: 1.0)
    demo.record_machine_speed(tmp_path / "machine.json", ["base_eval"])
    runner = demo.Demo(tmp_path)
    runner.timed("base_eval", runner.base_eval)
    assert sorted(set(written)) == ["base_eval.json", "machine.json", "made_from_base.json", "timings.json"]
