"""ACCM with pretrained parts from local directories: a GPT-2 caption decoder in its own vocabulary
(caption_decoder_path) and a frozen CLIP text encoder for the selector (selector_encoder: clip_text). Tiny random
checkpoints with offline word-level tokenizers, saved to tmp_path; nothing is downloaded."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from lvlm_prune.accm.compensation import ACCMCompensation
from lvlm_prune.flops import module_flops

import test_accm_compensation as tiny_lvlm

RATIO, WORDS = tiny_lvlm.RATIO, tiny_lvlm.WORDS
setup = tiny_lvlm.setup  # the tiny LVLM fixture, shared
unfrozen_base = tiny_lvlm.unfrozen_base  # its base left trainable for one test

EOT, SOT, UNK = "<|endoftext|>", "<|startoftext|>", "[UNK]"


def word_tokenizer(specials: list[str], words: list[str], template: str | None = None,
                   **tokens: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    if template:
        backend.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, **tokens)


def save_tiny_gpt2(directory, words=WORDS, n_embd=32, n_layer=2, n_head=2, missing_rows=0, seed=1):
    """GPT-2 layout: one EOS that is also BOS, no pad token; the words in reverse order (ids unlike the LVLM's), and
    '<image>' as an ordinary added token (so a caption can spell it)."""
    tokenizer = word_tokenizer([EOT, UNK], sorted(set(words), reverse=True), bos_token=EOT, eos_token=EOT)
    tokenizer.add_tokens(["<image>"])
    config = GPT2Config(vocab_size=len(tokenizer) - missing_rows, n_positions=64, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def save_tiny_clip(directory, words=WORDS, hidden=16, layers=1, kind="projection", max_positions=24, seed=2):
    """CLIP layout: BOS/EOS added around every text, pad = EOS; kind 'projection' (CLIPTextModelWithProjection),
    'plain' (CLIPTextModel) or 'full' (a whole CLIPModel with a vision tower)."""
    words = sorted({w.lower() for w in words} | {"question", "supplemental", "information", ":"})
    tokenizer = word_tokenizer([SOT, EOT, UNK], words, template=f"{SOT} $A {EOT}", bos_token=SOT, eos_token=EOT,
                               pad_token=EOT)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=max_positions,
                            projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    if kind == "full":
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=8, patch_size=4)
        model = CLIPModel(CLIPConfig(text_config=config.to_dict(), vision_config=vision.to_dict(), projection_dim=8))
    else:
        model = (CLIPTextModelWithProjection if kind == "projection" else CLIPTextModel)(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {"gpt2": save_tiny_gpt2(root / "gpt2"), "clip": save_tiny_clip(root / "clip"),
            "clip_big": save_tiny_clip(root / "clip_big", hidden=32, layers=2),
            "clip_plain": save_tiny_clip(root / "clip_plain", kind="plain"),
            "clip_full": save_tiny_clip(root / "clip_full", kind="full"),
            "gpt2_short_table": save_tiny_gpt2(root / "gpt2_short_table", missing_rows=1)}


def make_plugin(engine, tokenizer, **overrides):
    torch.manual_seed(0)
    kwargs = dict(target_prune_ratio=RATIO, caption_prefix_length=2, caption_mapper_layers=1, caption_dropout=0.0,
                  max_caption_tokens=6, max_instruction_tokens=16, selector_hidden=16, selector_heads=2,
                  selector_question_prefix="question :", selector_supplement_prefix="supplemental information :",
                  context_prefix="additional information :", warmup_fraction=0.5)
    kwargs.update(overrides)
    plugin = ACCMCompensation(**kwargs)
    plugin.attach(engine, tokenizer)
    return plugin


def lvlm_ids(tokenizer, text):
    special = set(tokenizer.all_special_ids)
    return [t for t in tokenizer(text, add_special_tokens=False)["input_ids"] if t not in special] if text else []


def test_the_caption_decoder_starts_from_the_checkpoint_in_its_own_vocabulary(setup, paths):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_decoder_path=paths["gpt2"])
    checkpoint = GPT2LMHeadModel.from_pretrained(paths["gpt2"])
    state = plugin.caption_model.decoder.state_dict()
    assert state.keys() == checkpoint.state_dict().keys()
    for key, value in checkpoint.state_dict().items():
        assert torch.equal(state[key], value), key
    caption_tokenizer = plugin.caption_tokenizer
    assert plugin.caption_model.vocab_size == len(caption_tokenizer) != len(tokenizer)
    assert plugin.caption_model.decoder.config.n_embd == 32 and plugin.caption_model.max_length == 64
    # GPT-2: no pad, BOS = EOS; candidates pad with EOS and never contain the other special tokens
    assert plugin.caption_eos_token_id == plugin.caption_pad_token_id == caption_tokenizer.eos_token_id == 0
    assert plugin.caption_suppressed_token_ids == [caption_tokenizer.convert_tokens_to_ids(UNK)]
    ids, mask = plugin.instructions(batch["questions"], torch.device("cpu"))
    describe = "describe the objects that matter for : " + batch["questions"][0]
    expected = caption_tokenizer(describe, add_special_tokens=False)["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == expected != tokenizer(describe, add_special_tokens=False)["input_ids"]
    # the checkpoint fixes the shape: equal values pass, other values are refused before anything loads
    make_plugin(engine, tokenizer, caption_decoder_path=paths["gpt2"], caption_embed_dim=32, caption_num_layers=2)
    with pytest.raises(ValueError, match=r"caption_embed_dim=64 conflicts with caption_decoder_path=.*n_embd=32"):
        make_plugin(engine, tokenizer, caption_decoder_path=paths["gpt2"], caption_embed_dim=64)
    with pytest.raises(ValueError, match="exceeds the 64 positions of caption_decoder_path"):
        make_plugin(engine, tokenizer, caption_decoder_path=paths["gpt2"], max_instruction_tokens=60)


def test_captions_reach_the_lvlm_prompt_as_lvlm_tokens(setup, paths):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_decoder_path=paths["gpt2"])
    caption_tokenizer = plugin.caption_tokenizer
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    num = candidates.lengths.shape[1]
    spliced = plugin.spliced_teacher_forced(batch, candidates)
    translated = 0
    for b in range(3):
        for m in range(num):
            tokens = candidates.token_ids[b, m, : int(candidates.lengths[b, m])].tolist()
            assert tokens[-1] == caption_tokenizer.eos_token_id
            text = caption_tokenizer.decode(tokens[:-1], skip_special_tokens=True)
            caption = lvlm_ids(tokenizer, text)
            translated += caption != tokens[:-1]
            row = b * num + m
            ids = spliced.input_ids[row][spliced.attention_mask[row].bool()].tolist()
            last_image = max(i for i, t in enumerate(ids) if t == plugin.image_token_id)
            insert = plugin.context_prefix_ids + caption
            assert ids[last_image + 1: last_image + 1 + len(insert)] == insert
            assert ids.count(plugin.image_token_id) == 16
    assert translated > 0
    # a caption that spells the image token adds no image token to the prompt
    spelled = [caption_tokenizer.convert_tokens_to_ids(w) for w in ("red", "<image>", "square")]
    assert caption_tokenizer.decode(spelled) == "red <image> square"
    assert plugin.lvlm_caption_ids(spelled) == tokenizer("red square", add_special_tokens=False)["input_ids"]
    # inference splices the selected candidate the same way and counts its LVLM tokens
    args = (engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id)
    alone, result = plugin.generate(*args, variant="accm_prune_only"), plugin.generate(*args)
    pick = plugin.selector_scores(batch, candidates)[0].argmax(-1)
    expected = [len(plugin.context_prefix_ids) + len(plugin.lvlm_caption_ids(plugin.candidate_tokens(candidates, b,
                                                                                                     int(pick[b]))))
                for b in range(3)]
    assert (result.text_tokens - alone.text_tokens).tolist() == expected


def test_warm_start_targets_are_the_lvlm_descriptions_re_tokenized(setup, paths):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_decoder_path=paths["gpt2"])
    caption_tokenizer = plugin.caption_tokenizer
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    targets, target_mask = plugin.warm_start_captions(engine, batch, selection)
    prompts, prompt_mask = plugin.describe_prompts(batch, [0, 1, 2])
    generated, _ = engine.generate(prompts, prompt_mask, batch["pixel_values"], max_new_tokens=6,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for b in range(3):
        row = generated[b].tolist()
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        text = tokenizer.decode(row, skip_special_tokens=True)
        words = [t for t in caption_tokenizer(text, add_special_tokens=False)["input_ids"]
                 if t not in caption_tokenizer.all_special_ids]
        assert targets[b][target_mask[b].bool()].tolist() == words[:5] + [caption_tokenizer.eos_token_id]
    # the caption model scores them in its own vocabulary
    ids, mask = plugin.instructions(batch["questions"], selection.features.device)
    logprobs, real = plugin.caption_model.caption_token_logprobs(ids, mask, plugin.caption_visual(selection),
                                                                 selection.discarded_mask, targets, target_mask)
    assert torch.isfinite(logprobs).all() and torch.equal(real, target_mask.bool())


def test_the_clip_encoder_is_frozen_outside_the_plugin(setup, paths, tmp_path):
    from lightning_modules.compensation import export_plugin_weights

    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, selector_encoder="clip_text", selector_encoder_path=paths["clip"])
    clip = plugin.text_encoder.model
    assert isinstance(clip, CLIPTextModelWithProjection) and not clip.training
    assert not any(p.requires_grad for p in clip.parameters())
    clip_ids = {id(p) for p in clip.parameters()}
    assert not clip_ids & {id(p) for p in plugin.parameters()}
    assert not any(k.startswith(("text_encoder", "text_model", "text_projection")) for k in plugin.state_dict())
    plugin.train()
    assert not clip.training
    path = export_plugin_weights(plugin, tmp_path / "plugin.safetensors", {})
    assert set(load_file(str(path))) == set(plugin.state_dict())
    assert json.loads((tmp_path / "plugin.safetensors.json").read_text())["config"]["selector_encoder_path"] == \
        paths["clip"]
    # the selector reads CLIP's text_embeds of "question : <q> supplemental information : <caption>", cut to CLIP's
    # 24 positions
    assert plugin.selector.input_proj[1].in_features == 8
    selection = plugin.select_visual_tokens(engine, batch, RATIO)
    candidates = plugin.caption_candidates(batch, selection)
    scores, lengths = plugin.selector_scores(batch, candidates)
    texts = [" ".join(plugin.selector_text_parts(batch["questions"][b],
                                                 tokenizer.decode(plugin.candidate_tokens(candidates, b, m))))
             for b in range(3) for m in range(3)]
    assert texts[0].startswith("question : what color is the object at 1 2 ? supplemental information :")
    encoded = plugin.text_encoder.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    assert lengths.flatten().tolist() == encoded["attention_mask"].sum(1).tolist()
    assert lengths.max() <= 24
    with torch.no_grad():
        expected = clip(**encoded).text_embeds
    torch.testing.assert_close(plugin.text_encoder(texts)[0], expected)
    assert scores.shape == (3, 3) and torch.isfinite(scores).all()
    long = plugin.text_encoder(["red " * 40])
    assert long[1].tolist() == [24] and torch.isfinite(long[0]).all()
    # a question too long for CLIP's positions is cut, not the caption the candidates differ by
    question = "what color is the object at 1 2 ? " * 4
    captions = ["red square", "blue circle", "green square"]
    parts = [plugin.selector_text_parts(question, caption) for caption in captions]
    ids, mask = plugin.text_encoder.tokenize(parts)
    assert mask.sum(1).tolist() == [24, 24, 24]
    for row, caption in zip(ids, captions):
        tail = plugin.text_encoder.tokenizer(f"supplemental information : {caption}", add_special_tokens=False)
        assert row[-1 - len(tail["input_ids"]) : -1].tolist() == tail["input_ids"]
    features, _ = plugin.text_encoder(parts)
    assert not torch.allclose(features[0], features[1]) and not torch.allclose(features[0], features[2])


@pytest.mark.parametrize("kind, width", [("clip_plain", 16), ("clip_full", 8)])
def test_clip_text_model_and_whole_clip_checkpoints_load(setup, paths, kind, width):
    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, selector_encoder="clip_text", selector_encoder_path=paths[kind])
    assert plugin.text_encoder.width == width == plugin.text_dim
    features, _ = plugin.text_encoder(["question : red", "blue"])
    model = plugin.text_encoder.model
    ids = plugin.text_encoder.tokenize(["question : red", "blue"])
    with torch.no_grad():
        out = model(input_ids=ids[0], attention_mask=ids[1])
    torch.testing.assert_close(features, out.pooler_output if kind == "clip_plain" else out.text_embeds)
    if kind == "clip_full":
        whole = CLIPModel.from_pretrained(paths[kind])
        torch.testing.assert_close(model.text_projection.weight, whole.text_projection.weight)


def test_selector_flops_count_the_clip_encoder(setup, paths):
    tokenizer, engine, _ = setup
    small, big = (make_plugin(engine, tokenizer, selector_encoder="clip_text", selector_encoder_path=paths[name])
                  for name in ("clip", "clip_big"))
    for plugin in (small, big):
        model = plugin.text_encoder.model
        for n in (5, 17):
            ids = torch.randint(3, 20, (1, n))
            ids[0, -1] = 1
            assert plugin.text_encoder.flops(n) == pytest.approx(module_flops(model, input_ids=ids), rel=1e-6)
    lengths = torch.tensor([[7, 9, 12], [5, 5, 24]])
    selector = module_flops(small.selector.train(), torch.zeros(1, 3, small.text_dim))
    expected = [sum(small.text_encoder.flops(n) for n in row) + selector for row in lengths.tolist()]
    assert small.selector_flops(lengths).tolist() == pytest.approx(expected, rel=1e-6)
    assert (big.selector_flops(lengths) - small.selector_flops(lengths) > 0).all()
    assert small.text_encoder.flops(12) > small.text_encoder.flops(7)


def test_missing_or_wrong_paths_are_named(setup, paths, tmp_path):
    tokenizer, engine, _ = setup
    with pytest.raises(ValueError, match="selector_encoder='clip_text' needs selector_encoder_path"):
        ACCMCompensation(selector_encoder="clip_text")
    missing = str(tmp_path / "nowhere")
    # the other encoders do not read the path (a command-line switch of selector_encoder need not clear it)
    assert make_plugin(engine, tokenizer, selector_encoder_path=missing).text_dim == 32
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer = tmp_path / "gpt2_without_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{paths['gpt2']}/{name}", no_tokenizer / name)
    cases = [
        (dict(caption_decoder_path=missing), FileNotFoundError, f"caption_decoder_path={missing!r}: no such directory"),
        (dict(caption_decoder_path=str(empty)), FileNotFoundError, "caption_decoder_path=.* has no config.json"),
        (dict(caption_decoder_path=paths["clip"]), ValueError,
         "caption_decoder_path=.* is not a GPT-2 checkpoint: config.json has model_type='clip_text_model'"),
        (dict(caption_decoder_path=str(no_tokenizer)), FileNotFoundError, "caption_decoder_path=.* holds no tokenizer"),
        (dict(selector_encoder="clip_text", selector_encoder_path=missing), FileNotFoundError,
         f"selector_encoder_path={missing!r}: no such directory"),
        (dict(selector_encoder="clip_text", selector_encoder_path=paths["gpt2"]), ValueError,
         "selector_encoder_path=.* is not a CLIP text checkpoint: config.json has model_type='gpt2'"),
        # a good decoder with a bad encoder path: refused before the decoder is loaded
        (dict(caption_decoder_path=paths["gpt2"], selector_encoder="clip_text", selector_encoder_path=str(empty)),
         FileNotFoundError, "selector_encoder_path=.* has no config.json"),
    ]
    for settings, error, message in cases:
        plugin = ACCMCompensation(**settings)
        with pytest.raises(error, match=message):
            plugin.attach(engine, tokenizer)
        assert not hasattr(plugin, "caption_model")


def test_a_fit_step_trains_the_pretrained_decoder_and_not_clip(setup, paths, unfrozen_base):
    tokenizer, engine, batch = setup
    options = dict(caption_decoder_path=paths["gpt2"], selector_encoder="clip_text",
                   selector_encoder_path=paths["clip"])
    for progress in (0.0, 0.9):
        plugin = make_plugin(engine, tokenizer, **options)
        clip = plugin.text_encoder.model
        clip_before = {k: v.clone() for k, v in clip.state_dict().items()}
        decoder_before = {k: v.clone() for k, v in plugin.caption_model.decoder.state_dict().items()}
        optimizer = torch.optim.Adam([p for p in plugin.parameters() if p.requires_grad], lr=5e-3)
        assert not {id(p) for group in optimizer.param_groups for p in group["params"]} & \
            {id(p) for p in clip.parameters()}
        history = []
        for _ in range(6):
            losses = plugin.training_losses(engine, batch, progress)
            assert all(torch.isfinite(v).all() for v in losses.values())
            optimizer.zero_grad()
            losses["loss"].backward()
            assert all(p.grad is not None for p in plugin.caption_model.decoder.parameters())
            assert all(p.grad is None for p in clip.parameters())
            assert all(p.grad is None for p in engine.model.parameters())  # trainable, yet no gradient came
            if progress > 0.5:
                assert {"caption", "selector"} <= set(losses)
                assert all(p.grad is not None for p in plugin.selector.parameters())
            optimizer.step()
            history.append(losses["loss"].item())
        if progress < 0.5:  # fixed targets: the warm-start loss falls
            assert history[-1] < history[0], history
        assert any(not torch.equal(v, plugin.caption_model.decoder.state_dict()[k]) for k, v in decoder_before.items())
        assert all(torch.equal(v, clip.state_dict()[k]) for k, v in clip_before.items())


@pytest.mark.parametrize("decoder", ["gpt2", "gpt2_short_table"])
def test_an_exported_plugin_rebuilds_from_its_paths(setup, paths, tmp_path, decoder):
    from lightning_modules.compensation import export_plugin_weights, load_plugin_weights

    tokenizer, engine, batch = setup
    plugin = make_plugin(engine, tokenizer, caption_decoder_path=paths[decoder], selector_encoder="clip_text",
                         selector_encoder_path=paths["clip"])
    # a tokenizer with more tokens than the checkpoint's table gets rows for them
    assert plugin.caption_model.vocab_size == len(plugin.caption_tokenizer)
    assert plugin.caption_model.decoder.config.vocab_size == len(plugin.caption_tokenizer)
    optimizer = torch.optim.Adam([p for p in plugin.parameters() if p.requires_grad], lr=5e-3)
    plugin.training_losses(engine, batch, 0.0)["loss"].backward()
    optimizer.step()
    path = export_plugin_weights(plugin, tmp_path / "plugin.safetensors", {})
    config = json.loads((tmp_path / "plugin.safetensors.json").read_text())["config"]
    restored = ACCMCompensation(**config)
    restored.attach(engine, tokenizer)
    assert not torch.equal(restored.caption_model.decoder.transformer.wte.weight,
                           plugin.caption_model.decoder.transformer.wte.weight)  # the checkpoint's, before loading
    load_plugin_weights(restored, path)
    for key, value in plugin.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    args = (engine, batch, RATIO, 4, tokenizer.eos_token_id, tokenizer.pad_token_id)
    first, again = plugin.eval().generate(*args), restored.eval().generate(*args)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.text_tokens, again.text_tokens)
    torch.testing.assert_close(first.plugin_flops["selector"], again.plugin_flops["selector"])


def test_the_llava_config_placeholders_are_named(setup):
    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "llava15_7b" / "accm.yaml").read_text())
    settings = config["model"]["init_args"]["compensation"]["init_args"]
    assert settings["selector_encoder"] == "clip_text"
    plugin = ACCMCompensation(**settings)
    tokenizer, engine, _ = setup
    for name in ("caption_decoder_path", "selector_encoder_path"):
        if Path(settings[name]).exists():
            pytest.skip(f"the placeholder {settings[name]} exists on this machine")
        with pytest.raises(FileNotFoundError, match=f"{name}={settings[name]!r}: no such directory"):
            plugin.attach(engine, tokenizer)
        plugin.caption_decoder_path = None  # then the encoder's placeholder is the first one missing


def test_a_lightning_fit_trains_and_exports_the_plugin_without_clip(tiny_base_dir, tmp_path):
    import lightning as L

    from conftest import TINY_DATA_ARGS
    from datamodules.synthetic import SyntheticVQADataModule
    from datamodules.synthetic_vqa import SyntheticVQAConfig, vocabulary
    from lightning_modules.compensation import CompensationModule

    words = vocabulary(SyntheticVQAConfig(grid=4, cell_size=8, min_objects=4, max_objects=5))
    data = SyntheticVQADataModule(processor_path=str(tiny_base_dir), **{**TINY_DATA_ARGS, "batch_size": 4})
    plugin = ACCMCompensation(target_prune_ratio=RATIO, caption_decoder_path=save_tiny_gpt2(tmp_path / "gpt2", words),
                              caption_prefix_length=2, caption_mapper_layers=1, max_caption_tokens=6,
                              selector_hidden=16, selector_heads=2, selector_encoder="clip_text",
                              selector_encoder_path=save_tiny_clip(tmp_path / "clip", words, max_positions=64),
                              warmup_fraction=0.5)
    export = tmp_path / "plugin.safetensors"
    module = CompensationModule(str(tiny_base_dir), plugin, processor=data.processor, categories=data.categories,
                                learning_rate=1e-3, max_new_tokens=2, plugin_export_path=str(export))
    clip = plugin.text_encoder.model
    decoder_before = plugin.caption_model.decoder.transformer.wte.weight.detach().clone()
    modes = []

    class BaseMode(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append((pl_module.compensation.training, any(m.training for m in pl_module.base.modules())))

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[BaseMode()])
    trainer.fit(module, datamodule=data)  # step 0: warm start, step 1: KL-ranked stage
    assert modes == [(True, False), (True, False)]  # the plug-in trains, the base stays in eval mode
    from lvlm_prune.modeling.loading import load_base_model

    fresh, after = load_base_model(tiny_base_dir).state_dict(), module.base.state_dict()
    assert after.keys() == fresh.keys() and all(torch.equal(after[k], fresh[k]) for k in fresh)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in plugin.parameters() if p.requires_grad}
    assert {id(p) for p in plugin.caption_model.decoder.parameters()} <= optimized
    assert not optimized & {id(p) for p in clip.parameters()}
    assert not torch.equal(decoder_before, plugin.caption_model.decoder.transformer.wte.weight)
    assert set(load_file(str(export))) == set(plugin.state_dict())
    config = json.loads((tmp_path / "plugin.safetensors.json").read_text())["config"]
    assert config["caption_decoder_path"] == str(tmp_path / "gpt2") and config["selector_encoder"] == "clip_text"
