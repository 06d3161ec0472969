"""Optimizers for training a base LVLM: AdamW, or Muon on the hidden matrices with AdamW on the rest.

Muon (torch.optim.Muon) orthogonalises each 2-D weight's momentum with a few Newton-Schulz iterations; it applies
only to the matrices inside the transformer blocks and projector. Embeddings, the LM head, norms, biases, position
embeddings and the patch convolution stay on AdamW, as in Muon's reference recipe. `MuonWithAdamW` puts both
behind one `torch.optim.Optimizer`, so one LR scheduler, Lightning's checkpointing and gradient clipping see a
single optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Literal

import torch
from torch import nn

OptimizerName = Literal["adamw", "muon"]
OPTIMIZERS = ("adamw", "muon")


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Names of the weights Muon trains: 2-D weights of the linear layers, less the LM head and tied embeddings."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    excluded = embedding_weights | ({id(output.weight)} if output is not None else set())
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in excluded:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


class _RoutedState(MutableMapping):
    """The per-parameter state of several optimizers as one mapping: each key goes to the optimizer that holds the
    parameter, so code that writes `optimizer.state[p]` (Lightning moving state to a device) writes the right one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self._optimizers = optimizers
        self._owner = {id(p): optimizer for optimizer in optimizers for group in optimizer.param_groups
                       for p in group["params"]}

    def _state_of(self, parameter: torch.Tensor) -> dict:
        if id(parameter) not in self._owner:
            raise KeyError("a tensor that is not a parameter of this optimizer")
        return self._owner[id(parameter)].state

    def __contains__(self, parameter: object) -> bool:  # without creating the inner defaultdict's entry
        return any(parameter in optimizer.state for optimizer in self._optimizers)

    def __getitem__(self, parameter: torch.Tensor) -> dict:
        return self._state_of(parameter)[parameter]

    def __setitem__(self, parameter: torch.Tensor, value: dict) -> None:
        self._state_of(parameter)[parameter] = value

    def __delitem__(self, parameter: torch.Tensor) -> None:
        del self._state_of(parameter)[parameter]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for optimizer in self._optimizers:
            yield from optimizer.state

    def __len__(self) -> int:
        return sum(len(optimizer.state) for optimizer in self._optimizers)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for `muon_params`, AdamW for `adamw_groups`, behind one optimizer interface.

    The inner optimizers' param-group dicts are this optimizer's param groups (the same objects, also after
    `load_state_dict`), so an LR scheduler's change reaches both; `state` reads and writes both inner states.
    `adjust_lr_fn="match_rms_adamw"` scales Muon's update to AdamW's RMS, so the learning rate and weight decay tuned
    for AdamW carry over. Limits: state-dict hooks registered on this object do not run (the inner optimizers' do),
    and global optimizer step hooks run for each inner optimizer as well as for this one.
    """

    def __init__(
        self,
        muon_params: list[torch.Tensor],
        adamw_groups: list[dict],
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.98),
        momentum: float = 0.95,
        adjust_lr_fn: str = "match_rms_adamw",
    ) -> None:
        if not muon_params:
            raise ValueError("MuonWithAdamW got no 2-D weights for Muon; use AdamW for this model")
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn=adjust_lr_fn)
        # a model whose every trainable weight is a Muon matrix: AdamW refuses an empty list, not an empty group
        self.adamw = torch.optim.AdamW(adamw_groups or [{"params": []}], lr=lr, betas=betas, weight_decay=weight_decay)
        self._built = False
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {"lr": lr})
        self._built = True
        self.state = _RoutedState([self.muon, self.adamw])

    def add_param_group(self, param_group: dict) -> None:
        """Groups added after construction (e.g. Lightning's fine-tuning callbacks unfreezing layers) go to AdamW."""
        if not self._built:  # torch.optim.Optimizer.__init__ registering the inner optimizers' groups
            super().add_param_group(param_group)
            return
        self.adamw.add_param_group(param_group)
        self.param_groups.append(self.adamw.param_groups[-1])
        self.state = _RoutedState([self.muon, self.adamw])

    def __getstate__(self) -> dict:  # deepcopy / pickle keep the inner optimizers
        return {**super().__getstate__(), "muon": self.muon, "adamw": self.adamw, "_built": self._built}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.state = _RoutedState([self.muon, self.adamw])  # its routing is by the parameters' identity

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(
                f"optimizer state has keys {sorted(state_dict)}, not a MuonWithAdamW state ('muon', 'adamw'): "
                "was the checkpoint written with model.init_args.optimizer: adamw?"
            )
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # loading gives the inner optimizers new group dicts: share them again, or a scheduler would set stale ones
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = _RoutedState([self.muon, self.adamw])


def build_optimizer(
    model: nn.Module, name: OptimizerName, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.98)
) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only) or Muon + AdamW over the trainable parameters of `model`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {list(OPTIMIZERS)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    if name == "adamw":
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=betas,
        )
    muon_names = muon_parameter_names(model)
    muon = [p for n, p in named if n in muon_names]
    rest_decay = [p for n, p in named if p.ndim >= 2 and n not in muon_names]
    groups = [{"params": rest_decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return MuonWithAdamW(muon, [g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay, betas=betas)
