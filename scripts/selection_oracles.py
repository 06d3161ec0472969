"""Which visual tokens does a trained base answer from? Oracle selections beside real methods, on the synthetic test split.

    python scripts/selection_oracles.py --run-dir runs/demo [--num 512] [--keep 7] [--objects LOW HIGH]
        [--methods full random relevant_fill relevant_objects visionzip rcp q2v_by_layer gradient_signal base_attention
                   saliency_reference saliency_self]
        [--attention-layers 9] [--rcp-plugin FILE]

The oracles use the generator's knowledge of which objects each answer needs (so they exist only on the synthetic
benchmark) and keep `--keep` visual tokens before the LLM: 'relevant_fill' the tokens of those objects, then random
other tokens; 'relevant_objects' those objects, then the other objects first, then random tokens. Any training-free
method of the engine runs at the ratio that keeps the same count; 'rcp' loads `<run-dir>/rcp_r0.889/plugin.safetensors`
and also prints what its pruner kept (tokens of the objects that matter / other objects / empty cells), the share
of the needed tokens it kept, and how well each term of its keep logit ranks the needed objects' tokens above the other
objects' (pairwise AUC per question, averaged; 0.5 = no question conditioning). 'q2v_by_layer' prints the same AUC for
the base's own question->visual attention at every decoder layer (where in the LLM the question finds its objects);
'gradient_signal' the same AUC for the gradient of the answer loss with respect to each token's keep weight (on
training questions, random object tokens kept), the signal RCP's straight-through pruner learns from;
'base_attention' keeps the tokens the full-token base's own question->visual attention at `--attention-layers` ranks
highest (a label-free target a pruner could be distilled towards); 'saliency_self' keeps the tokens whose keep
weight most lowers the loss of the full-token base's own first answer token (-dCE/dw at w = 1, soft path; label-free,
the selection that best explains the base's answer), 'saliency_reference' the same for the reference answer
(teacher-forced; it knows the answer, so it measures how far a selection can steer the base, not a pruner's ceiling).
Prints accuracy overall and per question family.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from lightning_modules.compensation import CompensationModule  # noqa: E402
from lvlm_prune.baselines import build_method  # noqa: E402
from lvlm_prune.engine import KeepWeightProbe, PrunedLlava  # noqa: E402
from lvlm_prune.engine.methods import PruningMethod, top_k_mask  # noqa: E402
from lvlm_prune.modeling.loading import load_base_model  # noqa: E402
from lvlm_prune.rcp.compensation import RCPCompensation, visual_view  # noqa: E402
from lvlm_prune.rcp.losses import answer_ce  # noqa: E402
from lvlm_prune.runner import generate_with_method  # noqa: E402


def ranking_auc(scores: torch.Tensor, needed: list[int], others: list[int]) -> float | None:
    """P(score of a needed token > score of another object's token) for one question; None without both."""
    if not needed or not others:
        return None
    return (scores[needed][:, None] > scores[others][None, :]).float().mean().item()


class QuestionAttentionByLayer(PruningMethod):
    """Keeps every token; records the base's question->visual attention (original visual order) at every layer."""

    def __init__(self, num_layers: int):
        super().__init__(0.0)
        self.prune_layers = tuple(range(num_layers))
        self.attention: dict[int, torch.Tensor] = {}

    def at_layer(self, ctx):
        self.attention[ctx.layer_idx] = visual_view(ctx.question_to_visual(), ctx.state.visual_index,
                                                    ctx.num_visual.max().item())[0]
        return None


def gradient_signal(engine: PrunedLlava, base: str, num: int, keep: int, scenes: dict) -> None:
    """Does the answer loss's gradient with respect to each token's keep weight single out the objects that matter?

    Teacher-forced training questions; `keep` object tokens kept at random (RCP's pruner keeps objects); the soft path
    of RCP's training (`soft=True`). Prints the AUC of -dCE/dw (needed objects vs other objects), among the kept and
    among the dropped tokens: the signal a straight-through pruner can learn question conditioning from."""
    data = SyntheticVQADataModule(processor_path=base, num_train=num, batch_size=min(64, num), **scenes)
    data.setup("fit")
    grid = data.config.grid
    samples = {s.question_id: s for s in data.samples("train")}
    generator = torch.Generator().manual_seed(0)
    aucs: dict[str, list[float]] = {"kept": [], "dropped": []}
    for parameter in engine.model.parameters():
        parameter.requires_grad_(False)
    for batch in data.train_dataloader():
        rows = len(batch["question_ids"])
        needed = torch.zeros(rows, grid * grid, dtype=torch.bool)
        objects = torch.zeros_like(needed)
        for row, question_id in enumerate(batch["question_ids"]):
            sample = samples[question_id]
            for obj in sample.relevant:
                needed[row, obj.row * grid + obj.col] = True
            for obj in sample.scene.objects:
                objects[row, obj.row * grid + obj.col] = True
        chosen = (torch.rand(needed.shape, generator=generator) + objects.float()).topk(keep, dim=1).indices
        weights = torch.zeros(needed.shape).scatter_(1, chosen, 1.0).requires_grad_(True)
        output = engine(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"],
                        labels=batch["labels"], method=KeepWeightProbe(weights), soft=True)
        answer_ce(output.logits, batch["labels"]).backward()
        helps = -weights.grad
        for row in range(rows):
            for where, selected in (("kept", weights[row] > 0.5), ("dropped", weights[row] < 0.5)):
                auc = ranking_auc(helps[row], (needed[row] & selected).nonzero().flatten().tolist(),
                                  (objects[row] & ~needed[row] & selected).nonzero().flatten().tolist())
                if auc is not None:
                    aucs[where].append(auc)
    print("gradient signal, AUC of -dCE/d(keep weight), needed objects > other objects: "
          + ", ".join(f"{k} tokens {sum(v) / len(v):.3f} (n = {len(v)})" for k, v in aucs.items()), flush=True)


class TopKBeforeLLM(PruningMethod):
    """Keeps the `keep` highest-scoring visual tokens before the LLM; `scores(ctx)` gives (B, N) scores."""

    def __init__(self, keep: int, scores=None):
        super().__init__(0.0)
        self.keep, self._scores = keep, scores

    def planned_visual_tokens(self) -> list[float]:
        return [float(self.keep)] * self.info.num_layers

    def scores(self, ctx) -> torch.Tensor:
        return self._scores

    def before_llm(self, ctx):
        return top_k_mask(self.scores(ctx), ctx.visual_valid, self.keep)


class OracleSelection(TopKBeforeLLM):
    """Keeps `keep` tokens before the LLM: the needed objects' first, then (optionally) other objects, then random."""

    def __init__(self, keep: int, objects_next: bool, cells: dict[str, tuple[list[int], list[int]]], seed: int = 0):
        super().__init__(keep)
        self.objects_next, self.cells = objects_next, cells
        self.question_ids: list[str] = []
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, ctx) -> torch.Tensor:
        scores = torch.rand(ctx.visual_features.shape[:2], generator=self.generator)
        for row, question_id in enumerate(self.question_ids):
            needed, objects = self.cells[question_id]
            if self.objects_next:
                scores[row, objects] += 5.0
            scores[row, needed] = 10.0
        return scores


