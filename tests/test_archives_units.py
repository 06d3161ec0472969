"""lvlm_prune/archives.py's atomic writes and plug-in exports, and scripts/export_plugin.py, on tiny files."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import lvlm_prune.archives as archives

ROOT = Path(__file__).resolve().parents[1]


def load_export_script():
    spec = importlib.util.spec_from_file_location("export_plugin_under_test", ROOT / "scripts" / "export_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_write_atomically_replaces_a_staged_file_left_by_a_crashed_write(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text("old")
    (tmp_path / ".timings.json.tmp").write_text("half-written by a crashed run")
    archives.write_atomically(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["timings.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names through /proc")
def test_write_atomically_syncs_the_staged_file_before_renaming_it(tmp_path, monkeypatch):
    """Renamed before its data reached the disk (flushed from Python's buffer, then synced), a crash could leave an
    empty file where the old one was."""
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(descriptor):
        name = Path(os.readlink(f"/proc/self/fd/{descriptor}")).name
        events.append(("fsync", name, os.fstat(descriptor).st_size))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("replace", Path(source).name))
        real_replace(source, destination)

    monkeypatch.setattr(archives.os, "fsync", fsync)
    monkeypatch.setattr(archives.os, "replace", replace)
    archives.write_atomically(tmp_path / "made_from_base.json", '{"sweep": "digest"}')
    assert events == [("fsync", ".made_from_base.json.tmp", 19), ("replace", ".made_from_base.json.tmp")]


def test_a_plugin_export_without_a_plugin_name_is_marked_unknown(tmp_path):
    path = archives.save_plugin_export({"w": torch.ones(2)}, tmp_path / "plugin.safetensors", {"plugin": None})
    with safe_open(str(path), "pt") as weights:
        assert weights.metadata() == {"plugin": "unknown"}
    assert json.loads((tmp_path / "plugin.safetensors.json").read_text()) == {"plugin": None}


@pytest.fixture
def accm_run(tmp_path):
    """A run directory as LightningCLI leaves it: config.yaml naming an ACCM plug-in, checkpoints/last.ckpt."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    compensation = {"class_path": "lvlm_prune.accm.compensation.ACCMCompensation",
                    "init_args": {"target_prune_ratio": 0.969}}
    config = {"model": {"init_args": {"compensation": compensation}}}
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "run"


def test_the_export_script_takes_the_plugins_inference_weights_in_full_precision(accm_run, tmp_path):
    checkpoint = accm_run / "checkpoints" / "last.ckpt"
    weight = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    torch.save({"state_dict": {"compensation.head.weight": weight,
                               "compensation.reference_caption_model.w": torch.ones(1),
                               "model.frozen_base.w": torch.ones(1)},
                "global_step": 7, "base_model": {"path": "/bases/tiny", "fingerprint": "abc"}}, checkpoint)
    output = load_export_script().export_plugin(checkpoint, tmp_path / "out" / "accm.safetensors")
    assert output == tmp_path / "out" / "accm.safetensors"
    tensors = load_file(output)
    assert list(tensors) == ["head.weight"] and tensors["head.weight"].dtype == torch.float32
    assert tensors["head.weight"].tolist() == [[1.5, -2.0]]
    assert json.loads((tmp_path / "out" / "accm.safetensors.json").read_text()) == {
        "plugin": "accm", "config": {"target_prune_ratio": 0.969}, "base_model_path": "/bases/tiny",
        "base_fingerprint": "abc", "source_checkpoint": str(checkpoint), "global_step": 7}


