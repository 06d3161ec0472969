import os

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
    moved = []

    def replace_then_fail(source, destination):
        if moved:
            raise KeyboardInterrupt
        moved.append(destination)
        os.replace(source, destination)

    monkeypatch.setattr(archives.os, "replace", replace_then_fail)
    with pytest.raises(KeyboardInterrupt):
        with staged_export(target) as staging:
            write_export(staging)
    assert moved and moved[0].name != "config.json"  # the config moves last
    assert not (target / "config.json").exists()  # so nothing reads the half-replaced directory as finished
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base_model"]
