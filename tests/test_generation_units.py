"""stock_greedy_generate against a scripted model: the positions and masks it feeds, when it stops, its padding."""

from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from lvlm_prune.generation import stock_greedy_generate
from lvlm_prune.modeling.compat import CACHE_ARGUMENT, cache_argument

VOCAB = 10


class ScriptedModel:
    """Answers forward `i` with logits whose argmax is `script[i]` (one token per row), recording its inputs."""

    def __init__(self, script):
        self.script, self.calls = script, []
        self.config = SimpleNamespace(get_text_config=lambda: LlamaConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1))

    def __call__(self, **inputs):
        self.calls.append(inputs)
        tokens = torch.tensor(self.script[len(self.calls) - 1])
        logits = torch.nn.functional.one_hot(tokens, VOCAB).float()[:, None, :]
        return SimpleNamespace(logits=logits, **cache_argument(inputs[CACHE_ARGUMENT]))


def left_padded_prompt():
    ids = torch.tensor([[0, 0, 5, 6], [4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    return ids, mask, torch.zeros(2, 3, 4, 4)


def test_positions_count_real_tokens_and_continue_after_the_prompt():
    model = ScriptedModel([[3, 3], [4, 4], [5, 5]])
    ids, mask, pixels = left_padded_prompt()
    tokens = stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=3)
    assert tokens.tolist() == [[3, 4, 5], [3, 4, 5]]
    prefill, first, second = model.calls
    assert prefill["position_ids"].tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]  # padding at 0, never negative
    assert first["position_ids"].tolist() == [[2], [4]] and second["position_ids"].tolist() == [[3], [5]]
    assert first["input_ids"].tolist() == [[3], [3]]
    assert second["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]


def test_generation_stops_once_every_row_has_ended_and_pads_ended_rows_with_zero_by_default():
    eos = 9
    model = ScriptedModel([[eos, 3], [4, eos], [5, 5], [6, 6]])
    ids, mask, pixels = left_padded_prompt()
    tokens = stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=4, eos_token_id=eos)
    assert tokens.tolist() == [[eos, 0], [3, eos]]  # row 0 ended at step 0: its step-1 token is padding
    assert len(model.calls) == 2


def test_without_an_eos_token_every_row_runs_to_the_limit():
    model = ScriptedModel([[9, 9], [9, 9]])
    ids, mask, pixels = left_padded_prompt()
    tokens = stock_greedy_generate(model, ids, mask, pixels, max_new_tokens=2, pad_token_id=7)
    assert tokens.tolist() == [[9, 9], [9, 9]] and len(model.calls) == 2
