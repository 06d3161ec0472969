"""Padding and step time of the base's training batches: padded and shuffled (the data module's default),
length-grouped (`data.group_by_length`) and packed (`data.pack_length`, what the base configs use).

    python benchmarks/synthetic_batching.py [--batches 30] [--llm-layers 4] [--pack-length 256]

Builds the base configs' training mix (three turns, description, context and token-drop fractions 0.5 / 0.2 / 0.3,
1-12-object scenes) three ways and trains one freshly initialised base (the committed spec, with --llm-layers
layers: 4 in stages 0-1, 12 in stage 2) on the loaders' batches in turn, so all see the same machine state. Prints
padded / real token ratios (real: every token of an example, hidden visual positions included), the seconds the
loader takes to build a batch (rendering, the processor, packing) and the mean seconds per training step (forward,
backward, AdamW).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from lvlm_prune.data import answer_cross_entropy  # noqa: E402
from lvlm_prune.modeling.tiny import TinyLlavaSpec, build_tiny_llava  # noqa: E402

BASE_MIX = dict(batch_size=32, train_min_objects=1, turns_per_image=3, describe_fraction=0.5, context_fraction=0.2,
                token_drop_fraction=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30, help="timed training steps per loader")
    parser.add_argument("--llm-layers", type=int, default=4, help="LLM depth (the base trains 4, then 12)")
    parser.add_argument("--pack-length", type=int, default=256, help="tokens per packed row")
    args = parser.parse_args()
    loaders, build_seconds = {}, {}
    for name, options in (("padded, shuffled", {}), ("padded, length-grouped", {"group_by_length": True}),
                          (f"packed into rows of {args.pack_length}", {"pack_length": args.pack_length})):
        data = SyntheticVQADataModule(num_train=32 * (args.batches + 1), **options, **BASE_MIX)
        torch.manual_seed(0)
        start = time.perf_counter()
        loaders[name] = list(data.train_dataloader())
        build_seconds[name] = (time.perf_counter() - start) / len(loaders[name])
    tokenizer = data.processor.tokenizer
    spec = TinyLlavaSpec(residual_init="zero", num_layers=args.llm_layers)
    model = build_tiny_llava(spec, len(tokenizer), data.image_token_id,
                             tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch) -> float:
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], pixel_values=batch["pixel_values"]).logits
        loss = answer_cross_entropy(logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for name in loaders:  # warm-up
        step(loaders[name][0])
    seconds = {name: 0.0 for name in loaders}
    for pair in zip(*(loaders[name][1:] for name in loaders)):
        for name, batch in zip(loaders, pair):
            seconds[name] += step(batch)
    print(f"{torch.get_num_threads()} threads, {args.llm_layers} LLM layers, {args.batches} steps each, interleaved")
    print("| batches | rows per batch | padded / real tokens | seconds to build a batch | seconds per step |")
    print("|---|---|---|---|---|")
    for name, batches in loaders.items():
        padded = sum(b["input_ids"].numel() for b in batches)
        real = sum(int((b["input_ids"] != tokenizer.pad_token_id).sum()) for b in batches)
        rows = sum(b["input_ids"].shape[0] for b in batches) / len(batches)
        print(f"| {name} | {rows:.1f} | {padded / real:.2f} | {build_seconds[name]:.3f} | "
              f"{seconds[name] / args.batches:.3f} |")


if __name__ == "__main__":
    main()
