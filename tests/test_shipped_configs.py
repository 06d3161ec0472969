"""The shipped synthetic experiments, instantiated and trained for real (`--print_config` builds no object, so a bad
layer index or schedule in a config would only show when the experiment runs).

The configs are written for the demo base (runs/demo/base_model, made by configs/synthetic/base.yaml): 12 LLM
layers, 64 visual tokens (an 8 x 8 grid of 8-pixel patches), the synthetic vocabulary. The base here has exactly that
depth, visual-token count and vocabulary, with narrow random weights, so every layer index, budget and schedule of
the shipped YAML applies unchanged and means what it means on the demo base; only the base's widths, the data sizes
and the run lengths (and where things are written) are overridden.
"""

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.sweep import PruningSweep
from cli import cli_main

DEMO_SHAPE = dict(image_size=64, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2, hidden_size=32,
                  intermediate_size=64, num_layers=12, num_heads=4, num_kv_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="module")
def demo_shaped_base(tmp_path_factory):
    """A random base of the demo base's shape (see the module docstring) with its processor."""
    from datamodules.synthetic_vqa import SyntheticVQAConfig, vocabulary
    from lvlm_prune.modeling import TinyLlavaSpec, build_tiny_llava
    from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer

    directory = tmp_path_factory.mktemp("demo_shaped_base")
    tokenizer = build_word_tokenizer(vocabulary(SyntheticVQAConfig()))  # the default data: an 8 x 8 grid
    spec = TinyLlavaSpec(**DEMO_SHAPE)
    assert spec.num_visual_tokens == SyntheticVQAConfig().grid ** 2 == 64
    model = build_tiny_llava(spec, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=0)
    model.save_pretrained(directory)
    build_processor(tokenizer, image_size=spec.image_size, patch_size=spec.patch_size).save_pretrained(directory)
    return directory


def shipped_run_args(config, base, tmp_path):
    """`fit --config <config>` on `base`, everything written under tmp_path, two training steps on small data."""
    return [
        "fit", "--config", config,
        "--model.init_args.base_model_path", str(base), "--data.init_args.processor_path", str(base),
        "--model.init_args.plugin_export_path", str(tmp_path / "plugin.safetensors"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.init_args.num_train", "8", "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
        "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
        "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]


def shipped(config):
    return yaml.safe_load(Path(config).read_text())


def check_sweep(cli, tmp_path):
    """The shipped sweep ran every (method, ratio) pair it lists, and each reached its ratio ('ok', not
    'unreachable' or 'failed')."""
    (sweep,) = [c for c in cli.trainer.callbacks if isinstance(c, PruningSweep)]
    (path,) = tmp_path.rglob("sweep.csv")
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], float(r["prune_ratio"])) for r in rows] == sweep.pairs()
    assert all(r["status"] == "ok" for r in rows), [(r["method"], r["prune_ratio"], r["status"]) for r in rows]


def check_settings_reached(plugin, settings):
    """Every shipped plug-in setting is the one the plug-in was built with and (where it keeps one of that name) the
    attribute it runs with, not a default or another layer's override."""
    config = plugin.export_config()
    assert {name: config[name] for name in settings} == settings
    held = {name: getattr(plugin, name) for name in settings if hasattr(plugin, name)}
    assert len(held) >= len(settings) - 1  # all but a template name kept as the template itself
    assert {name: list(value) if isinstance(value, tuple) else value for name, value in held.items()} == {
        name: settings[name] for name in held}


def check_export(plugin, path):
    """The exported file holds the trained plug-in's weights (all but a DPO reference, which is not exported)."""
    from safetensors.torch import load_file

    exported, state = load_file(str(path)), plugin.state_dict()
    assert set(exported) == {name for name in state if not name.startswith("reference_")}
    assert all(torch.equal(value, state[name].cpu()) for name, value in exported.items())


def test_the_shipped_rcp_experiment_trains_exports_and_sweeps(demo_shaped_base, tmp_path):
    config = "configs/synthetic/rcp.yaml"
    cli = cli_main(shipped_run_args(config, demo_shaped_base, tmp_path))
    assert cli.trainer.global_step == 2
    plugin, settings = cli.model.compensation, shipped(config)["model"]["init_args"]["compensation"]["init_args"]
    # the shipped settings reached the plug-in, on the depth they were written for
    assert list(plugin.pruning_layers) == settings["pruning_layers"]
    assert plugin.target_prune_ratio == settings["target_prune_ratio"]
    check_settings_reached(plugin, settings)
    check_export(plugin, tmp_path / "plugin.safetensors")
    check_sweep(cli, tmp_path)


def test_the_shipped_accm_experiment_trains_exports_and_sweeps(demo_shaped_base, tmp_path):
    config = "configs/synthetic/accm.yaml"
    cli = cli_main(shipped_run_args(config, demo_shaped_base, tmp_path))
    assert cli.trainer.global_step == 2
    settings = shipped(config)["model"]["init_args"]["compensation"]["init_args"]
    assert cli.model.compensation.target_prune_ratio == settings["target_prune_ratio"]
    check_settings_reached(cli.model.compensation, settings)
    check_export(cli.model.compensation, tmp_path / "plugin.safetensors")
    check_sweep(cli, tmp_path)


@pytest.mark.parametrize("config", ["configs/synthetic/rcp.yaml", "configs/synthetic/accm.yaml"])
def test_a_base_directory_without_a_processor_is_named_by_its_setting(demo_shaped_base, tmp_path, config):
    base = shutil.copytree(demo_shaped_base, tmp_path / "base_without_processor")
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json"):
        (base / name).unlink(missing_ok=True)
    assert (base / "config.json").exists() and (base / "model.safetensors").exists()
    with pytest.raises(FileNotFoundError, match=r"^data.init_args.processor_path: '.*base_without_processor' holds no "
                                                r"processor \(no processor_config.json"):
        cli_main(shipped_run_args(config, base, tmp_path))
