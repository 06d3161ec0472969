"""The benchmark scripts (benchmarks/*.py) run in-process at their tiniest sizes, and what they print and write
agrees with their inputs and with the timings they measured."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import optimizer_step, prefill_latency, rcp_cost, scoring_flops, synthetic_batching  # noqa: E402
from conftest import save_tiny_base  # noqa: E402
from lvlm_prune.flops import LLMShape, llm_prefill_flops  # noqa: E402
from lvlm_prune.modeling.optimizers import OPTIMIZERS  # noqa: E402


def save_default_grid_base(directory):
    return save_tiny_base(directory, default_grid=True)


@pytest.fixture(scope="module")
def default_grid_base(tmp_path_factory):
    return save_default_grid_base(tmp_path_factory.mktemp("default_grid") / "base_model")


@pytest.fixture
def recorded_timings(monkeypatch):
    """`record(script)` makes the script's `interleaved_median_seconds` keep each result (the timing still runs)."""

    def record(script) -> list[dict]:
        measured, real = [], script.interleaved_median_seconds

        def recording(fns, repeats):
            measured.append(real(fns, repeats))
            return measured[-1]

        monkeypatch.setattr(script, "interleaved_median_seconds", recording)
        return measured

    return record


def run_script(script, monkeypatch, capsys, *args) -> list[str]:
    monkeypatch.setattr(sys, "argv", [script.__name__, *map(str, args)])
    script.main()
    return capsys.readouterr().out.splitlines()


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of a printed markdown table's rows, header and separator excluded."""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return rows[1:]


def test_prefill_latency_reports_every_method_at_the_requested_ratio_with_its_measured_times(
        monkeypatch, capsys, tmp_path, recorded_timings):
    timings = recorded_timings(prefill_latency)
    scored = {}

    class RecordedScores(prefill_latency.TimedScores):
        """Also counts the calls of the method's hooks and of the sync that is to run around each of them."""

        def __init__(self, method, sync):
            self.hook_calls = self.syncs = 0
            for hook in ("before_llm", "at_layer"):
                def counted(ctx, _original=getattr(method, hook)):
                    self.hook_calls += 1
                    return _original(ctx)

                setattr(method, hook, counted)

            def counted_sync():
                self.syncs += 1
                sync()

            super().__init__(method, counted_sync)
            scored.setdefault(method.name, []).append(self)

    monkeypatch.setattr(prefill_latency, "TimedScores", RecordedScores)
    out = tmp_path / "prefill.json"
    lines = run_script(prefill_latency, monkeypatch, capsys, "--layers", 4, "--hidden", 128, "--batch", 1,
                       "--text-tokens", 2, "--ratio", 0.5, "--repeats", 1, "--out", out)
    result = json.loads(out.read_text())
    (seconds,) = timings
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["full", "random", "pool", "fastv", "pdrop", "visionzip", "dart"]
    assert set(seconds) == set(rows)
    assert result["args"]["pdrop_stage_ends"] == [1, 2, 3]
    full = rows["full"]
    assert full["latency_ms"] == pytest.approx(1e3 * seconds["full"])
    assert (full["realised_ratio"], full["flops_reduction"], full["ratio_of_reductions"]) == (0.0, 0.0, None)
    for name, row in rows.items():
        if name == "full":
            continue
        assert row["realised_ratio"] == pytest.approx(0.5, abs=0.01), name
        assert 0 < row["flops_reduction"] < 1, name
        assert row["latency_ms"] == pytest.approx(1e3 * seconds[name]), name
        assert row["latency_reduction"] == pytest.approx(1 - seconds[name] / seconds["full"]), name
        assert row["ratio_of_reductions"] == pytest.approx(row["latency_reduction"] / row["flops_reduction"]), name
        _, timed = scored[name]  # --repeats 1: one timed run after the warm-up
        assert row["scoring_overhead"] == pytest.approx(timed.seconds / seconds["full"]), name
        assert 0 < timed.seconds < seconds[name], name
        assert timed.syncs == 2 * timed.hook_calls, name
        assert (timed.hook_calls > 1) == (name in ("fastv", "pdrop", "dart")), name  # they score inside the LLM too
    # the pre-LLM methods keep 288 of the 576 visual tokens in all 4 layers (LLM 128 wide, FFN 128 * 11008 / 4096,
    # one head of 128); the prompt is BOS + the image + 2 text tokens
    shape = LLMShape(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=1, num_kv_heads=1, head_dim=128,
                     vocab_size=32000)
    pre_llm_reduction = 1 - llm_prefill_flops(shape, 3, [288] * 4) / llm_prefill_flops(shape, 3, [576] * 4)
    for name in ("random", "pool", "visionzip"):
        assert rows[name]["realised_ratio"] == 0.5
        assert rows[name]["flops_reduction"] == pytest.approx(pre_llm_reduction), name
    assert rows["fastv"]["flops_reduction"] < pre_llm_reduction  # it prunes after layer 1: layer 0 sees all 576

    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["method", "realised", "r"])
    assert lines[header - 1].startswith("device cpu (")
    assert "LLM 4 x 128 (FFN 344), 576 visual + 2 text tokens, batch 1, r = 0.5" in lines[header - 1]
    for line, row in zip(lines[header + 1:], result["rows"]):
        cells = line.split()
        assert cells[0] == row["method"]
        assert cells[1:5] == [f"{row['realised_ratio']:.3f}", f"{row['flops_reduction']:.3f}",
                              f"{row['latency_ms']:.1f}", f"{row['latency_reduction']:.3f}"]
        assert cells[5] == ("-" if row["ratio_of_reductions"] is None else f"{row['ratio_of_reductions']:.2f}")
        assert cells[6] == f"{100 * row['scoring_overhead']:.2f}%"
    throughput = re.fullmatch(r"eval throughput \(generate, fastv r=0\.5, 8 new tokens\): batch 1 (\S+) samples/s, "
                              r"batch 8 (\S+) samples/s \((\S+)x\)", lines[-1])
    one, eight, speedup = (float(group) for group in throughput.groups())
    assert one == pytest.approx(result["throughput"]["1"], abs=0.005)
    assert eight == pytest.approx(result["throughput"]["8"], abs=0.005)
    assert speedup == pytest.approx(result["throughput"]["8"] / result["throughput"]["1"], abs=0.005)