def test_the_export_script_takes_the_settings_the_checkpoint_records_over_a_config_file(accm_run, tmp_path, monkeypatch):
    # the run's config.yaml names another ratio (a later command's); the checkpoint's own record wins
    checkpoint = accm_run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"compensation.w": torch.ones(1)},
                "plugin_class": "lvlm_prune.rcp.compensation.RCPCompensation",
                "plugin_config": {"target_prune_ratio": 0.5, "pruning_layers": [1]}}, checkpoint)
    load_export_script().export_plugin(checkpoint, tmp_path / "rcp.safetensors")
    record = json.loads((tmp_path / "rcp.safetensors.json").read_text())
    assert record["plugin"] == "rcp" and record["config"] == {"target_prune_ratio": 0.5, "pruning_layers": [1]}
    # an older checkpoint without the record, given by a relative path, still finds the run's config.yaml
    torch.save({"state_dict": {"compensation.w": torch.ones(1)}}, checkpoint)
    monkeypatch.chdir(checkpoint.parent)
    load_export_script().export_plugin(Path("last.ckpt"), tmp_path / "accm.safetensors")
    assert json.loads((tmp_path / "accm.safetensors.json").read_text())["config"] == {"target_prune_ratio": 0.969}


@pytest.mark.parametrize("config", ["", "model:\n  init_args: {}\n"])
def test_a_run_config_without_a_plugin_entry_exports_an_unnamed_plugin(tmp_path, config):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text(config)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"compensation.w": torch.ones(1)}}, checkpoint)
    output = load_export_script().export_plugin(checkpoint, tmp_path / "plugin.safetensors")
    record = json.loads((tmp_path / "plugin.safetensors.json").read_text())
    assert list(load_file(output)) == ["w"] and record["plugin"] is None and record["config"] is None


def test_the_export_script_refuses_a_checkpoint_without_plugin_weights(tmp_path):
    checkpoint = tmp_path / "base.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(1)}}, checkpoint)
    with pytest.raises(ValueError, match=r"base.ckpt' holds no 'compensation.\*' weights"):
        load_export_script().export_plugin(checkpoint, tmp_path / "plugin.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.ckpt"]


def test_the_export_script_names_a_directory_that_is_no_deepspeed_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a DeepSpeed checkpoint directory"):
        load_export_script().read_checkpoint(tmp_path)


@pytest.fixture
def zero_checkpoint(tmp_path, monkeypatch):
    """A DeepSpeed checkpoint directory whose `latest` ends in a newline, as DeepSpeed writes it; the merge of its
    shards is a stand-in that records what it was asked for."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    directory = tmp_path / "last.ckpt"
    (directory / "checkpoint").mkdir(parents=True)
    (directory / "latest").write_text("checkpoint\n")
    asked = []

    def merged(path, tag, exclude_frozen_parameters):
        asked.append((path, tag, exclude_frozen_parameters))
        return {"compensation.w": torch.ones(1)}

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", merged)
    return directory, asked


def test_a_deepspeed_checkpoint_is_merged_from_the_tag_in_latest(zero_checkpoint):
    directory, asked = zero_checkpoint
    client_state = {"global_step": 4, "base_model": {"path": "/b"}}
    torch.save(client_state, directory / "checkpoint" / "mp_rank_00_model_states.pt")
    state, entries = load_export_script().read_checkpoint(directory)
    assert asked == [(str(directory), "checkpoint", True)]
    assert list(state) == ["compensation.w"] and entries == client_state


def test_a_deepspeed_checkpoint_without_model_states_is_named(zero_checkpoint):
    directory, asked = zero_checkpoint
    with pytest.raises(FileNotFoundError, match=r"no \*model_states.pt in '.*last.ckpt/checkpoint'"):
        load_export_script().read_checkpoint(directory)
    assert asked == []


def test_deepspeed_model_states_lists_the_latest_tags_files_rank_0_first(tmp_path):
    from lvlm_prune.archives import deepspeed_model_states

    assert deepspeed_model_states(tmp_path) == []  # no 'latest': not a DeepSpeed checkpoint
    for tag in ("step3", "step7"):
        (tmp_path / tag).mkdir()
        for rank in (1, 0):
            (tmp_path / tag / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
        (tmp_path / tag / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("step7\n")
    assert [p.relative_to(tmp_path).as_posix() for p in deepspeed_model_states(tmp_path)] == [
        "step7/zero_pp_rank_0_mp_rank_00_model_states.pt", "step7/zero_pp_rank_1_mp_rank_00_model_states.pt"]
