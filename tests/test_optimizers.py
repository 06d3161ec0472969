import copy

import pytest
import torch

from conftest import make_batch
from lvlm_prune.modeling.optimizers import MuonWithAdamW, build_optimizer, muon_parameter_names
from lvlm_prune.rcp.schedules import WarmupCosineLambda


def _loss(model, spec):
    ids, mask, pixels = make_batch(spec)
    logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_muon_takes_the_block_and_projector_matrices_and_nothing_else(tiny_llava):
    names = muon_parameter_names(tiny_llava)
    shapes = dict(tiny_llava.named_parameters())
    assert names and all(shapes[n].ndim == 2 for n in names)
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in names)
    assert any("language_model.layers.0.mlp.down_proj" in n for n in names)
    assert any("vision_tower" in n and "fc1" in n for n in names)
    assert any("multi_modal_projector.linear_1" in n for n in names)
    assert not any("embed" in n or "lm_head" in n or "norm" in n for n in names)
    # exactly: every matrix of a transformer block (LLM: q, k, v, o, gate, up, down; vision: q, k, v, out, fc1, fc2)
    # and of the projector
    blocks = {n for n, p in shapes.items() if p.ndim == 2 and (".layers." in n or "multi_modal_projector" in n)}
    assert names == blocks and len(names) == 4 * 7 + 2 * 6 + 2


class TiedModel(torch.nn.Module):
    """An output head sharing the embedding's weight; `accessor=False` hides the head from
    `get_output_embeddings`, so the tie must be found through the Embedding."""

    def __init__(self, accessor: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.hidden = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.accessor = accessor

    def get_output_embeddings(self):
        return self.head if self.accessor else None


@pytest.mark.parametrize("accessor", [True, False])
def test_tied_output_embeddings_stay_with_adamw(accessor):
    assert muon_parameter_names(TiedModel(accessor)) == {"hidden.weight"}


def test_adamw_keeps_the_layout_of_the_committed_runs(tiny_llava):
    optimizer = build_optimizer(tiny_llava, "adamw", lr=1e-3, weight_decay=0.01)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.98)
    decay, no_decay = optimizer.param_groups
    assert [id(p) for p in decay["params"]] == [id(p) for p in tiny_llava.parameters() if p.ndim >= 2]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in tiny_llava.parameters() if p.ndim < 2]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)


def test_every_trainable_parameter_is_in_exactly_one_group(tiny_llava):
    tiny_llava.model.vision_tower.requires_grad_(False)
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.01)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    trainable = [id(p) for p in tiny_llava.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable)
    assert len(optimizer.muon.param_groups[0]["params"]) > 0


def test_scheduler_learning_rate_reaches_both_inner_optimizers(tiny_llava):
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosineLambda(10, 4, 0.1))
    for _ in range(2):
        optimizer.step()
        schedule.step()
    expected = 1e-3 * WarmupCosineLambda(10, 4, 0.1)(2)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(expected)
    assert all(g["lr"] == pytest.approx(expected) for g in optimizer.adamw.param_groups)


def test_a_scheduler_made_before_loading_still_reaches_both_inner_optimizers(tiny_llava):
    saved = build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.01).state_dict()
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # as Lightning: scheduler, then load
    optimizer.load_state_dict(saved)
    schedule.step()
    assert [g["lr"] for g in optimizer.muon.param_groups + optimizer.adamw.param_groups] == [5e-4] * 3


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_few_steps_lower_the_loss(tiny_spec, name):
    from conftest import make_tiny_llava

    model = make_tiny_llava(tiny_spec).train()
    optimizer = build_optimizer(model, name, lr=3e-3, weight_decay=0.0)
    first = _loss(model, tiny_spec).item()
    for _ in range(8):
        optimizer.zero_grad()
        _loss(model, tiny_spec).backward()
        optimizer.step()
    assert _loss(model, tiny_spec).item() < first - 0.1