def test_prefill_latency_marks_methods_that_cannot_reach_the_ratio_and_still_finishes(monkeypatch, capsys, tmp_path):
    out = tmp_path / "prefill.json"
    lines = run_script(prefill_latency, monkeypatch, capsys, "--layers", 2, "--hidden", 128, "--batch", 1,
                       "--text-tokens", 2, "--ratio", 0.889, "--repeats", 1, "--out", out)
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    # with 2 layers, FastV and DART prune after layer 1: at most half of the visual tokens can go
    for name in ("fastv", "dart"):
        assert rows[name] == {"method": name, "status": rows[name]["status"]}
        assert rows[name]["status"].startswith(f"unreachable: {name}: prune_ratio=0.889 cannot be reached")
        assert any(line.split()[:2] == [name, "unreachable:"] for line in lines)
    for name in ("random", "pool", "visionzip"):
        assert rows[name]["realised_ratio"] == pytest.approx(0.889, abs=0.01)
    assert json.loads(out.read_text())["throughput"] == {}
    assert lines[-1].startswith("eval throughput: not measured, fastv is unreachable")


def test_rcp_cost_reports_its_measured_times_and_their_ratios(default_grid_base, monkeypatch, capsys, tmp_path,
                                                                 recorded_timings):
    timings = recorded_timings(rcp_cost)
    out = tmp_path / "rcp_cost.json"
    lines = run_script(rcp_cost, monkeypatch, capsys, "--base", default_grid_base, "--batch", 2, "--repeats", 1,
                       "--ratio", 0.5, "--out", out)
    result = json.loads(out.read_text())
    (seconds,) = timings
    assert set(seconds) == {"forward", "step", "full_gen", "rcp_gen"}
    assert all(value > 0 for value in seconds.values())
    assert {k: result[k] for k in ("threads", "batch", "ratio", "repeats", "pruning_layers")} == {
        "threads": torch.get_num_threads(), "batch": 2, "ratio": 0.5, "repeats": 1, "pruning_layers": [0]}
    assert result["full_forward_ms"] == pytest.approx(1e3 * seconds["forward"])
    assert result["rcp_train_step_ms"] == pytest.approx(1e3 * seconds["step"])
    assert result["full_generate_ms"] == pytest.approx(1e3 * seconds["full_gen"])
    assert result["rcp_generate_ms"] == pytest.approx(1e3 * seconds["rcp_gen"])
    assert result["train_step_over_forward"] == pytest.approx(seconds["step"] / seconds["forward"])
    assert result["rcp_over_full_generate"] == pytest.approx(seconds["rcp_gen"] / seconds["full_gen"])
    assert lines[0] == f"CPU, {torch.get_num_threads()} threads, batch 2, base {default_grid_base}"
    assert lines[1] == f"full-token forward (teacher-forced): {result['full_forward_ms']:8.1f} ms"
    assert lines[2].endswith(f"{result['rcp_train_step_ms']:8.1f} ms = {result['train_step_over_forward']:.2f} x "
                             f"the full forward")
    assert lines[3] == (f"generation, 4 new tokens: full {result['full_generate_ms']:.1f} ms, RCP at r=0.5 "
                        f"{result['rcp_generate_ms']:.1f} ms = {result['rcp_over_full_generate']:.2f} x")


