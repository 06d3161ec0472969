"""What does the trained ACCM caption model write? Captions beside the references, on the synthetic test split.

    python scripts/accm_captions.py --run-dir runs/demo [--num 128] [--show 8]

Loads the frozen base and the ACCM plug-in `make demo` trained (`<run-dir>/accm_r0.969/plugin.safetensors`), and for
the first `--num` test questions prints the question, the description of the objects that matter (from the
generator: what a perfect caption would carry), the frozen base's own answer to "describe the objects that matter
for : <question>" with every visual token (the warm-start target of stage 1), and the M candidates. Summary lines:
exact-match rates of the base's descriptions and of the selector's candidate, and how many distinct captions the
selector picked (a caption model that ignores its visual prefix writes one caption for every question). Last, whether
the caption model reads the image at all: the per-token NLL of the warm-start targets with each question's own
discarded tokens, with another question's (the batch rolled by one), and with zeros; with the instruction of another
question for comparison. Equal NLLs with the own and another image's tokens mean the captions ignore the image.
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
from lvlm_prune.accm.compensation import ACCMCompensation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--plugin", default=None, help="default: <run-dir>/accm_r0.969/plugin.safetensors")
    parser.add_argument("--num", type=int, default=128, help="test questions")
    parser.add_argument("--show", type=int, default=8, help="questions printed in full")
    args = parser.parse_args()
    run = Path(args.run_dir)
    plugin_path = Path(args.plugin or run / "accm_r0.969" / "plugin.safetensors")
    if not plugin_path.is_file():
        raise SystemExit(f"no ACCM plug-in at {str(plugin_path)!r}: run `make demo` (stage accm) first")
    info = json.loads(Path(str(plugin_path) + ".json").read_text())
    settings = {k: info["config"].get(k) for k in ("target_prune_ratio", "vision_selection", "text_fraction")}
    print(f"plug-in {plugin_path} ({', '.join(f'{k} {v}' for k, v in settings.items())})", flush=True)
    base = str(run / "base_model")
    data = SyntheticVQADataModule(processor_path=base, num_test=args.num, eval_batch_size=64)
    module = CompensationModule(base, ACCMCompensation(**info["config"]), processor=data.processor,
                                categories=data.categories, plugin_weights_path=str(plugin_path))
    module.eval()
    accm = module.compensation
    samples = {s.question_id: s for s in data.samples("test")}
    ratio = info["config"]["target_prune_ratio"]

    shown = base_exact = picked_exact = total = 0
    picked: set[str] = set()
    nll: dict[str, list[float]] = {}  # per condition: [summed NLL, target tokens]
    for batch in data.test_dataloader():
        with torch.no_grad():
            selection = accm.select_visual_tokens(module.engine, batch, ratio)
            candidates = accm.caption_candidates(batch, selection)
            pick = accm.selector_scores(batch, candidates)[0].argmax(-1)
            described, described_mask = accm.warm_start_captions(module.engine, batch, selection)
            for name, (summed, tokens) in target_nll(accm, batch, selection, described, described_mask).items():
                totals = nll.setdefault(name, [0.0, 0])
                totals[0] += summed
                totals[1] += tokens
        for b, question_id in enumerate(batch["question_ids"]):
            sample = samples[question_id]
            # in the caption model's vocabulary (its own tokenizer's when it was loaded from caption_decoder_path)
            captions = [accm.caption_text(accm.candidate_tokens(candidates, b, m))
                        for m in range(candidates.lengths.shape[1])]
            base_text = accm.caption_text(described[b][described_mask[b].bool()].tolist())
            choice = captions[int(pick[b])]
            base_exact += base_text == sample.relevant_description
            picked_exact += choice == sample.relevant_description
            picked.add(choice)
            total += 1
            if shown < args.show:
                shown += 1
                print(f"{sample.question} -> {sample.answer}\n  reference : {sample.relevant_description}\n"
                      f"  base      : {base_text}\n  candidates: {captions} (selector: {int(pick[b])})")
    print(f"\n{total} test questions at r = {ratio}: base descriptions exact {base_exact / total:.3f}, "
          f"selected captions exact {picked_exact / total:.3f}, distinct selected captions {len(picked)}")
    print("caption model NLL per token of the warm-start targets: "
          + ", ".join(f"{name} {summed / tokens:.3f}" for name, (summed, tokens) in nll.items()))


def target_nll(accm: ACCMCompensation, batch: dict, selection, targets: torch.Tensor, target_mask: torch.Tensor
               ) -> dict[str, tuple[float, int]]:
    """Summed NLL of `targets` under the caption model and their token count, with the sample's own inputs and with
    swapped ones (the batch rolled by one; a batch of one question has no other to swap with and scores only its
    own)."""
    ids, mask = accm.instructions(batch["questions"], selection.features.device)
    visual, visual_mask = accm.caption_visual(selection), selection.discarded_mask

    def score(ids, mask, visual, visual_mask) -> tuple[float, int]:
        logprobs, real = accm.caption_model.caption_token_logprobs(ids, mask, visual, visual_mask, targets, target_mask)
        return -logprobs.sum().item(), int(real.sum())

    def rolled(x: torch.Tensor) -> torch.Tensor:
        return x.roll(1, 0)

    scores = {"own image": score(ids, mask, visual, visual_mask),
              "zero visual tokens": score(ids, mask, torch.zeros_like(visual), visual_mask)}
    if ids.shape[0] > 1:
        scores["another image"] = score(ids, mask, rolled(visual), rolled(visual_mask))
        scores["another question"] = score(rolled(ids), rolled(mask), visual, visual_mask)
    return scores


if __name__ == "__main__":
    main()
