"""RCP training schedules (METHODS.md §3) as pure functions of training progress.

progress = step / total_steps in [0, 1]. Nothing here holds state, so a resumed run that restores its
step gets exactly the same temperature, noise switch, sparsity target and learning rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple


def training_progress(step: int, total_steps: int) -> float:
    """step / total_steps clamped to [0, 1].

    Args:
        step: optimiser steps done (>= 0).
        total_steps: planned optimiser steps (>= 1).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return min(step / total_steps, 1.0)


def _check_progress(progress: float) -> float:
    if not 0.0 <= progress:
        raise ValueError(f"progress={progress} must be >= 0")
    # Steps past the plan (e.g. a last partial batch) stay at the final values.
    return min(progress, 1.0)


def _check_fraction(name: str, value: float, allow_zero: bool = True) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):
        raise ValueError(f"{name}={value} must be in {'[0' if allow_zero else '(0'}, 1]")


def gumbel_temperature(
    progress: float,
    start: float = 1.5,
    end: float = 0.2,
    anneal_fraction: float = 0.6,
) -> float:
    """Gumbel-sigmoid temperature, annealed exponentially from `start` to `end`, then held.

    Exponential (geometric) interpolation: tau = start * (end / start) ** (progress / anneal_fraction),
    so each step lowers tau by the same factor; at low temperature, where the relaxation sharpens,
    linear steps would be relatively much larger.

    Args:
        progress: training progress in [0, 1].
        start: temperature at progress 0 (> 0).
        end: temperature from progress `anneal_fraction` on (> 0).
        anneal_fraction: fraction of training over which it anneals, in (0, 1].
    """
    progress = _check_progress(progress)
    if not (start > 0 and end > 0):
        raise ValueError(f"start={start} and end={end} must be > 0")
    _check_fraction("anneal_fraction", anneal_fraction, allow_zero=False)
    ramp = min(progress / anneal_fraction, 1.0)
    return start * (end / start) ** ramp


def gumbel_noise_enabled(progress: float, noise_off_fraction: float = 0.8) -> bool:
    """Whether logistic noise is added: on before `noise_off_fraction` of training, off after.

    Args:
        progress: training progress in [0, 1].
        noise_off_fraction: progress from which noise is off, in [0, 1].
    """
    progress = _check_progress(progress)
    _check_fraction("noise_off_fraction", noise_off_fraction)
    return progress < noise_off_fraction


def sparsity_target_keep(
    progress: float,
    target_keep_fraction: float,
    anneal_fraction: float = 0.1,
) -> float:
    """Target layer-averaged kept fraction, cosine-annealed from 1 (keep all) to the target.

    keep = target + (1 - target) * (1 + cos(pi * min(progress / anneal_fraction, 1))) / 2.

    Args:
        progress: training progress in [0, 1].
        target_keep_fraction: final kept fraction 1 - r, in [0, 1].
        anneal_fraction: fraction of training over which it anneals, in (0, 1].
    """
    progress = _check_progress(progress)
    _check_fraction("target_keep_fraction", target_keep_fraction)
    _check_fraction("anneal_fraction", anneal_fraction, allow_zero=False)
    ramp = min(progress / anneal_fraction, 1.0)
    return target_keep_fraction + (1.0 - target_keep_fraction) * 0.5 * (1.0 + math.cos(math.pi * ramp))


class RCPScheduleState(NamedTuple):
    """Values of the RCP schedules at one point of training."""

    temperature: float
    noise: bool
    target_keep_fraction: float


@dataclass(frozen=True)
class RCPSchedule:
    """All RCP training schedules with their settings (defaults from METHODS.md §3).

    Args:
        target_keep_fraction: final kept fraction 1 - r, in [0, 1].
        temperature_start: Gumbel temperature at the start.
        temperature_end: Gumbel temperature after annealing.
        temperature_anneal_fraction: fraction of training over which the temperature anneals.
        noise_off_fraction: progress from which logistic noise is off.
        sparsity_anneal_fraction: fraction of training over which the keep target anneals from 1.
    """

    target_keep_fraction: float
    temperature_start: float = 1.5
    temperature_end: float = 0.2
    temperature_anneal_fraction: float = 0.6
    noise_off_fraction: float = 0.8
    sparsity_anneal_fraction: float = 0.1

    def __post_init__(self) -> None:
        self(0.0)

    def __call__(self, progress: float) -> RCPScheduleState:
        """The schedule values at `progress` in [0, 1]."""
        return RCPScheduleState(
            temperature=gumbel_temperature(
                progress, self.temperature_start, self.temperature_end, self.temperature_anneal_fraction
            ),
            noise=gumbel_noise_enabled(progress, self.noise_off_fraction),
            target_keep_fraction=sparsity_target_keep(
                progress, self.target_keep_fraction, self.sparsity_anneal_fraction
            ),
        )


@dataclass(frozen=True)
class WarmupCosineLambda:
    """LR multiplier: linear warm-up to 1, then cosine decay to `final_ratio` at `total_steps`.

    A callable object rather than a closure, so `LambdaLR.state_dict()` saves it and it pickles
    (spawned workers, checkpoints).

    Args:
        total_steps: planned optimiser steps (>= 1).
        warmup_steps: steps of linear warm-up (>= 0).
        final_ratio: multiplier at and after `total_steps`, in [0, 1].
    """

    total_steps: int
    warmup_steps: int
    final_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # LambdaLR evaluates step 0 before the first update: start at 1/warmup, not 0.
            return (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 0:  # warm-up took every planned step: no decay phase, final_ratio from here on
            return self.final_ratio
        ramp = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * ramp))


def warmup_cosine_lr_lambda(
    total_steps: int,
    warmup_fraction: float = 0.1,
    final_ratio: float = 0.1,
) -> WarmupCosineLambda:
    """Multiplier for `torch.optim.lr_scheduler.LambdaLR` (stepped once per optimiser step).

    Args:
        total_steps: planned optimiser steps (>= 1).
        warmup_fraction: fraction of steps with linear warm-up, in [0, 1).
        final_ratio: final multiplier of the base learning rate, in [0, 1].
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction={warmup_fraction} must be in [0, 1)")
    _check_fraction("final_ratio", final_ratio)
    warmup_steps = math.ceil(warmup_fraction * total_steps)  # a positive fraction warms up for at least one step
    return WarmupCosineLambda(total_steps=total_steps, warmup_steps=warmup_steps, final_ratio=final_ratio)