def test_rcp_cost_times_the_saliency_step_when_asked_and_that_step_computes_the_saliency(
        default_grid_base, monkeypatch, capsys, tmp_path, recorded_timings):
    from lvlm_prune.rcp.compensation import RCPCompensation

    calls = []
    original = RCPCompensation.teacher_with_saliency
    monkeypatch.setattr(RCPCompensation, "teacher_with_saliency",
                        lambda self, *a: calls.append(self.saliency_weight) or original(self, *a))
    timings = recorded_timings(rcp_cost)
    out = tmp_path / "rcp_cost.json"
    lines = run_script(rcp_cost, monkeypatch, capsys, "--base", default_grid_base, "--batch", 2, "--repeats", 1,
                       "--ratio", 0.5, "--saliency-weight", 2.0, "--out", out)
    result = json.loads(out.read_text())
    (seconds,) = timings
    assert set(seconds) == {"forward", "step", "full_gen", "rcp_gen", "saliency_step"}
    assert calls == [2.0, 2.0]  # the saliency step's warm-up and timed call: the plain step never computes it
    assert result["saliency_weight"] == 2.0
    assert result["rcp_train_step_saliency_ms"] == pytest.approx(1e3 * seconds["saliency_step"])
    assert result["saliency_train_step_over_forward"] == pytest.approx(seconds["saliency_step"] / seconds["forward"])
    assert lines[3] == (f"RCP training step with the saliency ranking loss: {result['rcp_train_step_saliency_ms']:8.1f} "
                        f"ms = {result['saliency_train_step_over_forward']:.2f} x the full forward")


def test_rcp_cost_loads_the_plugin_it_is_given(default_grid_base, monkeypatch, capsys, tmp_path):
    from lightning_modules.compensation import export_plugin_weights
    from lvlm_prune.engine import PrunedLlava
    from lvlm_prune.modeling.loading import freeze, load_base_model
    from lvlm_prune.rcp.compensation import RCPCompensation

    trained = RCPCompensation(target_prune_ratio=0.5, pruning_layers=[0], bottleneck=64, num_queries=16, context_dim=64,
                              adapter_bottleneck=32)
    trained.attach(PrunedLlava(freeze(load_base_model(str(default_grid_base)))))
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.fill_(0.125)
    path = export_plugin_weights(trained, tmp_path / "plugin.safetensors", {})
    loaded = {}

    def remember_loaded(plugin, plugin_path, *args):
        real_load(plugin, plugin_path, *args)
        loaded.update({k: v.clone() for k, v in plugin.state_dict().items()}, path=plugin_path)

    real_load = rcp_cost.load_plugin_weights
    monkeypatch.setattr(rcp_cost, "load_plugin_weights", remember_loaded)
    run_script(rcp_cost, monkeypatch, capsys, "--base", default_grid_base, "--plugin", path, "--batch", 1,
               "--repeats", 1, "--ratio", 0.5)
    assert loaded.pop("path") == str(path)
    assert loaded.keys() == trained.state_dict().keys()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(loaded[key], value)


def test_scoring_flops_counts_only_the_scoring_methods_and_shares_of_their_totals(monkeypatch, capsys):
    counted, plugin_flops = [], []
    real_scoring_flops = scoring_flops.scoring_flops

    def recorded_scoring_flops(engine, method, *inputs):
        flops, schedule = real_scoring_flops(engine, method, *inputs)
        plugins = method.plugin_flops(2)
        counted.append(flops)
        plugin_flops.append(plugins.get("rcp_pruners", 0.0) + plugins.get("rcp_context", 0.0))
        return flops, schedule

    monkeypatch.setattr(scoring_flops, "scoring_flops", recorded_scoring_flops)
    lines = run_script(scoring_flops, monkeypatch, capsys, "--text-tokens", 2, "--ratios", 0.889, 0.5)
    assert lines[0] == "| r | method | scoring MFLOPs | counted total MFLOPs | scoring / counted |"
    rows = table_rows(lines)
    names = ["random", "pool", "fastv", "pdrop", "visionzip", "dart", "prumerge+", "rcp"]
    assert [(r, name) for r, name, *_ in rows] == [(r, name) for r in ("0.889", "0.5") for name in names]
    # the hooks' own FLOPs less what the plug-in accounting already charges (only RCP's pruners and context encoder)
    assert [plugin > 0 for plugin in plugin_flops] == [name == "rcp" for _, name, *_ in rows]
    assert [float(row[2]) for row in rows] == pytest.approx(
        [(hooks - plugin) / 1e6 for hooks, plugin in zip(counted, plugin_flops)], abs=0.006)
    totals = {}
    for r, name, scoring, total, share in rows:
        scoring, total = float(scoring), float(total)
        totals[r, name] = total
        assert (scoring == 0.0) == (name in ("random", "pool")), (r, name)  # only they score without matmuls
        assert 0 < total and share.endswith(" %")
        assert float(share[:-2]) == pytest.approx(100 * scoring / total, abs=0.01 + 100 * 0.006 / total)
    for r in ("0.889", "0.5"):  # the same tokens kept before the LLM, no plug-in: the same counted total
        assert totals[r, "random"] == totals[r, "pool"] == totals[r, "visionzip"] == totals[r, "prumerge+"]
    assert totals["0.889", "random"] < totals["0.5", "random"]


