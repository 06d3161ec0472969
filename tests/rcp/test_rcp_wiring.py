"""RCP's wiring into the engine and the training step: which tokens the pruners' decisions keep, what the repair loss
compares, where the repair adapter acts, and what attention the pruners read."""


import pytest
import torch

from datamodules.synthetic import SyntheticVQADataModule
from lvlm_prune.data import IGNORE_INDEX, answer_generation_mask
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.modeling.loading import freeze, load_base_model
from lvlm_prune.rcp.compensation import RCPCompensation, RCPPruning

PLUGIN_ARGS = dict(target_prune_ratio=0.75, pruning_layers=[0, 1, 2], repair_layers=[2, 3], bottleneck=16,
                   num_queries=4, context_dim=16, adapter_bottleneck=8)


@pytest.fixture(scope="module")
def data(tiny_base_dir):
    from conftest import TINY_DATA_ARGS

    return SyntheticVQADataModule(processor_path=str(tiny_base_dir), **TINY_DATA_ARGS)


@pytest.fixture(scope="module")
def batch(data):
    return next(iter(data.train_dataloader()))


@pytest.fixture
def setup(tiny_base_dir, batch):
    torch.manual_seed(0)
    engine = PrunedLlava(freeze(load_base_model(tiny_base_dir)))
    plugin = RCPCompensation(**PLUGIN_ARGS)
    plugin.attach(engine)
    return engine, plugin, batch


