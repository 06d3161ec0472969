"""scripts/accm_captions.py on a run directory holding a tiny random base and a freshly exported ACCM plug-in."""

from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import accm_captions  # noqa: E402
from test_benchmarks_smoke import save_default_grid_base  # noqa: E402

NUM_CANDIDATES = 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`<run>/base_model` and the plug-in `make demo` would leave at `<run>/accm_r0.969/plugin.safetensors`."""
    from transformers import AutoProcessor

    from lightning_modules.compensation import export_plugin_weights
    from lvlm_prune.accm.compensation import ACCMCompensation
    from lvlm_prune.engine import PrunedLlava
    from lvlm_prune.modeling.loading import freeze, load_base_model

    run = tmp_path_factory.mktemp("accm_run")
    base = save_default_grid_base(run / "base_model")
    torch.manual_seed(0)
    plugin = ACCMCompensation(target_prune_ratio=0.969, caption_embed_dim=16, caption_num_layers=1, caption_num_heads=2,
                              caption_prefix_length=2, caption_mapper_layers=1, max_caption_tokens=4,
                              num_candidates=NUM_CANDIDATES, selector_hidden=16, selector_heads=2)
    plugin.attach(PrunedLlava(freeze(load_base_model(str(base)))), AutoProcessor.from_pretrained(str(base)).tokenizer)
    export_plugin_weights(plugin, run / "accm_r0.969" / "plugin.safetensors", {})
    return run


def captions_output(run_dir, monkeypatch, capsys, *args) -> list[str]:
    monkeypatch.setattr(sys, "argv", ["accm_captions.py", "--run-dir", str(run_dir), *map(str, args)])
    accm_captions.main()
    return capsys.readouterr().out.splitlines()


def test_the_shown_questions_their_references_and_the_summary_lines(run_dir, monkeypatch, capsys):
    from datamodules.synthetic import SyntheticVQADataModule

    lines = captions_output(run_dir, monkeypatch, capsys, "--num", 3, "--show", 2)
    plugin = run_dir / "accm_r0.969" / "plugin.safetensors"
    assert lines[0] == (f"plug-in {plugin} (target_prune_ratio 0.969, vision_selection prumerge, "
                        f"text_fraction {2 / 3})")
    test = SyntheticVQADataModule(processor_path=str(run_dir / "base_model"), num_test=3).samples("test")
    shown = [i for i, line in enumerate(lines) if " -> " in line]
    assert [lines[i] for i in shown] == [f"{s.question} -> {s.answer}" for s in test[:2]]
    for i, sample in zip(shown, test):
        assert lines[i + 1] == f"  reference : {sample.relevant_description}"
        assert lines[i + 2].startswith("  base      : ")
        candidates = re.fullmatch(r"  candidates: (\[.*\]) \(selector: (\d)\)", lines[i + 3])
        assert len(ast.literal_eval(candidates.group(1))) == NUM_CANDIDATES
        assert int(candidates.group(2)) < NUM_CANDIDATES

    summary = re.fullmatch(r"3 test questions at r = 0\.969: base descriptions exact (\S+), selected captions exact "
                           r"(\S+), distinct selected captions (\d+)", lines[-2])
    base_exact, picked_exact, distinct = float(summary[1]), float(summary[2]), int(summary[3])
    assert all(round(3 * rate) == pytest.approx(3 * rate, abs=0.002) for rate in (base_exact, picked_exact))
    assert 1 <= distinct <= 3
    nll = re.fullmatch(r"caption model NLL per token of the warm-start targets: own image (\S+), zero visual tokens "
                       r"(\S+), another image (\S+), another question (\S+)", lines[-1])
    assert all(math.isfinite(float(value)) and float(value) > 0 for value in nll.groups())


def test_one_question_has_no_other_to_swap_with_and_scores_its_own_inputs_only(run_dir, monkeypatch, capsys):
    lines = captions_output(run_dir, monkeypatch, capsys, "--num", 1, "--show", 0)
    assert not any(" -> " in line for line in lines)
    assert lines[-2].startswith("1 test questions at r = 0.969: ")
    nll = re.fullmatch(r"caption model NLL per token of the warm-start targets: own image (\S+), zero visual tokens "
                       r"(\S+)", lines[-1])
    assert all(math.isfinite(float(value)) for value in nll.groups())


def test_the_exact_match_rates_and_distinct_count_follow_the_printed_captions(run_dir, monkeypatch, capsys):
    from datamodules.synthetic import SyntheticVQADataModule
    from lvlm_prune.accm.compensation import ACCMCompensation

    test = SyntheticVQADataModule(processor_path=str(run_dir / "base_model"), num_test=3).samples("test")
    descriptions = [test[0].relevant_description, "red", "red"]  # only the first question's base description is exact

    def described(self, engine, batch, selection):
        rows = [self.caption_tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_token_id]
                for text in descriptions]
        tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row)
        return tokens, (tokens != 0).long()

    real_selector_scores = ACCMCompensation.selector_scores

    def selector_preferring_candidate_b(self, batch, candidates):  # question b picks candidate b (mod M)
        scores, lengths = real_selector_scores(self, batch, candidates)
        return torch.eye(scores.shape[1])[torch.arange(scores.shape[0]) % scores.shape[1]], lengths

    monkeypatch.setattr(ACCMCompensation, "warm_start_captions", described)
    monkeypatch.setattr(ACCMCompensation, "selector_scores", selector_preferring_candidate_b)
    lines = captions_output(run_dir, monkeypatch, capsys, "--num", 3, "--show", 3)
    shown = [i for i, line in enumerate(lines) if " -> " in line]
    assert [lines[i + 2] for i in shown] == [f"  base      : {text}" for text in descriptions]
    selected = []
    for b, i in enumerate(shown):
        candidates = re.fullmatch(r"  candidates: (\[.*\]) \(selector: (\d)\)", lines[i + 3])
        assert int(candidates.group(2)) == b
        selected.append(ast.literal_eval(candidates.group(1))[b])
    assert len(set(selected)) > 1
    picked_exact = sum(text == sample.relevant_description for text, sample in zip(selected, test)) / 3
    assert lines[-2] == (f"3 test questions at r = 0.969: base descriptions exact 0.333, selected captions exact "
                         f"{picked_exact:.3f}, distinct selected captions {len(set(selected))}")


def test_the_nll_check_scores_the_base_descriptions_with_each_condition(run_dir, monkeypatch, capsys):
    from lvlm_prune.accm.caption_model import CaptionModel

    inputs = []
    real_logprobs = CaptionModel.caption_token_logprobs

    def recorded_logprobs(self, ids, mask, visual, visual_mask, *args, **kwargs):
        inputs.append((ids, visual))
        return real_logprobs(self, ids, mask, visual, visual_mask, *args, **kwargs)

    monkeypatch.setattr(CaptionModel, "caption_token_logprobs", recorded_logprobs)
    calls = []
    real_target_nll = accm_captions.target_nll

    def recorded_target_nll(accm, batch, selection, described, described_mask):
        scores = real_target_nll(accm, batch, selection, described, described_mask)
        calls.append((described_mask.sum().item(), scores))
        return scores

    monkeypatch.setattr(accm_captions, "target_nll", recorded_target_nll)
    lines = captions_output(run_dir, monkeypatch, capsys, "--num", 2, "--show", 0)
    ((target_tokens, scores),) = calls
    assert set(scores) == {"own image", "zero visual tokens", "another image", "another question"}
    assert all(tokens == target_tokens > 0 for _, tokens in scores.values())
    printed = dict(part.rsplit(" ", 1) for part in lines[-1].split(": ", 1)[1].split(", "))
    assert printed == {name: f"{summed / tokens:.3f}" for name, (summed, tokens) in scores.items()}
    (own_ids, own_visual), (zero_ids, zero_visual), (image_ids, image_visual), (question_ids, question_visual) = inputs
    assert torch.equal(zero_ids, own_ids) and not zero_visual.any() and own_visual.any()
    assert torch.equal(image_ids, own_ids) and torch.equal(image_visual, own_visual.roll(1, 0))
    assert torch.equal(question_ids, own_ids.roll(1, 0)) and torch.equal(question_visual, own_visual)
    assert not torch.equal(own_ids, own_ids.roll(1, 0)) and not torch.equal(own_visual, own_visual.roll(1, 0))


def test_a_missing_plugin_is_reported_with_its_path(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"no ACCM plug-in at '.*accm_r0\.969/plugin\.safetensors': run `make demo`"):
        captions_output(tmp_path, monkeypatch, capsys)
