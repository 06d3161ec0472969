"""The benchmarks' timing helper (benchmarks/timing.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.timing import interleaved_median_seconds  # noqa: E402


def test_interleaved_rounds_time_every_function_once_per_round_after_one_warm_up_each():
    calls = []
    medians = interleaved_median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())
