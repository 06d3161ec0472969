import os
from pathlib import Path

import pytest

import lvlm_prune.archives as archives
from lvlm_prune.archives import staged_export


def write_export(directory, tag="new"):
    (directory / "model.safetensors").write_bytes(f"{tag} weights".encode())
    (directory / "processor_config.json").write_text("{}")
    (directory / "config.json").write_text(f'{{"export": "{tag}"}}')


def test_a_finished_export_moves_in_whole_and_leaves_other_files(tmp_path):
    target = tmp_path / "base_model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with staged_export(target) as staging:
        assert staging.parent == tmp_path and not (target / "config.json").exists()
        write_export(staging)
    assert (target / "model.safetensors").read_bytes() == b"new weights"
    assert (target / "config.json").read_text() == '{"export": "new"}'
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base_model"]  # no staging directory left


def test_an_export_that_fails_while_writing_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "base_model"
    target.mkdir()
    write_export(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_export(target) as staging:
            (staging / "config.json").write_text("{}")  # save_pretrained writes the config before the weights
            raise RuntimeError("disk full")
    assert (target / "model.safetensors").read_bytes() == b"old weights"
    assert (target / "config.json").read_text() == '{"export": "old"}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base_model"]


def test_an_export_interrupted_while_moving_in_has_no_config(tmp_path, monkeypatch):
    target = tmp_path / "base_model"
    target.mkdir()
    write_export(target, "old")
    moved, real_replace = [], os.replace  # archives.os is this os: the patch below replaces os.replace

    def replace_then_fail(source, destination):
        if moved:
            raise KeyboardInterrupt
        moved.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(archives.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        with staged_export(target) as staging:
            write_export(staging)
    assert moved and moved[0].name != "config.json"  # the config moves last
    assert not (target / "config.json").exists()  # so nothing reads the half-replaced directory as finished
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base_model"]


def plugin_tensors(value):
    import torch

    return {"layer.weight": torch.full((2, 3), float(value))}


def test_a_plugin_export_writes_weights_and_record_as_a_pair(tmp_path):
    from safetensors import safe_open

    path = archives.save_plugin_export(plugin_tensors(1), tmp_path / "sub" / "plugin.safetensors",
                                       {"plugin": "rcp", "global_step": 7, "where": tmp_path})
    with safe_open(str(path), "pt") as weights:
        assert weights.metadata() == {"plugin": "rcp"}
        assert weights.get_tensor("layer.weight").eq(1).all()
    record = (tmp_path / "sub" / "plugin.safetensors.json").read_text()
    assert '"global_step": 7' in record and str(tmp_path) in record  # default=str writes paths
    assert sorted(p.name for p in path.parent.iterdir()) == ["plugin.safetensors", "plugin.safetensors.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_plugin_export_that_fails_before_moving_in_leaves_the_old_pair(tmp_path, monkeypatch):
    path = archives.save_plugin_export(plugin_tensors(1), tmp_path / "plugin.safetensors", {"plugin": "old"})
    old_weights, old_record = path.read_bytes(), (tmp_path / "plugin.safetensors.json").read_text()
    monkeypatch.setattr(archives.json, "dumps", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        archives.save_plugin_export(plugin_tensors(2), path, {"plugin": "new"})
    assert path.read_bytes() == old_weights
    assert (tmp_path / "plugin.safetensors.json").read_text() == old_record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugin.safetensors", "plugin.safetensors.json"]


def test_a_plugin_export_interrupted_while_moving_in_leaves_no_stale_record(tmp_path, monkeypatch):
    """New weights beside the old record would make the loader check them against the old base."""
    from safetensors.torch import load_file

    path = archives.save_plugin_export(plugin_tensors(1), tmp_path / "plugin.safetensors",
                                       {"plugin": "rcp", "base_fingerprint": "old base"})
    moved, real_replace = [], os.replace  # archives.os is this os: the patch below replaces os.replace

    def replace_then_fail(source, destination):
        if moved:
            raise KeyboardInterrupt
        moved.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr(archives.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        archives.save_plugin_export(plugin_tensors(2), path, {"plugin": "rcp", "base_fingerprint": "new base"})
    assert moved == ["plugin.safetensors"]
    assert load_file(str(path))["layer.weight"].eq(2).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plugin.safetensors"]  # no record, no staged files


@pytest.mark.parametrize("data", ["new text", b"new bytes\x00"])
def test_write_atomically_replaces_the_file_whole_and_leaves_no_staging(tmp_path, data):
    path = tmp_path / "results.md"
    path.write_text("old")
    archives.write_atomically(path, data)
    assert path.read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_write_atomically_leaves_the_old_file_when_the_swap_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    path.write_text("old")

    def fail(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(archives.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        archives.write_atomically(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]  # the staged copy is removed
