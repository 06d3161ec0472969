r"""How fast does a tiny LLaVA learn to find objects among its visual tokens? A short training probe.

Trains a fresh tiny LLaVA (no Lightning, one process) on a slice of the synthetic benchmark and prints the
validation accuracy of the first answer token (teacher-forced argmax, per family) every `--eval-every` steps.
It is the tool behind the base-model analysis in docs/findings.md: it varies one thing at a time (depth, width, scene
size, prompt layout, residual initialisation, a per-patch recognition loss on the projector output) at a fraction
of the main job's cost.

    OMP_NUM_THREADS=1 python scripts/grounding_probe.py --llm-layers 1 --vision-layers 1 --objects 2 2 \
        --families query_ref --key-last --steps 1000

`--key-last` rewrites "what is the size of the red object ?" as "size of red" with no assistant turn, so the
answer is predicted on the referring word itself: the lookup needs one attention hop instead of two.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from datamodules.synthetic_vqa import COLORS, SHAPES, SIZES  # noqa: E402
from lvlm_prune.data import answer_cross_entropy  # noqa: E402
from lvlm_prune.modeling.grounding import AttentionGrounding, grounding_queries  # noqa: E402
from lvlm_prune.modeling.optimizers import OPTIMIZERS, build_optimizer  # noqa: E402
from lvlm_prune.modeling.tiny import (  # noqa: E402
    GROWTH_PLACEMENTS, RESIDUAL_INITS, TinyLlavaSpec, build_tiny_llava, grow_llava_depth,
)
from lvlm_prune.rcp.schedules import WarmupCosineLambda  # noqa: E402

def key_last_prompt(question: str, context: str | None = None, with_image: bool = True) -> str:
    match = re.fullmatch(r"what is the (\w+) of the (.+) \?", question)
    if match is None:
        raise ValueError(f"--key-last needs query_ref questions, got {question!r}")
    return f"USER: <image>\n{match.group(1)} of {match.group(2).replace(' object', '')}"


def datamodule(args: argparse.Namespace) -> SyntheticVQADataModule:
    low, high = args.objects
    dm = SyntheticVQADataModule(
        num_train=args.steps * args.batch_size, num_val=args.num_val, batch_size=args.batch_size,
        eval_batch_size=128, min_objects=low, max_objects=high, train_min_objects=args.train_min_objects,
        families=tuple(args.families),
        turns_per_image=args.turns, describe_fraction=args.describe_fraction, context_fraction=args.context_fraction,
        train_skip=args.train_skip, grounding_evidence=args.grounding_weight > 0,
        text_only_fraction=args.text_only_fraction, pack_length=args.pack_length,
    )
    if args.train_family_weights:
        dm.samples("val")  # validation keeps the uniform mix; training draws (first and extra turns) by weight
        weights = dict(item.split("=", 1) for item in args.train_family_weights if "=" in item)
        unknown = [item for item in args.train_family_weights if item.split("=", 1)[0] not in args.families]
        if unknown or len(weights) != len(args.train_family_weights):
            raise SystemExit(f"--train-family-weights takes FAMILY=N with FAMILY one of --families; got {unknown or args.train_family_weights}")
        dm.config = replace(dm.config, families=tuple(f for f in args.families for _ in range(int(weights.get(f, 1)))))
    if args.key_last:
        dm.template = replace(dm.template)
        object.__setattr__(dm.template, "prompt", key_last_prompt)
        dm.collator.template = dm.train_collator.template = dm.template
    return dm


def patch_targets(scenes, question_ids: list[str], grid: int, position: bool) -> torch.Tensor:
    """(B, grid*grid, 3 or 5) class ids per patch: colour, shape, size (0 = no object) [, row, col]."""
    fields = 5 if position else 3
    targets = torch.zeros(len(question_ids), grid * grid, fields, dtype=torch.long)
    for i, qid in enumerate(question_ids):
        for obj in scenes[qid].objects:
            cell = obj.row * grid + obj.col
            targets[i, cell, 0] = 1 + list(COLORS).index(obj.color)
            targets[i, cell, 1] = 1 + SHAPES.index(obj.shape)
            targets[i, cell, 2] = 1 + SIZES.index(obj.size)
    if position:
        cells = torch.arange(grid * grid)
        targets[:, :, 3], targets[:, :, 4] = cells // grid, cells % grid
    return targets


def evidence_attention(model, grounding: AttentionGrounding, dm: SyntheticVQADataModule) -> dict[str, float]:
    """Per family, the supervised heads' mean attention mass on the answer's evidence at validation questions."""
    grid, mass, count = dm.config.grid, {}, {}
    samples = dm.samples("val")
    model.eval()
    with torch.no_grad():
        for start in range(0, len(samples), 128):
            chunk = samples[start:start + 128]
            examples = [replace(dm._eval_example(s, 0), evidence=(tuple(o.row * grid + o.col for o in s.relevant),))
                        for s in chunk]
            batch = dm.collator(examples)
            queries = grounding_queries(batch)
            with grounding.capturing():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], pixel_values=batch["pixel_values"])
            for layer in grounding.layers:
                on_evidence = grounding.evidence_mass(layer, queries, batch["attention_mask"])
                for q, value in zip(queries, on_evidence.mean(1).tolist()):
                    family = chunk[q.row].family
                    mass[family] = mass.get(family, 0.0) + value
                    count[family] = count.get(family, 0) + 1
    model.train()
    return {f: mass[f] / count[f] for f in sorted(mass)}


def first_answer_accuracy(model, batches) -> tuple[float, dict[str, float]]:
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], pixel_values=batch["pixel_values"]).logits
            labels = batch["labels"]
            for i, family in enumerate(batch["categories"]):
                first = int((labels[i] != -100).nonzero()[0, 0])
                hit = int(logits[i, first - 1].argmax() == labels[i, first])
                correct[family] = correct.get(family, 0) + hit
                total[family] = total.get(family, 0) + 1
    model.train()
    return sum(correct.values()) / sum(total.values()), {f: correct[f] / total[f] for f in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm-layers", type=int, default=12)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128, help="LLM width (the MLP is twice as wide)")
    parser.add_argument("--intermediate-size", type=int, default=None, help="LLM MLP width (default: twice the width)")
    parser.add_argument("--num-heads", type=int, default=4, help="LLM query heads")
    parser.add_argument("--num-kv-heads", type=int, default=2, help="LLM key/value heads (= --num-heads: no GQA)")
    parser.add_argument("--objects", type=int, nargs=2, default=(4, 7), metavar=("MIN", "MAX"))
    parser.add_argument("--train-min-objects", type=int, default=None, help="fewest objects of a training scene")
    parser.add_argument("--families", nargs="+", default=["query_ref"])
    parser.add_argument("--train-family-weights", nargs="+", default=[], metavar="FAMILY=N",
                        help="draw training questions of FAMILY N times as often (integer; validation stays uniform)")
    parser.add_argument("--key-last", action="store_true")
    parser.add_argument("--residual-init", choices=RESIDUAL_INITS, default="normal",
                        help="zero: residual output projections start at 0 (every block starts as the identity)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--describe-fraction", type=float, default=0.0)
    parser.add_argument("--context-fraction", type=float, default=0.0)
    parser.add_argument("--text-only-fraction", type=float, default=0.0,
                        help="training examples as text alone (the scene's description, no image)")
    parser.add_argument("--pack-length", type=int, default=None, help="pack training batches into rows of this length")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                        help="muon: Muon on the linear layers' matrices, AdamW on the rest (lvlm_prune.modeling.optimizers)")
    parser.add_argument("--patch-aux", type=float, default=0.0,
                        help="weight of a per-patch colour/shape/size loss on the projector output (0: off)")
    parser.add_argument("--patch-aux-position", action="store_true", help="the per-patch loss also predicts row/col")
    parser.add_argument("--grounding-weight", type=float, default=0.0,
                        help="weight of the attention-grounding loss (lvlm_prune.modeling.grounding; 0: off)")
    parser.add_argument("--grounding-layers", type=int, nargs="+", default=[2])
    parser.add_argument("--grounding-heads", type=int, nargs="+", default=[0])
    parser.add_argument("--num-val", type=int, default=384)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--save", type=Path, default=None, help="write the trained model's state dict here")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from a state dict written by --save (of a model with --init-layers LLM layers)")
    parser.add_argument("--init-layers", type=int, default=None,
                        help="LLM depth of --init-from; fewer than --llm-layers grows it (grow_llava_depth)")
    parser.add_argument("--train-skip", type=int, default=0, help="skip this many training samples (a later stage)")
    parser.add_argument("--grow-placement", choices=GROWTH_PLACEMENTS, default="spread")
    args = parser.parse_args()

    if args.patch_aux > 0 and args.text_only_fraction > 0:
        raise SystemExit("--patch-aux needs an image in every training example; drop --text-only-fraction")
    if args.init_layers is not None and args.init_from is None:
        raise SystemExit("--init-layers is the depth of the --init-from model: give --init-from too")
    if args.init_layers is not None and args.init_layers > args.llm_layers:
        raise SystemExit(f"--init-layers {args.init_layers} is deeper than --llm-layers {args.llm_layers}: the probe "
                         "grows a model, it does not shrink one")
    dm = datamodule(args)
    tokenizer = dm.processor.tokenizer
    spec = TinyLlavaSpec(num_layers=args.llm_layers, vision_layers=args.vision_layers, residual_init=args.residual_init,
                         hidden_size=args.hidden_size, intermediate_size=args.intermediate_size or 2 * args.hidden_size,
                         num_heads=args.num_heads, num_kv_heads=args.num_kv_heads)
    if args.init_from is not None:
        spec = replace(spec, num_layers=args.init_layers or args.llm_layers)
    model = build_tiny_llava(spec, len(tokenizer), dm.image_token_id, tokenizer.pad_token_id,
                             tokenizer.bos_token_id, tokenizer.eos_token_id, seed=0)
    if args.init_from is not None:
        model.load_state_dict(torch.load(args.init_from))
        if spec.num_layers < args.llm_layers:
            model = grow_llava_depth(model, args.llm_layers, args.grow_placement, seed=1)
        print(f"start: {spec.num_layers}-layer model from {args.init_from}, val {first_answer_accuracy(model, list(dm.val_dataloader()))[0]:.3f}",
              flush=True)
    params = list(model.parameters())
    projected: list[torch.Tensor] = []
    if args.patch_aux > 0:
        classes = [len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1] + ([dm.config.grid] * 2 if args.patch_aux_position else [])
        aux_head = torch.nn.Linear(spec.hidden_size, sum(classes))
        params += list(aux_head.parameters())
        model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: projected.append(o))
        scenes = {s.question_id: s.scene for s in dm.samples("train")}
    if args.optimizer == "muon":
        if args.patch_aux > 0:
            raise SystemExit("--optimizer muon does not train the --patch-aux head; use one or the other")
        optimizer = build_optimizer(model, "muon", args.learning_rate, args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosineLambda(args.steps, args.warmup_steps, 0.1))
    val = list(dm.val_dataloader())
    grounding = AttentionGrounding(model, args.grounding_layers, args.grounding_heads) if args.grounding_weight > 0 else None
    start, step = time.time(), 0
    for batch in dm.train_dataloader():
        projected.clear()
        with grounding.capturing() if grounding else contextlib.nullcontext():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], pixel_values=batch["pixel_values"]).logits
        loss = answer_cross_entropy(logits, batch["labels"])
        ground = grounding.loss(grounding_queries(batch), batch["attention_mask"]) if grounding else None
        if projected:
            targets = patch_targets(scenes, batch["question_ids"], dm.config.grid, args.patch_aux_position)
            pieces = aux_head(projected.pop()).split(classes, dim=-1)
            aux = sum(torch.nn.functional.cross_entropy(p.flatten(0, 1), targets[..., k].flatten())
                      for k, p in enumerate(pieces)) / len(pieces)
            loss_total = loss + args.patch_aux * aux
        else:
            loss_total = loss
        if ground is not None:
            loss_total = loss_total + args.grounding_weight * ground
        optimizer.zero_grad()
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            accuracy, per_family = first_answer_accuracy(model, val)
            families = " ".join(f"{f} {a:.2f}" for f, a in per_family.items())
            aux_text = f"  aux {aux.item():.3f}" if args.patch_aux > 0 else ""
            if ground is not None:
                masses = " ".join(f"{f} {m:.2f}" for f, m in evidence_attention(model, grounding, dm).items())
                aux_text += f"  grounding {ground.item():.3f} (val attention on evidence: {masses})"
            print(f"step {step:5d}  loss {loss.item():.3f}{aux_text}  val {accuracy:.3f}  ({families})  "
                  f"{time.time() - start:.0f}s", flush=True)
        if step >= args.steps:
            break
    if not math.isfinite(loss.item()):
        raise SystemExit("training diverged")
    if args.save is not None:
        torch.save(model.state_dict(), args.save)


if __name__ == "__main__":
    main()