def base_attention_selection(engine: PrunedLlava, batch: dict, layers: list[int], keep: int) -> TopKBeforeLLM:
    """The `keep` tokens the full-token base's question->visual attention at `layers` (log, summed) ranks highest:
    the best a pruner distilled from the base's own attention could pick, without any label."""
    method = QuestionAttentionByLayer(engine.info.num_layers)
    with torch.no_grad():
        engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
               batch["prompt_position_ids"], method=method, logits="none")
    scores = sum(method.attention[layer].clamp_min(1e-9).log() for layer in layers)
    return TopKBeforeLLM(keep, scores)


def saliency_selection(engine: PrunedLlava, batch: dict, keep: int, reference: bool, eos: int | None,
                       pad: int | None) -> TopKBeforeLLM:
    """The `keep` tokens with the largest -dCE/d(keep weight) at every weight 1: the answer loss of the reference
    answer (`reference`, teacher-forced) or of the first token the full-token base itself generates."""
    weights = torch.ones(batch["pixel_values"].shape[0], engine.info.num_visual_tokens, requires_grad=True)
    with torch.enable_grad():
        if reference:
            output = engine(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"],
                            labels=batch["labels"], method=KeepWeightProbe(weights), soft=True)
            loss = answer_ce(output.logits, batch["labels"])
        else:
            with torch.no_grad():
                first = generate_with_method(engine, batch, PruningMethod(0.0), 1, eos, pad).tokens[:, 0]
            output = engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                            batch["prompt_position_ids"], method=KeepWeightProbe(weights), soft=True)
            loss = torch.nn.functional.cross_entropy(output.logits[:, -1].float(), first, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, weights)
    return TopKBeforeLLM(keep, -gradient)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--num", type=int, default=512, help="test questions")
    parser.add_argument("--keep", type=int, default=7, help="visual tokens kept (7 of 64 is r = 0.889)")
    parser.add_argument("--objects", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="objects per test scene (default: the benchmark's; 4 7 for runs before session 5)")
    parser.add_argument("--methods", nargs="+",
                        default=["full", "random", "relevant_fill", "relevant_objects", "visionzip", "rcp"],
                        help="also: q2v_by_layer, gradient_signal, base_attention, saliency_self, saliency_reference, "
                             "and any training-free method of the engine")
    parser.add_argument("--attention-layers", type=int, nargs="+", default=[9],
                        help="decoder layers whose question->visual attention 'base_attention' ranks by (default: 9)")
    parser.add_argument("--rcp-plugin", default=None,
                        help="RCP plug-in weights (default: <run-dir>/rcp_r0.889/plugin.safetensors)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    base = str(run / "base_model")
    scenes = dict(min_objects=args.objects[0], max_objects=args.objects[1]) if args.objects else {}
    data = SyntheticVQADataModule(processor_path=base, num_test=args.num, eval_batch_size=128, **scenes)
    grid = data.config.grid
    samples = {s.question_id: s for s in data.samples("test")}
    cells = {q: ([o.row * grid + o.col for o in s.relevant], [o.row * grid + o.col for o in s.scene.objects])
             for q, s in samples.items()}
    tokenizer = data.processor.tokenizer
    ratio = 1.0 - args.keep / grid**2

    rcp_module = None
    if "rcp" in args.methods:
        plugin = Path(args.rcp_plugin) if args.rcp_plugin else run / "rcp_r0.889" / "plugin.safetensors"
        config = json.loads(Path(str(plugin) + ".json").read_text())["config"]
        rcp_module = CompensationModule(base, RCPCompensation(**config), processor=data.processor,
                                        categories=data.categories, plugin_weights_path=str(plugin)).eval()
        first_pruner = rcp_module.compensation.pruners[0]
        components = first_pruner.components

        def recorded_components(*args, **kwargs):
            result = components(*args, **kwargs)
            if len(terms) == 0:  # the prefill's decisions (generation steps reuse them)
                terms.append({k: v.detach() for k, v in result.items()})
            return result

        first_pruner.components = recorded_components
    terms: list[dict[str, torch.Tensor]] = []
    # one frozen base for every method: the RCP module's own when it is loaded
    engine = rcp_module.engine if rcp_module is not None else PrunedLlava(load_base_model(base).eval())

    for name in args.methods:
        if name == "gradient_signal":
            gradient_signal(engine, base, args.num, args.keep, scenes)
            continue
        correct: dict[str, int] = {}
        total: dict[str, int] = {}
        kept = [0, 0, 0]  # needed objects, other objects, empty cells
        chance_needed = 0.0
        aucs: dict[str, list[float]] = {}
        # one oracle for the whole split: a fresh one per batch would draw the same random fill for the j-th
        # question of every batch
        oracle = OracleSelection(args.keep, name == "relevant_objects", cells)
        for batch in data.test_dataloader():
            if name == "q2v_by_layer":
                method = QuestionAttentionByLayer(engine.info.num_layers)
                with torch.no_grad():  # the prompt alone, as a pruner sees it (not the answer's tokens)
                    engine(batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["pixel_values"],
                           batch["prompt_position_ids"], method=method, logits="none")
                for row, question_id in enumerate(batch["question_ids"]):
                    needed, objects = cells[question_id]
                    for layer, attention in method.attention.items():
                        auc = ranking_auc(attention[row], needed, [c for c in objects if c not in needed])
                        if auc is not None:
                            aucs.setdefault(f"layer {layer:2d}", []).append(auc)
                continue
            if name == "rcp":
                method, runner = rcp_module.compensation.inference_method(ratio), engine
                terms.clear()
            elif name == "base_attention":
                method, runner = base_attention_selection(engine, batch, args.attention_layers, args.keep), engine
            elif name in ("saliency_self", "saliency_reference"):
                method = saliency_selection(engine, batch, args.keep, name == "saliency_reference",
                                            tokenizer.eos_token_id, tokenizer.pad_token_id)
                runner = engine
            elif name in ("relevant_fill", "relevant_objects"):
                method, runner = oracle, engine
                method.question_ids = batch["question_ids"]
            else:
                method, runner = (PruningMethod(0.0) if name == "full" else build_method(name, ratio)), engine
            with torch.no_grad():
                result = generate_with_method(runner, batch, method, 4, tokenizer.eos_token_id, tokenizer.pad_token_id)
            for row, question_id in enumerate(batch["question_ids"]):
                sample = samples[question_id]
                words = tokenizer.decode([t for t in result.tokens[row].tolist()
                                          if t not in (tokenizer.pad_token_id, tokenizer.eos_token_id)]).split()
                correct[sample.family] = correct.get(sample.family, 0) + bool(words and words[0] == sample.answer)
                total[sample.family] = total.get(sample.family, 0) + 1
                if name == "rcp":
                    needed, objects = cells[question_id]
                    kept_here = method.cumulative[0][row].nonzero().flatten().tolist()
                    for index in kept_here:
                        kept[0 if index in needed else 1 if index in objects else 2] += 1
                    # what picking the same number of object tokens at random would keep of the needed ones
                    chance_needed += len(needed) * sum(index in objects for index in kept_here) / max(1, len(objects))
                    others = [c for c in objects if c not in needed]
                    layer_terms = {**terms[0], "keep logit": sum(v for k, v in terms[0].items() if k != "bias")}
                    for term, values in layer_terms.items():
                        auc = ranking_auc(values[row], needed, others) if term != "bias" else None
                        if auc is not None:
                            aucs.setdefault(term, []).append(auc)
        if name == "q2v_by_layer":
            print("base question->visual attention, AUC needed objects > other objects, by layer: "
                  + " ".join(f"{k.split()[1]}:{sum(v) / len(v):.2f}" for k, v in aucs.items()), flush=True)
            continue
        families = " ".join(f"{f} {correct[f] / total[f]:.3f}" for f in sorted(total))
        print(f"{name:17s} {sum(correct.values()) / sum(total.values()):.3f}   ({families})", flush=True)
        if name == "rcp":
            needed_total = sum(len(cells[q][0]) for q in samples)
            print(f"{'':17s} kept tokens: {kept[0]} of the objects that matter ({kept[0] / needed_total:.1%} of them; "
                  f"as many object tokens picked at random: {chance_needed / needed_total:.1%}), "
                  f"{kept[1]} other objects, {kept[2]} empty cells")
            print(f"{'':17s} AUC needed objects > other objects (first pruning layer): "
                  + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in aucs.items()) + f" (n = {len(aucs['keep logit'])})")


if __name__ == "__main__":
    main()
