"""Pieces every LightningModule of the project shares: answer decoding, scoring, prediction records."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from lvlm_prune.evaluation.metrics import ExactMatchAccuracy, stable_id
from lvlm_prune.evaluation.normalize import normalize_answer


def check_writable_directory(directory: str | Path, setting: str) -> None:
    """Creates `directory` and checks that a file can be written in it, so an export at the end of fit cannot fail
    after all of training on a path that was wrong from the start."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_check.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{setting}: cannot write to the directory {str(directory)!r} ({error}); the export at the end "
                         "of fit would fail after training") from error


def decode_answers(tokenizer: Any, tokens: torch.Tensor) -> list[str]:
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist()]


def prediction_records(batch: dict[str, Any], predictions: list[str], model_id: str) -> list[dict[str, Any]]:
    """LLaVA answer-file records (`question_id`, `prompt`, `text`, `model_id`) + the reference answer, and with a
    batch's `dataset_indices` each item's `dataset_index` (`AnswerFileWriter` writes the file in that order).

    `prompt` is the batch's `prompts` where it has them: the question file's own text, without the
    `question_suffix` the model read (LLaVA's scripts match MME and TextVQA answers to questions by it)."""
    records = [
        {"question_id": qid, "prompt": prompt, "text": pred, "model_id": model_id, "answer": answer,
         "category": category}
        for qid, prompt, pred, answer, category in zip(
            batch["question_ids"], batch.get("prompts") or batch["questions"], predictions, batch["answers"],
            batch["categories"]
        )
    ]
    for record, index in zip(records, batch.get("dataset_indices") or []):
        record["dataset_index"] = index
    return records


def exact_match(categories: list[str]) -> ExactMatchAccuracy:
    return ExactMatchAccuracy(categories=list(categories))


def score(metric: ExactMatchAccuracy, predictions: list[str], batch: dict[str, Any]) -> None:
    """Exact match on the items that have a reference answer (benchmark test files may have none)."""
    keep = [i for i, answer in enumerate(batch["answers"]) if answer is not None]
    if not keep:
        return
    categories = [batch["categories"][i] for i in keep] if metric.categories else None
    # by question id and question: a distributed sampler repeats items to even out the ranks, and a repeat must
    # count once; MME gives both questions about an image one id, and both count
    questions = batch.get("questions") or [""] * len(batch["answers"])
    ids = ([stable_id(f"{batch['question_ids'][i]}\x00{questions[i]}") for i in keep]
           if "question_ids" in batch else None)
    metric.update([normalize_answer(predictions[i]) for i in keep],
                  [normalize_answer(batch["answers"][i]) for i in keep], categories, ids)


def log_accuracy(module: Any, metric: ExactMatchAccuracy, stage: str) -> dict[str, float]:
    """Log `{stage}/acc` (progress bar) and `{stage}/acc/<category>`; categories never seen are skipped."""
    values = {k: float(v) for k, v in metric.compute().items() if not math.isnan(float(v))}
    metric.reset()
    if "acc" not in values:  # no item had a reference answer
        return values
    module.log(f"{stage}/acc", values["acc"], prog_bar=True)
    module.log_dict({f"{stage}/{k}": v for k, v in values.items() if k != "acc"})
    return values


# What lowers memory, by where it ran out (the training step's backward needs more than generation).
TRAINING_MEMORY_SETTINGS = (
    "Lower data.init_args.batch_size (raise trainer.accumulate_grad_batches to keep the effective batch), lower "
    "data.init_args.max_length, load the base quantised (model.init_args.quantization: 4bit or 8bit), or, instead "
    "of quantising, add a DeepSpeed preset (--config configs/trainer/deepspeed_zero2.yaml, or deepspeed_zero3.yaml, "
    "which also partitions the frozen base)"
)
EVALUATION_MEMORY_SETTINGS = (
    "Lower data.init_args.eval_batch_size, lower data.init_args.max_length, or load the base quantised "
    "(model.init_args.quantization: 4bit or 8bit)"
)
# The from-scratch base trains every weight: quantising it is not an option.
BASE_TRAINING_MEMORY_SETTINGS = (
    "Lower data.init_args.batch_size (raise trainer.accumulate_grad_batches to keep the effective batch), lower "
    "data.init_args.max_length, or add a DeepSpeed preset (--config configs/trainer/deepspeed_zero2.yaml)"
)


