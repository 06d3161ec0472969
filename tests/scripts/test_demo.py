"""scripts/demo.py's bookkeeping, with the stages' work replaced by stand-ins: which times `timings.json` keeps when
a run is interrupted and resumed, and that an output made from another base is named instead of reused."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(demo.time, "perf_counter", clock)
    return clock


def write_base(run_dir: Path, weights: bytes) -> None:
    (run_dir / "base_model").mkdir(parents=True, exist_ok=True)
    (run_dir / "base_model" / "model.safetensors").write_bytes(weights)
    (run_dir / "base_model" / "config.json").write_text("{}")


def fake_base_eval(monkeypatch, clock, seconds=30.0):
    """run_cli as the base evaluation's test runs: each takes `seconds` and gives an accuracy."""
    calls = []

    def run_cli(args):
        calls.append(args)
        clock.now += seconds
        return {"test/acc": 0.5}

    monkeypatch.setattr(demo, "run_cli", run_cli)
    return calls


def timings(run_dir: Path) -> dict:
    return json.loads((run_dir / "timings.json").read_text())


def test_a_reused_stage_keeps_the_time_it_took(tmp_path, monkeypatch, clock):
    write_base(tmp_path, b"base")
    runner = demo.Demo(tmp_path)
    fake_base_eval(monkeypatch, clock)
    runner.timed("base_eval", runner.base_eval)
    assert timings(tmp_path)["seconds"] == {"base_eval": 150.0}  # five settings of 30 s
    again = demo.Demo(tmp_path)
    calls = fake_base_eval(monkeypatch, clock)
    again.timed("base_eval", again.base_eval)
    again.timed("base", again.base)  # reuses the exported base
    assert calls == [] and again.timings == {}
    assert timings(tmp_path) == {"seconds": {"base_eval": 150.0}, "interrupted": [], "total": 150.0}


def test_an_interrupted_stage_adds_its_attempts_and_is_marked(tmp_path, monkeypatch, clock):
    write_base(tmp_path, b"base")
    runner = demo.Demo(tmp_path)

    def interrupted(args):
        clock.now += 100.0
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_cli", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.timed("base_eval", runner.base_eval)
    assert timings(tmp_path)["seconds"] == {"base_eval": 100.0}  # written at once, the next invocation adds to it
    fake_base_eval(monkeypatch, clock)
    again = demo.Demo(tmp_path)
    again.timed("base_eval", again.base_eval)
    assert timings(tmp_path) == {"seconds": {"base_eval": 250.0}, "interrupted": ["base_eval"], "total": 250.0}


def test_earlier_flat_timings_are_read_and_kept(tmp_path, monkeypatch, clock):
    write_base(tmp_path, b"base")
    (tmp_path / "timings.json").write_text(json.dumps({"base": 600.0, "total": 600.0}))
    runner = demo.Demo(tmp_path)
    fake_base_eval(monkeypatch, clock)
    runner.timed("base_eval", runner.base_eval)
    assert timings(tmp_path) == {"seconds": {"base": 600.0, "base_eval": 150.0}, "interrupted": [], "total": 750.0}


def test_an_output_of_another_base_is_named_not_reused(tmp_path, monkeypatch, clock):
    write_base(tmp_path, b"first base")
    runner = demo.Demo(tmp_path)
    fake_base_eval(monkeypatch, clock)
    runner.timed("base_eval", runner.base_eval)
    write_base(tmp_path, b"retrained base")
    calls = fake_base_eval(monkeypatch, clock)
    again = demo.Demo(tmp_path)
    with pytest.raises(demo.StaleOutput, match=rf"{tmp_path / 'base_eval.json'} was made from another base model"):
        again.timed("base_eval", again.base_eval)
    assert calls == [] and "base_eval" not in timings(tmp_path)["interrupted"]
    write_base(tmp_path, b"first base")  # the base it was made from: reused
    again.timed("base_eval", again.base_eval)
    assert calls == []


def test_a_stage_output_of_an_earlier_demo_version_is_reused(tmp_path, monkeypatch, clock):
    write_base(tmp_path, b"base")
    (tmp_path / "base_eval.json").write_text("{}")  # no made_from_base.json: made before the demo recorded it
    calls = fake_base_eval(monkeypatch, clock)
    runner = demo.Demo(tmp_path)
    assert runner.base_eval() is False
    runner.timed("base_eval", runner.base_eval)
    assert calls == [] and runner.timings == {}  # reused: nothing run, no time recorded
    assert (tmp_path / "base_eval.json").read_text() == "{}" and not (tmp_path / "timings.json").exists()