def perturb(modules, scale=0.3, seed=0):
    """Random non-zero weights on top of the initial ones: spread-out pruner logits, non-identity adapters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))


def record_pruners(plugin):
    """Hooks on every pruner: a list per pruner of (visual, q2v, question, question_mask, previous, logits)."""
    seen = [[] for _ in plugin.pruners]
    handles = [pruner.register_forward_hook(
        lambda module, args, output, i=i: seen[i].append(tuple(a.detach().clone() for a in args) + (output.detach(),)))
        for i, pruner in enumerate(plugin.pruners)]
    return seen, handles


def present_after(state, n):
    """(B, N) bool: the visual tokens physically present in an engine state."""
    present = torch.zeros(state.visual_index.shape[0], n, dtype=torch.bool)
    rows, cols = ((state.visual_index >= 0) & state.key_valid).nonzero(as_tuple=True)
    present[rows, state.visual_index[rows, cols]] = True
    return present


def reference_top_k(logits, candidates, k):
    """The k highest logits among the candidates of each row, by a plain per-row sort."""
    expected = torch.zeros_like(candidates)
    for row in range(logits.shape[0]):
        index = candidates[row].nonzero().flatten()
        best = index[logits[row, index].argsort(descending=True)[:k]]
        expected[row, best] = True
    return expected


def prompt_args(batch):
    return batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"], batch["prompt_position_ids"]


# ---------------------------------------------------------------------------------------------- 1. which tokens stay
def check_kept_sets(plugin, method, seen, out, n, rule):
    """At every pruning layer the cumulative mask is `rule(logits, previous)`; the next pruner is handed it as its
    running mask and sees exactly those tokens (absent ones are zero rows); after the last, the engine's state holds
    exactly the last kept set."""
    expected_sets = []
    for i in range(len(plugin.pruners)):
        assert len(seen[i]) == 1
        visual, _, _, _, previous, logits = seen[i][0]
        present = visual.abs().sum(-1) > 0  # the tokens the engine still carries at this layer
        assert torch.equal(present, previous > 0.5), f"pruner {i}: running mask != tokens physically present"
        if i:
            assert torch.equal(previous > 0.5, expected_sets[-1])
        expected = rule(i, logits, previous > 0.5)
        assert not (expected & ~(previous > 0.5)).any()
        assert torch.equal(method.cumulative[i] > 0.5, expected), f"pruner {i} kept the wrong tokens"
        expected_sets.append(expected)
    assert torch.equal(present_after(out.state, n), expected_sets[-1])
    return expected_sets


def test_budgeted_inference_keeps_the_k_highest_logits_among_the_tokens_still_present(setup):
    engine, plugin, batch = setup
    perturb(plugin.pruners)  # spread-out, untied logits
    n = engine.info.num_visual_tokens
    counts = plugin.keep_counts(0.6)
    assert counts[0] < n and all(b < a for a, b in zip(counts, counts[1:]))  # every layer drops tokens of its own
    method = engine.bind(plugin.inference_method(0.6))
    seen, handles = record_pruners(plugin)
    with torch.no_grad():
        out = engine(*prompt_args(batch), method=method, logits="none")
    for handle in handles:
        handle.remove()
    sets = check_kept_sets(plugin, method, seen, out, n, lambda i, logits, present: reference_top_k(logits, present,
                                                                                                        counts[i]))
    assert [s.sum(1).tolist() for s in sets] == [[k] * s.shape[0] for k, s in zip(counts, sets)]


def test_threshold_inference_keeps_exactly_the_tokens_whose_logit_clears_the_threshold(setup):
    engine, plugin, batch = setup
    perturb(plugin.pruners)
    n = engine.info.num_visual_tokens
    # each pruner's bias set so that it drops about half of the tokens still present at its layer
    for i, pruner in enumerate(plugin.pruners):
        seen, handles = record_pruners(plugin)
        with torch.no_grad():
            engine(*prompt_args(batch), method=plugin.inference_method(), logits="none")
        for handle in handles:
            handle.remove()
        _, _, _, _, previous, logits = seen[i][0]
        values = logits[previous > 0.5].sort().values
        middle = len(values) // 2
        pruner.bias.data -= (values[middle - 1] + values[middle]) / 2
    method = engine.bind(plugin.inference_method())
    seen, handles = record_pruners(plugin)
    with torch.no_grad():
        out = engine(*prompt_args(batch), method=method, logits="none")
    for handle in handles:
        handle.remove()
    sets = check_kept_sets(plugin, method, seen, out, n, lambda i, logits, present: present & (logits > 0))
    for earlier, later in zip([torch.ones_like(sets[0])] + sets, sets):
        assert 0 < later.sum() < earlier.sum()  # each layer keeps some tokens and drops some of its own


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_tokens_whose_keep_score_is_raised_survive_budgeted_pruning_and_lowered_ones_go(setup, ratio):
    engine, plugin, batch = setup
    favoured, unfavoured = [2, 9, 13], [0, 5, 11]
    assert min(plugin.keep_counts(ratio)) >= len(favoured)

    def shift(module, args, logits):
        logits = logits.clone()
        logits[:, favoured] += 100.0
        logits[:, unfavoured] -= 100.0
        return logits

    handles = [pruner.register_forward_hook(shift) for pruner in plugin.pruners]
    method = engine.bind(plugin.inference_method(ratio))
    with torch.no_grad():
        out = engine(*prompt_args(batch), method=method, logits="none")
    for handle in handles:
        handle.remove()
    kept = present_after(out.state, engine.info.num_visual_tokens)
    assert kept[:, favoured].all() and not kept[:, unfavoured].any()
    assert (kept.sum(1) == plugin.keep_counts(ratio)[-1]).all()


# ---------------------------------------------------------------------------------- 2. what the repair loss compares
def test_the_training_steps_repair_loss_compares_with_the_full_token_teacher_at_answer_generation_positions(
        tiny_base_dir, data, batch, monkeypatch, stand_in_trainer):
    from lightning_modules.compensation import CompensationModule
    from lvlm_prune.rcp import compensation

    torch.manual_seed(0)
    module = CompensationModule(str(tiny_base_dir), RCPCompensation(**PLUGIN_ARGS), processor=data.processor,
                                categories=data.categories)
    plugin, engine = module.compensation, module.engine
    perturb(plugin.adapters)  # a non-identity repair: any pruned pass differs from the full one
    for pruner in plugin.pruners:  # logits around 0: noise or threshold drop about half the tokens
        pruner.bias.data.zero_()
    stand_in_trainer(module, accumulate_grad_batches=1, world_size=1, estimated_stepping_batches=10, global_step=3)
    calls = []
    original = compensation.repair_loss

    def recording(student, teacher, mask, *args, **kwargs):
        calls.append((student.detach().clone(), teacher.detach().clone(), mask.clone()))
        return original(student, teacher, mask, *args, **kwargs)

    monkeypatch.setattr(compensation, "repair_loss", recording)
    module.train()
    loss = module.training_step(batch, 0)
    assert loss is not None and torch.isfinite(loss)
    assert len(calls) == len(plugin.repair_layers)

    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"])
    with torch.no_grad():
        full = engine(*args, labels=batch["labels"], capture_layers=tuple(plugin.repair_layers), logits="none")
    answers = answer_generation_mask(batch["labels"])
    assert answers.any(1).all() and not torch.equal(answers, batch["attention_mask"].bool())
    for layer, (student, teacher, mask) in zip(plugin.repair_layers, calls):
        assert mask.dtype == torch.bool and torch.equal(mask, answers)
        torch.testing.assert_close(teacher, full.captured[layer], atol=1e-6, rtol=1e-6)
        # the student is a pruned, repaired pass: it is not the teacher (else the comparison above proves nothing)
        assert (student[answers] - teacher[answers]).abs().max() > 1e-3


# -------------------------------------------------------------------------------- 3. where the repair adapter acts
@pytest.mark.parametrize("path", ["physical", "soft"])
def test_the_repair_adapter_changes_only_the_answer_generation_positions(setup, path):
    engine, plugin, batch = setup
    perturb([*plugin.adapters, *plugin.context_encoders.values()], scale=0.5)
    repair = tuple(plugin.repair_layers)
    assert repair == (2, 3)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"])

    def run():
        if path == "physical":
            method = plugin.inference_method(0.6)
        else:
            method = RCPPruning(plugin, training=True, temperature=0.2, noise=False)
        with torch.no_grad():
            return engine(*args, labels=batch["labels"], method=method, soft=path == "soft", capture_layers=repair,
                          logits="none")

    repaired = run()
    plugin.use_adapter = False
    plain = run()
    plugin.use_adapter = True
    answers = answer_generation_mask(batch["labels"])
    real = batch["attention_mask"].bool()
    first, second = repaired.captured[2], plain.captured[2]
    # the first repair layer: every other position is left exactly as the layer computed it
    assert torch.equal(first[~answers], second[~answers])
    assert ((first - second).abs().amax(-1)[answers] > 1e-3).all()
    assert (real & ~answers).sum() > answers.sum()  # most real positions are not answer positions
    # the second: positions before a sample's first answer position cannot see the first repair either
    before = torch.arange(answers.shape[1])[None] < answers.float().argmax(1, keepdim=True)
    assert torch.equal(repaired.captured[3][before], plain.captured[3][before])


# ------------------------------------------------------------------ 4. the attention the pruners read
@pytest.mark.parametrize("prompt_only", [True, False])
def test_pruners_read_the_question_to_visual_attention_that_eager_attention_gives(tiny_base_dir, batch, prompt_only):
    torch.manual_seed(0)
    model = freeze(load_base_model(tiny_base_dir, attn_implementation="eager"))
    engine = PrunedLlava(model)
    plugin = RCPCompensation(**PLUGIN_ARGS)
    plugin.attach(engine)
    for pruner in plugin.pruners:  # keep every token: each pruning layer sees the full sequence
        pruner.bias.data.fill_(50.0)
    if prompt_only:
        ids, mask, pixels, position_ids = prompt_args(batch)
        labels = None
    else:
        ids, mask, pixels, position_ids = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                           batch["position_ids"])
        labels = batch["labels"]
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, pixel_values=pixels,
                      output_attentions=True).attentions
        seen, handles = record_pruners(plugin)
        engine(ids, mask, pixels, position_ids, labels=labels, method=plugin.inference_method(), logits="none")
        for handle in handles:
            handle.remove()
    image = ids == engine.image_token_id
    real = mask.bool()
    positions = torch.arange(ids.shape[1])
    for i, layer in enumerate(plugin.pruning_layers):
        q2v = seen[i][0][1]
        for b in range(ids.shape[0]):
            # question = real text after the image, before the last prompt token (which with labels is the first
            # answer-generation position, and the answer after it)
            last_image = positions[image[b]].max()
            last_prompt = (positions[real[b]].max() if labels is None
                           else positions[labels[b] != IGNORE_INDEX].min() - 1)
            question = real[b] & (positions > last_image) & (positions < last_prompt)
            assert question.sum() >= 3
            expected = eager[layer][b][:, question][:, :, image[b]].mean(0).mean(0)
            assert (expected.max() - expected.min()) > 1e-3  # not uniform: a uniform input would not pass
            torch.testing.assert_close(q2v[b], expected.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("changes, encoders", [({}, ["0", "1", "2"]), ({"use_adapter": False}, []),
                                              ({"pruning_layers": [0, 3], "repair_layers": [2]}, ["0"])])
def test_every_plug_in_parameter_gets_a_gradient_in_a_training_step(tiny_base_dir, batch, changes, encoders):
    # plain DDP fails on a parameter without a gradient: a pruning layer no adapter reads has no context encoder
    torch.manual_seed(0)
    engine = PrunedLlava(freeze(load_base_model(tiny_base_dir)))
    plugin = RCPCompensation(**{**PLUGIN_ARGS, **changes})
    plugin.attach(engine)
    assert sorted(plugin.context_encoders) == encoders and not plugin.leaves_parameters_unused
    perturb([*plugin.adapters, *plugin.context_encoders.values()])  # zero-initialised outputs would stop gradients
    plugin.training_losses(engine, batch, progress=0.1)["loss"].backward()
    missing = [name for name, p in plugin.named_parameters() if p.grad is None]
    assert not missing