@contextlib.contextmanager
def out_of_memory_advice(where: str, settings: str = TRAINING_MEMORY_SETTINGS) -> Iterator[None]:
    """Re-raise an out-of-memory error (CUDA, or the CPU allocator's) with the settings that lower memory."""
    try:
        yield
    except RuntimeError as error:  # torch.OutOfMemoryError is a RuntimeError
        advised = str(error).startswith("out of memory in ")
        if advised or not (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)):
            raise
        raise type(error)(f"out of memory in {where}. {settings}\n{error}") from error


def check_quantization_fits_strategy(quantization: str | None, strategy: Any) -> None:
    """A bitsandbytes base cannot be sharded: DeepSpeed casts every weight to its precision and ZeRO-3 and FSDP
    flatten them, which breaks the packed 4-/8-bit weights and their quantisation state."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if quantization is not None and isinstance(strategy, (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)):
        raise ValueError(f"model.init_args.quantization={quantization!r} does not run under "
                         f"{type(strategy).__name__}, which casts or shards the base's weights: use it with ddp or a "
                         "single device, or drop the quantisation and keep the DeepSpeed preset")


def partitioned(parameters: Iterable[torch.nn.Parameter]) -> bool:
    """Whether any parameter is a DeepSpeed ZeRO-3 partition (every call of its module gathers it collectively)."""
    return any(hasattr(p, "ds_id") for p in parameters)


def gathered(parameters: Iterable[torch.nn.Parameter]):
    """Context in which ZeRO-3 partitioned `parameters` are whole on every rank (a no-op otherwise)."""
    parameters = list(parameters)
    if not partitioned(parameters):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)


def deepspeed_fp32_masters(strategy: Any, module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """Under DeepSpeed, the optimiser's fp32 master copy of each trainable weight of `module`, on CPU: with bf16
    DeepSpeed casts the module's own weights to bf16, and an export (like `scripts/export_plugin.py` from a
    checkpoint) keeps full precision. Empty elsewhere, or where DeepSpeed keeps no separate master (fp32 training).
    A collective under ZeRO-3, so every rank calls it; only ranks with `keep` hold the copies (one whole weight at
    a time is on the device)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad or (hasattr(parameter, "ds_id") and not hasattr(parameter, "_z3_optimizer")):
            continue
        master = safe_get_full_fp32_param(parameter)
        if master is not None and keep:
            masters[name] = master.detach().float().cpu()
    return masters


def whole_state_dict(module: torch.nn.Module, keep: bool = True,
                     overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
    """`module.state_dict()` on CPU with every ZeRO-3 partition gathered, one submodule's weights at a time, so no
    rank ever holds the whole model on its device (saving a partitioned model's own state dict writes empty
    tensors). `overrides` (by parameter name, e.g. `deepspeed_fp32_masters`) replace those weights, under every
    name they are tied to. A collective under ZeRO-3: every rank calls it; ranks without `keep` get None."""
    by_id: dict[int, torch.Tensor] = {}
    for submodule in module.modules():  # the same gathers on every rank, whatever each rank keeps
        direct = list(submodule.parameters(recurse=False))
        if not direct:
            continue
        with gathered(direct):
            if keep:
                by_id.update((id(p), p.detach().to("cpu", copy=True)) for p in direct)
    if not keep:
        return None
    state = {name: by_id[id(value)] if id(value) in by_id else value.detach().cpu()
             for name, value in module.state_dict(keep_vars=True).items()}
    return {**state, **under_every_name(module, overrides)}


def under_every_name(module: torch.nn.Module, overrides: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """`overrides` (by parameter name, as `named_parameters()` lists a tied weight: once) under every state-dict name
    of the same parameter (a tied weight, e.g. GPT-2's `lm_head.weight` and `transformer.wte.weight`, has one per
    module it is tied into): overriding one name alone writes the other's value too, and loading copies whichever
    comes last into the shared tensor."""
    if not overrides:
        return {}
    by_id = {id(p): overrides[name] for name, p in module.named_parameters() if name in overrides}
    tied = {name: by_id[id(value)] for name, value in module.state_dict(keep_vars=True).items() if id(value) in by_id}
    return {**overrides, **tied}


def generates_in_lockstep(module: Any) -> bool:
    """Whether every rank must make the same module calls while generating: ZeRO-3 partitioned weights and several
    processes. Ranks then decode max_new_tokens steps whatever EOS says (`pad_after_eos` tidies the tokens)."""
    return partitioned(module.parameters()) and module._trainer is not None and module.trainer.world_size > 1


def pad_after_eos(tokens: torch.Tensor, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """(B, T) generated ids with every token after each row's first EOS replaced by padding."""
    after = (tokens == eos_token_id).long().cumsum(1) - (tokens == eos_token_id).long() > 0
    return tokens.masked_fill(after, pad_token_id)
