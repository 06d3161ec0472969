"""Export the trained plug-in weights alone from a training checkpoint.

    python scripts/export_plugin.py runs/demo/rcp_r0.889/run/checkpoints/last.ckpt runs/demo/rcp_plugin.safetensors

The checkpoint is either a Lightning file (`last.ckpt`) or a DeepSpeed ZeRO-2/3 directory (`last.ckpt/` with
`checkpoint/` and `latest` inside; its shards are merged on CPU, no GPU or process group needed). The output is
what `CompensationModule(plugin_weights_path=...)` loads: `<output>` (safetensors, the plug-in's own parameter
names) + `<output>.json` (base model path and fingerprint, the source checkpoint and its step, and the plug-in's
constructor arguments: from the checkpoint, which records them, or for a checkpoint of an older version from the
run's `config.yaml` in the run directory, the parent of `checkpoints/`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from lvlm_prune.archives import deepspeed_model_states, save_plugin_export, torch_archive_problem
from lvlm_prune.compensation import is_training_only

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_PREFIX = "compensation."  # CompensationModule.compensation


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full-precision state dict of the trainable module, the checkpoint's other entries) of a Lightning file
    or a DeepSpeed ZeRO directory."""
    path = Path(path)
    if path.is_file():
        problem = torch_archive_problem(path)  # torch.load's own error names no file, or loads garbage
        if problem is not None:
            raise ValueError(f"{str(path)!r} is not a readable Lightning checkpoint ({problem})")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return checkpoint.get("state_dict", {}), checkpoint
    if not (path / "latest").is_file():
        raise FileNotFoundError(f"{str(path)!r} is neither a checkpoint file nor a DeepSpeed checkpoint directory "
                                "(a directory with a 'latest' file)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (path / "latest").read_text().strip()
    model_states = deepspeed_model_states(path)
    if not model_states:
        raise FileNotFoundError(f"no *model_states.pt in {str(path / tag)!r}")
    client_state = torch.load(model_states[0], map_location="cpu", weights_only=False)
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=True)
    return state, client_state


def plugin_settings(checkpoint: Path, entries: dict[str, Any]) -> dict[str, Any] | None:
    """{'class_path', 'init_args'} of the plug-in: as the checkpoint records them, else `run_config`'s."""
    if entries.get("plugin_class") and isinstance(entries.get("plugin_config"), dict):
        return {"class_path": entries["plugin_class"], "init_args": entries["plugin_config"]}
    return run_config(checkpoint)


def run_config(checkpoint: Path) -> dict[str, Any] | None:
    """The `model.init_args.compensation` entry of the run's `config.yaml` (LightningCLI writes it in the log
    directory, the parent of `checkpoints/`), or None."""
    for directory in list(checkpoint.resolve().parents)[:3]:
        config = directory / "config.yaml"
        if config.is_file():
            model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
            return (model.get("init_args") or {}).get("compensation")
    return None


def export_plugin(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the plug-in weights of `checkpoint` to `output` (+ `output.json`); returns `output`."""
    checkpoint, output = Path(checkpoint), Path(output)
    state, entries = read_checkpoint(checkpoint)
    compensation = plugin_settings(checkpoint, entries)
    name, plugin_class = None, None
    if compensation and "class_path" in compensation:
        module, _, cls = compensation["class_path"].rpartition(".")
        sys.path.insert(0, str(ROOT))
        plugin_class = getattr(__import__(module, fromlist=[cls]), cls)
        name = getattr(plugin_class, "name", None)
    # training-only state (ACCM's DPO reference) stays out, as in the export at the end of fit
    tensors = {k[len(PLUGIN_PREFIX):]: v.detach().float().cpu().clone().contiguous()
               for k, v in state.items()
               if k.startswith(PLUGIN_PREFIX) and not is_training_only(plugin_class, k[len(PLUGIN_PREFIX):])}
    if not tensors:
        raise ValueError(f"{str(checkpoint)!r} holds no '{PLUGIN_PREFIX}*' weights: not a CompensationModule checkpoint")
    base = entries.get("base_model") or {}
    return save_plugin_export(tensors, output, {
        "plugin": name, "config": (compensation or {}).get("init_args"), "base_model_path": base.get("path"),
        "base_fingerprint": base.get("fingerprint"),
        "source_checkpoint": str(checkpoint), "global_step": entries.get("global_step")})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="Lightning checkpoint file or DeepSpeed checkpoint directory")
    parser.add_argument("output", help="safetensors file to write (a .json is written beside it)")
    args = parser.parse_args(argv)
    path = export_plugin(args.checkpoint, args.output)
    print(f"plug-in weights written to {path} (+ {path.name}.json)")


if __name__ == "__main__":
    main()