def test_optimizer_step_times_each_optimizer_against_one_forward_backward(monkeypatch, capsys, recorded_timings):
    timings = recorded_timings(optimizer_step)
    monkeypatch.setattr(optimizer_step, "matmul_gflops", lambda: 123.0)
    lines = run_script(optimizer_step, monkeypatch, capsys, "--llm-layers", 1, 2, "--repeats", 1)
    assert lines[0] == f"torch threads: {torch.get_num_threads()}, fp32 matmul 123 GFLOP/s"
    assert lines[1] == ("| LLM layers | forward + backward ms | adamw step ms | adamw share | muon step ms | "
                        "muon share |")
    assert lines[2] == "|---" * 6 + "|"
    rows = table_rows(lines)
    assert [row[0] for row in rows] == ["1", "2"] and len(timings) == 2
    for row, seconds in zip(rows, timings):
        assert set(seconds) == {"compute", *OPTIMIZERS}
        compute = 1000 * seconds["compute"]
        assert row[1] == f"{compute:.0f}"
        for i, name in enumerate(OPTIMIZERS):
            step = 1000 * seconds[name]
            assert row[2 + 2 * i : 4 + 2 * i] == [f"{step:.1f}", f"{step / (compute + step):.1%}"]


def test_synthetic_batching_reports_the_padding_of_the_batches_each_loader_built(monkeypatch, capsys):
    built, steps = [], []

    class RecordingData(synthetic_batching.SyntheticVQADataModule):
        def train_dataloader(self):
            built.append(list(super().train_dataloader()))
            return built[-1]

    real_loss = synthetic_batching.answer_cross_entropy

    def counted_loss(logits, labels):
        steps.append(logits.shape[0])
        return real_loss(logits, labels)

    clock = iter(range(10**6))
    monkeypatch.setattr(synthetic_batching.time, "perf_counter", lambda: float(next(clock)))  # a second a reading
    monkeypatch.setattr(synthetic_batching, "SyntheticVQADataModule", RecordingData)
    monkeypatch.setattr(synthetic_batching, "answer_cross_entropy", counted_loss)
    lines = run_script(synthetic_batching, monkeypatch, capsys, "--batches", 2, "--llm-layers", 1,
                       "--pack-length", 256)
    assert lines[0] == f"{torch.get_num_threads()} threads, 1 LLM layers, 2 steps each, interleaved"
    assert lines[1] == ("| batches | rows per batch | padded / real tokens | seconds to build a batch | "
                        "seconds per step |")
    rows = table_rows(lines)
    assert [row[0] for row in rows] == ["padded, shuffled", "padded, length-grouped", "packed into rows of 256"]
    assert len(steps) == 3 * (1 + 2)  # a warm-up step, then 2 timed ones, for each loader
    pad = 0  # the word tokenizer's padding id
    for row, batches in zip(rows, built, strict=True):
        assert len(batches) == 3  # 32 * (2 + 1) examples in batches of 32
        padded = sum(b["input_ids"].numel() for b in batches)
        real = sum(int((b["input_ids"] != pad).sum()) for b in batches)
        assert row[1] == f"{sum(b['input_ids'].shape[0] for b in batches) / 3:.1f}"
        assert row[2] == f"{padded / real:.2f}"
        assert (row[3], row[4]) == (f"{1 / 3:.3f}", "1.000")  # one second per loader built or per step timed
    assert rows[0][1] == rows[1][1] == "32.0"
    assert all(b["input_ids"].shape[1] <= 256 for b in built[2]) and any(b["input_ids"].shape[0] < 32 for b in built[2])


def test_scoring_flops_refuses_a_prompt_without_text_after_the_image(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scoring_flops.py", "--text-tokens", "1"])
    with pytest.raises(SystemExit):
        scoring_flops.main()
    assert "--text-tokens 1: the prompt needs BOS and at least one text token after the image" in capsys.readouterr().err