def test_state_dict_round_trip_resumes_the_same_trajectory(tiny_spec):
    from conftest import make_tiny_llava

    def train(model, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            _loss(model, tiny_spec).backward()
            optimizer.step()

    model = make_tiny_llava(tiny_spec).train()
    optimizer = build_optimizer(model, "muon", lr=3e-3, weight_decay=0.01)
    train(model, optimizer, 2)
    # state dicts hold live tensors that later steps update in place: copy them, as saving a checkpoint does
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, 2)

    resumed = make_tiny_llava(tiny_spec, seed=1).train()
    resumed.load_state_dict(saved_model)
    resumed_optimizer = build_optimizer(resumed, "muon", lr=3e-3, weight_decay=0.01)
    resumed_optimizer.load_state_dict(saved_optimizer)
    assert len(resumed_optimizer.state) == len(optimizer.state)
    for parameter in list(resumed_optimizer.state):  # what Lightning does when it moves the state to a device
        resumed_optimizer.state[parameter] = dict(resumed_optimizer.state[parameter])
    resumed_optimizer.state_dict()
    train(resumed, resumed_optimizer, 2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_a_group_added_later_is_trained_by_adamw(tiny_llava):
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-2, weight_decay=0.0)
    extra = torch.nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [extra]})
    assert optimizer.param_groups[-1] is optimizer.adamw.param_groups[-1]
    extra.grad = torch.ones(3)
    optimizer.step()
    # AdamW's first step moves each entry by the learning rate against its gradient's sign (bias-corrected moments)
    torch.testing.assert_close(extra.detach(), torch.full((3,), -1e-2))
    assert extra in optimizer.state and extra in optimizer.adamw.state and extra not in optimizer.muon.state


def test_state_lookups_create_nothing_and_a_deep_copy_still_steps(tiny_llava):
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.0)
    first = next(tiny_llava.parameters())
    assert first not in optimizer.state and len(optimizer.state) == 0
    copied = copy.deepcopy(optimizer)
    assert copied.param_groups[0] is copied.muon.param_groups[0]
    for group in copied.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.ones_like(parameter)
    copied.step()
    assert len(copied.state) == sum(len(g["params"]) for g in copied.param_groups) and len(optimizer.state) == 0


def test_loading_an_adamw_state_names_the_mismatch(tiny_llava):
    adamw_state = build_optimizer(tiny_llava, "adamw", lr=1e-3, weight_decay=0.0).state_dict()
    with pytest.raises(ValueError, match="optimizer: adamw"):
        build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.0).load_state_dict(adamw_state)


def test_unknown_optimizer_and_no_matrices_are_refused(tiny_llava):
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(tiny_llava, "sgd", lr=1e-3, weight_decay=0.0)
    with pytest.raises(ValueError, match="no 2-D weights"):
        MuonWithAdamW([], [{"params": [torch.nn.Parameter(torch.zeros(2))]}], lr=1e-3, weight_decay=0.0)


def test_muon_updates_have_adamws_rms_so_adamw_learning_rates_carry_over():
    layer = torch.nn.Linear(256, 256)
    before = layer.weight.detach().clone()
    optimizer = build_optimizer(layer, "muon", lr=0.01, weight_decay=0.0)
    layer.weight.grad = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    layer.bias.grad = torch.zeros(256)
    optimizer.step()
    rms = (layer.weight.detach() - before).pow(2).mean().sqrt().item()
    assert 0.12 * 0.01 < rms < 0.3 * 0.01  # AdamW's update RMS is about 0.2 lr


def test_the_betas_reach_the_adamw_half_of_muon():
    optimizer = build_optimizer(torch.nn.Linear(4, 4), "muon", lr=1e-3, weight_decay=0.0, betas=(0.8, 0.9))
    assert all(group["betas"] == (0.8, 0.9) for group in optimizer.adamw.param_groups)


