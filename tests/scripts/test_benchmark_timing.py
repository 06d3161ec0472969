"""The benchmarks' timing helper (benchmarks/timing.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.timing import interleaved_median_seconds  # noqa: E402


def test_interleaved_rounds_time_every_function_once_per_round_after_one_warm_up_each(monkeypatch):
    import benchmarks.timing as timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    # a call of "a" lasts 1, 5, 2 in the timed rounds (10 in its warm-up), "b" 3 every time
    durations = {"a": iter([10.0, 1.0, 5.0, 2.0]), "b": iter([3.0] * 4)}
    calls = []

    def run(name):
        calls.append(name)
        clock[0] += next(durations[name])

    medians = interleaved_median_seconds({"a": lambda: run("a"), "b": lambda: run("b")}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert medians == {"a": 2.0, "b": 3.0}  # the warm-up's 10 is not among a's times
