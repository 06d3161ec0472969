"""The LLaVA-1.5-7B data config fragments: they parse, start with their command, and fail clearly on the
placeholder paths when the data is not there."""

import importlib
from pathlib import Path

import pytest
import yaml

CONFIG_DIR = Path(__file__).parents[2] / "configs" / "llava15_7b"
DATA_FRAGMENTS = ["data_vqav2_10k.yaml"]


@pytest.mark.parametrize("name", DATA_FRAGMENTS)
def test_fragment_parses_and_starts_with_its_command(name):
    path = CONFIG_DIR / name
    text = path.read_text()
    first_line = text.splitlines()[0]
    assert first_line.startswith("# python cli.py fit --config ")
    assert f"--config configs/llava15_7b/{name}" in first_line
    config = yaml.safe_load(text)
    assert set(config) == {"data"} and config["data"]["class_path"].startswith("datamodules.llava.")


@pytest.mark.parametrize("name", DATA_FRAGMENTS)
def test_missing_placeholder_paths_are_named(name):
    data = yaml.safe_load((CONFIG_DIR / name).read_text())["data"]
    module_name, class_name = data["class_path"].rsplit(".", 1)
    datamodule_class = getattr(importlib.import_module(module_name), class_name)
    paths = [value for value in data["init_args"].values() if isinstance(value, str) and value.startswith("/data/")]
    assert paths, "the fragment should point at local data under /data"
    if any(Path(p).exists() for p in paths):
        pytest.skip("the placeholder data exists on this machine")
    with pytest.raises(FileNotFoundError) as raised:
        datamodule_class(**data["init_args"])
    for key, value in data["init_args"].items():
        if value in paths:
            assert f"data.{key}={value!r}" in str(raised.value)
