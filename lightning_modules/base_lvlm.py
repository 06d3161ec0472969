"""Training the embedded default's base LVLM from scratch (all parameters train)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn

from lightning_modules.common import (
    BASE_TRAINING_MEMORY_SETTINGS,
    check_writable_directory,
    EVALUATION_MEMORY_SETTINGS,
    decode_answers,
    deepspeed_fp32_masters,
    exact_match,
    generates_in_lockstep,
    log_accuracy,
    out_of_memory_advice,
    pad_after_eos,
    partitioned,
    prediction_records,
    score,
    whole_state_dict,
)
from lvlm_prune.archives import staged_export, with_default_permissions
from lvlm_prune.data import additive_attention_mask, answer_cross_entropy
from lvlm_prune.generation import stock_greedy_generate
from lvlm_prune.modeling.grounding import AttentionGrounding, grounding_queries
from lvlm_prune.modeling.loading import load_base_model, unread_vision_modules
from lvlm_prune.modeling.optimizers import OPTIMIZERS, OptimizerName, build_optimizer
from lvlm_prune.modeling.tiny import (
    GROWTH_PLACEMENTS,
    TinyLlavaSpec,
    build_tiny_llava,
    build_tiny_llava_config,
    grow_llava_depth,
)
from lvlm_prune.rcp.schedules import WarmupCosineLambda


class BaseLVLMModule(L.LightningModule):
    """A tiny `LlavaForConditionalGeneration` trained on the synthetic benchmark.

    Args:
        processor: the data's LlavaProcessor (linked from the datamodule by the CLI).
        categories: question families for per-family accuracy (linked from the datamodule).
        spec: shape of the tiny model.
        learning_rate: peak learning rate.
        weight_decay: decoupled weight decay of the weight matrices (not of norms and biases).
        optimizer: 'adamw', or 'muon': Muon on the linear layers' weight matrices of the LLM, vision tower and
            projector, AdamW on embeddings, LM head, norms and biases (`lvlm_prune.modeling.optimizers`; Muon's update
            is scaled to AdamW's RMS, so AdamW's learning rate carries over). Not for DeepSpeed ZeRO or FSDP,
            which shard and flatten the matrices Muon orthogonalises.
        warmup_steps: linear warm-up steps before the cosine decay.
        max_new_tokens: longest generated answer at evaluation.
        attn_implementation: sdpa | eager.
        export_dir: where the trained model + processor are saved (`save_pretrained`) at the end of fit.
        seed: initialisation seed of the model weights.
        init_from: directory of an earlier stage's export to start from instead of random weights. Its shape
            must be `spec`'s, except that it may have fewer LLM layers: it is then grown to `spec.num_layers`
            (`grow_llava_depth`: the trained layers spread out, new layers start as the identity, the function is
            unchanged). The embedded default trains a 4-layer LLM, grows it to 12 and trains on
            (configs/synthetic/base_describe.yaml, base_stage1.yaml, then base.yaml).
        grow_placement: where the trained layers go when growing: 'spread' or 'bottom'.
        grounding_weight: weight of the attention-grounding loss (`lvlm_prune.modeling.grounding`): the chosen heads,
            at the position predicting each answer, are trained to attend to the visual tokens the answer depends
            on. Needs data that knows them (`data.grounding_evidence`); 0 turns it off.
        grounding_layers: LLM layers whose heads it supervises (indices of this model's depth).
        grounding_heads: query heads it supervises in each of those layers.
    """

    def __init__(
        self,
        processor: Any = None,
        categories: list[str] | None = None,
        spec: TinyLlavaSpec = TinyLlavaSpec(),
        learning_rate: float = 2e-3,
        weight_decay: float = 0.01,
        optimizer: OptimizerName = "adamw",
        warmup_steps: int = 100,
        max_new_tokens: int = 24,
        attn_implementation: str = "sdpa",
        export_dir: str | None = None,
        seed: int = 0,
        init_from: str | None = None,
        grow_placement: str = "spread",
        grounding_weight: float = 0.0,
        grounding_layers: tuple[int, ...] = (2,),
        grounding_heads: tuple[int, ...] = (0,),
    ):
        super().__init__()
        if isinstance(spec, dict):  # restored from a checkpoint's hyper-parameters
            spec = TinyLlavaSpec(**spec)
        if grow_placement not in GROWTH_PLACEMENTS:
            raise ValueError(f"model.grow_placement={grow_placement!r}; choose one of {GROWTH_PLACEMENTS}")
        if processor is None:
            raise ValueError("model.processor is missing: it is linked from the datamodule (data.processor)")
        self.save_hyperparameters(ignore=["processor"])
        self.processor = processor
        tokenizer = processor.tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        crop = processor.image_processor.crop_size["height"]
        if crop != spec.image_size:
            raise ValueError(f"model.spec.image_size={spec.image_size} but the processor crops images to {crop}")
        patch = getattr(processor, "patch_size", None)  # how many image tokens the prompt gets
        if patch is not None and patch != spec.patch_size:
            raise ValueError(f"model.spec.patch_size={spec.patch_size} but the processor's patch_size is {patch} "
                             "(the synthetic data's data.init_args.cell_size, or the processor of "
                             "data.init_args.processor_path)")
        ids = dict(vocab_size=len(tokenizer), image_token_id=self.image_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if init_from is None:
            self.model = build_tiny_llava(spec, **ids, attn_implementation=attn_implementation, seed=seed)
        else:
            self.model = _initial_model(init_from, spec, ids, attn_implementation, grow_placement, seed)
        # trained, they would never get a gradient: plain DDP stops at its second step on such parameters
        for module in unread_vision_modules(self.model):
            module.requires_grad_(False)
        if not learning_rate > 0:
            raise ValueError(f"model.init_args.learning_rate={learning_rate} must be > 0")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model.init_args.optimizer={optimizer!r}; choose one of {list(OPTIMIZERS)}")
        if max_new_tokens < 1:
            raise ValueError(f"model.init_args.max_new_tokens={max_new_tokens} must be at least 1 (the longest "
                             "generated answer, in tokens)")
        if grounding_weight < 0:
            raise ValueError(f"model.grounding_weight={grounding_weight} must be at least 0")
        self.grounding = (AttentionGrounding(self.model, grounding_layers, grounding_heads)
                          if grounding_weight > 0 else None)
        self.categories = list(categories or [])
        self.val_accuracy = exact_match(self.categories)
        self.test_accuracy = exact_match(self.categories)
        self.test_predictions: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        mask = batch["attention_mask"]
        if mask.ndim == 4 and self.model.config.get_text_config()._attn_implementation == "eager":
            mask = additive_attention_mask(mask, self.model.dtype)  # packed rows: eager adds its mask to the scores
        return self.model(
            input_ids=batch["input_ids"], attention_mask=mask,
            position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
        ).logits

    def on_fit_start(self) -> None:
        self._train_ended = False
        if self.hparams.export_dir and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(f"model.init_args.export_dir: the export gathers DeepSpeed's partitions, not "
                             f"{type(self.trainer.strategy).__name__}'s shards, and would write them as they are; "
                             "train the base under ddp or a DeepSpeed preset (configs/trainer/deepspeed_zero*.yaml)")
        # from_pretrained (init_from) returns eval mode and Lightning does not switch a module to training at fit
        # start: a stage continued from an export would train without its dropout
        self.model.train()
        if self.hparams.export_dir and self.trainer.is_global_zero:
            check_writable_directory(self.hparams.export_dir, "model.init_args.export_dir")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        size = len(batch["question_ids"])  # examples, also when packed into fewer rows
        with out_of_memory_advice("the training step", BASE_TRAINING_MEMORY_SETTINGS):
            if self.grounding is None:
                loss = answer_cross_entropy(self(batch), batch["labels"])
            else:
                with self.grounding.capturing():
                    loss = answer_cross_entropy(self(batch), batch["labels"])
                if "grounding" not in batch:
                    raise ValueError("model.grounding_weight > 0 but the training batches carry no evidence: set "
                                     "data.grounding_evidence=true (the synthetic data module knows it)")
                grounding = self.grounding.loss(grounding_queries(batch), batch["attention_mask"])
                self.log("train/grounding_loss", grounding, batch_size=size)
                self.log("train/answer_loss", loss, batch_size=size)
                loss = loss + self.hparams.grounding_weight * grounding
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # the closure runs the training step and its backward pass; the step itself allocates AdamW's moments
        with out_of_memory_advice("the training step, its backward pass or the optimizer step",
                                  BASE_TRAINING_MEMORY_SETTINGS):
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def generate(self, batch: dict[str, Any]) -> list[str]:
        tokenizer = self.processor.tokenizer
        lockstep = generates_in_lockstep(self)  # ZeRO-3 on several ranks: every rank decodes every step
        eos = tokenizer.eos_token_id
        tokens = stock_greedy_generate(
            self.model, batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
            position_ids=batch["prompt_position_ids"], max_new_tokens=self.hparams.max_new_tokens,
            eos_token_id=None if lockstep else eos, pad_token_id=tokenizer.pad_token_id,
        )
        if lockstep and eos is not None:
            tokens = pad_after_eos(tokens, eos, tokenizer.pad_token_id)
        return decode_answers(tokenizer, tokens)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> list[str]:
        size = batch["pixel_values"].shape[0]
        with out_of_memory_advice(f"the {stage} step", EVALUATION_MEMORY_SETTINGS):
            if "labels" in batch:
                loss = answer_cross_entropy(self(batch), batch["labels"])
                self.log(f"{stage}/loss", loss, batch_size=size, sync_dist=True)
            predictions = self.generate(batch)
        metric = self.val_accuracy if stage == "val" else self.test_accuracy
        score(metric, predictions, batch)
        return predictions

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy(self.val_accuracy, "val")

    def on_test_epoch_start(self) -> None:
        self.test_predictions = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        predictions = self._evaluate(batch, "test")
        self.test_predictions.extend(prediction_records(batch, predictions, model_id="tiny-llava"))

    def on_test_epoch_end(self) -> None:
        self._log_accuracy(self.test_accuracy, "test")

    def _log_accuracy(self, metric, stage: str) -> None:
        log_accuracy(self, metric, stage)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("optimizer_states") or []
        if not states or self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return  # validate / test load the weights only
        saved = "muon" if set(states[0]) == {"muon", "adamw"} else "adamw"
        if saved != self.hparams.optimizer:
            raise ValueError(f"the checkpoint's optimizer state is {saved}'s, but model.init_args.optimizer="
                             f"{self.hparams.optimizer!r}: resume with optimizer: {saved}, or start a new run")

    def configure_optimizers(self):
        sharding = (DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy)
        if self.hparams.optimizer == "muon" and isinstance(self.trainer.strategy, sharding):
            raise ValueError(f"model.init_args.optimizer=muon does not run under {type(self.trainer.strategy).__name__} "
                             "(it shards and flattens the weight matrices Muon orthogonalises); use adamw with it")
        optimizer = build_optimizer(self.model, self.hparams.optimizer, self.hparams.learning_rate,
                                    self.hparams.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, WarmupCosineLambda(int(self.trainer.estimated_stepping_batches), self.hparams.warmup_steps, 0.1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        self._train_ended = True
        self._export()

    def on_fit_end(self) -> None:
        # fit resumed from a checkpoint where training had ended runs no training loop, and no on_train_end
        if not self._train_ended and self.global_step > 0 and self.trainer.fit_loop.done:
            self._export_after_finished_resume()

    def _export_after_finished_resume(self) -> None:
        """`on_fit_end` runs after the strategy's teardown: DeepSpeed's module is back on the CPU, where its fp32
        master gather (a collective) fails under NCCL, so there the checkpoint is exported instead."""
        if not self.hparams.export_dir:
            return
        if isinstance(self.trainer.strategy, DeepSpeedStrategy):
            checkpoint = self.trainer.ckpt_path or "<checkpoint dir>"
            raise ValueError(
                f"fit resumed from a checkpoint at step {self.global_step}, where training had already ended, so the "
                f"export to model.init_args.export_dir={self.hparams.export_dir!r} did not run, and under DeepSpeed "
                "it cannot run after fit; export it from the checkpoint: lightning.pytorch.utilities.deepspeed."
                f"convert_zero_checkpoint_to_fp32_state_dict({str(checkpoint)!r}, <file>) consolidates its weights, "
                "then load the file's 'state_dict' into the model with strict=False (the checkpoint leaves out the "
                "frozen weights) and save_pretrained it (the commands are in docs/operations.md, 'Resuming a run "
                "whose training had ended')"
            )
        self._export()

    def _export(self) -> None:
        """Every rank calls it: under DeepSpeed the weights are gathered (ZeRO-3) and taken from the fp32 masters."""
        if not self.hparams.export_dir:
            return
        keep = self.trainer.is_global_zero
        masters = deepspeed_fp32_masters(self.trainer.strategy, self.model, keep=keep)
        state = None
        if masters or partitioned(self.model.parameters()):
            state = whole_state_dict(self.model, keep=keep, overrides=masters)
        if keep:
            with staged_export(self.hparams.export_dir) as staging:
                self.model.save_pretrained(staging, state_dict=state)
                if masters:  # the weights are DeepSpeed's fp32 masters; save_pretrained records the module's dtype
                    record_dtype(staging / "config.json", "float32")
                self.processor.save_pretrained(staging)
                for weights in staging.glob("*.safetensors"):
                    with_default_permissions(weights)


def record_dtype(config_path: Path, dtype: str) -> None:
    """Sets every `dtype` entry of a saved config (its sub-configs' too) to `dtype`: the one transformers loads with
    under `dtype="auto"`."""
    def replaced(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: dtype if k in ("dtype", "torch_dtype") and v is not None else replaced(v) for k, v in value.items()}
        return value

    config_path.write_text(json.dumps(replaced(json.loads(config_path.read_text())), indent=2, sort_keys=True) + "\n")


def _initial_model(path: str, spec: TinyLlavaSpec, ids: dict, attn_implementation: str, placement: str, seed: int):
    """The model of an earlier training stage, checked against `spec` and grown to its depth."""
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.init_args.init_from={path!r} is not a directory: it is an earlier stage's export (for the embedded "
            "default: python cli.py fit --config configs/synthetic/base_describe.yaml, then base_stage1.yaml); to "
            "evaluate or resume from a checkpoint, which holds every weight, pass --model.init_args.init_from null"
        )
    model = load_base_model(path, attn_implementation=attn_implementation, setting="model.init_args.init_from")
    depth = model.config.text_config.num_hidden_layers
    expected_config = build_tiny_llava_config(TinyLlavaSpec(**{**spec.to_dict(), "num_layers": depth}), **ids)
    expected, found = expected_config.to_dict(), model.config.to_dict()
    mismatches = [
        f"{tower}.{key} is {found[tower].get(key)!r}, the spec gives {value!r}"
        for tower in ("text_config", "vision_config") for key, value in sorted(expected[tower].items())
        if key not in ("initializer_range", "dtype", "torch_dtype") and not key.startswith("_")
        and found[tower].get(key) != value
    ]
    # attributes, not to_dict() keys: the dict stores image_token_id under its legacy name, image_token_index
    mismatches += [f"{key} is {getattr(model.config, key, None)!r}, the spec gives {getattr(expected_config, key)!r}"
                   for key in ("vision_feature_layer", "vision_feature_select_strategy", "image_token_id",
                               "image_seq_length", "projector_hidden_act", "multimodal_projector_bias")
                   if hasattr(expected_config, key) and getattr(model.config, key, None) != getattr(expected_config, key)]
    if mismatches:
        raise ValueError(
            f"model.init_args.init_from={path!r} does not match model.spec and the processor: {'; '.join(mismatches)}. "
            "init_from must be an earlier stage of the same spec (only the LLM depth may be smaller)"
        )
    if depth > spec.num_layers:
        raise ValueError(f"model.init_args.init_from={path!r} has {depth} LLM layers, more than model.spec.num_layers={spec.num_layers}")
    if depth < spec.num_layers:
        model = grow_llava_depth(model, spec.num_layers, placement, seed=seed)
    return model.float()
