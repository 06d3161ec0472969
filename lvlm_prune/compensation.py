"""The interface of a trained compensation plug-in (RCP, ACCM) on a frozen base model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from lvlm_prune.engine import PrunedLlava, PruningMethod
from lvlm_prune.runner import GenerationResult, generate_with_method


class Compensation(nn.Module, ABC):
    """Plug-in modules + their training objective + their inference path.

    The frozen base never appears among a plug-in's parameters: `attach` receives the engine (which holds
    the base) and builds the plug-in's own modules sized for it; the base is only called.
    """

    name = "compensation"
    # Set by the training module when every process must make the same module calls (ZeRO-3 with several
    # processes gathers each submodule's weights collectively): loops whose length depends on the data (decoding
    # until EOS, beam search until every beam is done) then run to their maximum length, discarding the extra steps.
    lockstep: bool = False
    # True when some training steps leave trainable parameters without a gradient (ACCM's selector before its
    # stage): plain DDP then fails on the next step, and the training module asks for find_unused_parameters.
    leaves_parameters_unused: bool = False
    # State-dict entries (prefixes) that only training needs, e.g. ACCM's DPO reference: exports leave them out,
    # and loading exported weights does not ask for them.
    training_only_prefixes: tuple[str, ...] = ()

    @abstractmethod
    def attach(self, engine: PrunedLlava, tokenizer: Any) -> None:
        """Build the modules for this base model (called once, before training or loading weights)."""

    @abstractmethod
    def training_losses(self, engine: PrunedLlava, batch: dict[str, Any], progress: float) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; 'loss' is the total to minimise. `progress` = step / total steps in [0, 1]."""

    @abstractmethod
    def inference_method(self, prune_ratio: float) -> PruningMethod:
        """The pruning method that realises `prune_ratio` with the trained modules."""

    def generate(
        self,
        engine: PrunedLlava,
        batch: dict[str, Any],
        prune_ratio: float,
        max_new_tokens: int,
        eos_token_id: int | None,
        pad_token_id: int,
    ) -> GenerationResult:
        method = engine.bind(self.inference_method(prune_ratio))
        return generate_with_method(engine, batch, method, max_new_tokens, eos_token_id, pad_token_id)

    def export_config(self) -> dict[str, Any]:
        """Constructor arguments, saved beside exported weights."""
        return {}

    def frozen_weights_needed(self) -> list[str]:
        """Names (in this module) of frozen weights whose current values matter, so that a checkpoint without them
        cannot be resumed: the DeepSpeed presets leave every frozen weight out of checkpoints. None by default."""
        return []


def is_training_only(plugin_or_class: Any, key: str) -> bool:
    """True when the plug-in's state-dict entry `key` only matters to training (`training_only_prefixes`)."""
    return key.startswith(tuple(getattr(plugin_or_class, "training_only_prefixes", ())))


@torch.no_grad()
def copy_weights(source: nn.Module, target: nn.Module) -> None:
    """`target`'s parameters and buffers := `source`'s (same architecture). Under DeepSpeed ZeRO-3 each rank copies its
    own partition: a partitioned parameter's `.data` is empty, so `load_state_dict(state_dict())` would copy nothing
    and report success. Equal shapes are partitioned alike, so the partitions line up."""
    pairs = [*zip(source.parameters(), target.parameters()), *zip(source.buffers(), target.buffers())]
    for from_, to in pairs:
        if hasattr(from_, "ds_tensor") != hasattr(to, "ds_tensor") or from_.shape != to.shape:
            raise ValueError("copy_weights: the two modules are not partitioned alike")
        if hasattr(to, "ds_tensor"):
            to.ds_tensor.copy_(from_.ds_tensor)
        else:
            to.data.copy_(from_.data)