def test_with_zero_gradients_a_muon_step_decays_every_matrix_and_no_vector(tiny_llava):
    before = {n: p.detach().clone() for n, p in tiny_llava.named_parameters()}
    optimizer = build_optimizer(tiny_llava, "muon", lr=0.1, weight_decay=0.5)
    for p in tiny_llava.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in tiny_llava.named_parameters():
        expected = before[name] * (0.95 if p.ndim >= 2 else 1.0)  # decoupled decay: 1 - lr * weight_decay
        torch.testing.assert_close(p.detach(), expected, msg=name)
    assert any("embed_tokens" in n for n in before) and muon_parameter_names(tiny_llava)


def test_state_of_a_group_added_later_can_be_read_and_replaced(tiny_llava):
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-2, weight_decay=0.0)
    extra = torch.nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [extra]})
    extra.grad = torch.ones(3)
    optimizer.step()
    read = optimizer.state[extra]
    assert read is optimizer.adamw.state[extra] and torch.equal(read["exp_avg"], torch.full((3,), 0.1))  # (1 - 0.9) g
    replaced = {key: value.clone() if torch.is_tensor(value) else value for key, value in read.items()}
    optimizer.state[extra] = replaced  # what Lightning does when it moves state to a device
    assert optimizer.state[extra] is replaced and optimizer.adamw.state[extra] is replaced
    assert extra not in optimizer.muon.state
    optimizer.step()  # the next step updates the state that replaced the old one
    torch.testing.assert_close(replaced["exp_avg"], torch.full((3,), 0.19))
    assert torch.equal(read["exp_avg"], torch.full((3,), 0.1))


def test_a_deep_copy_reads_and_writes_the_state_of_its_own_parameters(tiny_llava):
    copied = copy.deepcopy(build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.0))
    for group in copied.param_groups:
        for parameter in group["params"]:
            parameter.grad = torch.ones_like(parameter)
    copied.step()
    written = {}
    for group in copied.param_groups:
        for parameter in group["params"]:
            copied.state[parameter] = written[parameter] = dict(copied.state[parameter])
    assert len(copied.state) == sum(len(group["params"]) for group in copied.param_groups)
    # each write went to the inner optimizer that holds the parameter, and reads give it back
    for inner in (copied.muon, copied.adamw):
        for group in inner.param_groups:
            for parameter in group["params"]:
                assert inner.state[parameter] is written[parameter] and copied.state[parameter] is written[parameter]
    assert set(map(id, copied.state)) == set(map(id, written)) and not set(map(id, written)) & {
        id(p) for p in tiny_llava.parameters()}  # the copy's own parameters, not the model's


def test_step_runs_the_closure_and_returns_its_loss(tiny_llava):
    optimizer = build_optimizer(tiny_llava, "muon", lr=1e-3, weight_decay=0.0)
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(2.5)

    assert optimizer.step(closure).item() == 2.5 and calls == [1]


def test_muon_trains_a_model_whose_every_trainable_weight_is_a_muon_matrix():
    layer = torch.nn.Linear(4, 4, bias=False)
    optimizer = build_optimizer(layer, "muon", lr=1e-2, weight_decay=0.0)
    layer.weight.grad = torch.ones(4, 4)
    before = layer.weight.detach().clone()
    optimizer.step()
    step = before - layer.weight.detach()
    # an orthogonalised rank-one gradient: the same step down the gradient on every entry
    assert (step > 0).all() and torch.allclose(step, step[0, 0].expand(4, 4))
    # its state (with an empty AdamW half) survives a round trip, and training goes on from it as without one
    twin_layer = copy.deepcopy(layer)
    twin = build_optimizer(twin_layer, "muon", lr=1e-2, weight_decay=0.0)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    momentum = optimizer.state[layer.weight]["momentum_buffer"].clone()
    optimizer.load_state_dict(optimizer.state_dict())
    assert momentum.abs().sum() > 0 and torch.equal(optimizer.state[layer.weight]["momentum_buffer"], momentum)
    assert torch.equal(twin.state[twin_layer.weight]["momentum_buffer"], momentum)
    layer.weight.grad, twin_layer.weight.grad = -3 * torch.ones(4, 4), -3 * torch.ones(4, 4)
    optimizer.step()
    twin.step()
    assert torch.equal(layer.weight, twin_layer.weight)
