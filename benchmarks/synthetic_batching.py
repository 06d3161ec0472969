"""Padding and step time of the base's training batches, shuffled against length-grouped (`data.group_by_length`).

    python benchmarks/synthetic_batching.py [--batches 30]

Builds the base configs' training mix (three turns, description and context fractions 0.5 / 0.2, 1-12-object
scenes; without their token-drop augmentation, which hides tokens through the attention mask and changes no shape)
twice, shuffled and grouped by text length, and trains one freshly initialised base (the committed spec)
on alternating batches of the two loaders, so both see the same machine state. Prints padded / real token ratios
(real: the attention mask plus the hidden visual positions) and the mean seconds per training step of each.
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

BASE_MIX = dict(batch_size=32, train_min_objects=1, turns_per_image=3, describe_fraction=0.5, context_fraction=0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30, help="timed training steps per loader")
    args = parser.parse_args()
    loaders = {}
    for name, grouped in (("shuffled", False), ("length-grouped", True)):
        data = SyntheticVQADataModule(num_train=32 * (args.batches + 1), group_by_length=grouped, **BASE_MIX)
        loaders[name] = list(data.train_dataloader())
    tokenizer = data.processor.tokenizer
    model = build_tiny_llava(TinyLlavaSpec(residual_init="zero"), len(tokenizer), data.image_token_id,
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
    print(f"{torch.get_num_threads()} threads, {args.batches} steps each, interleaved")
    print("| batches | padded / real tokens | seconds per step |\n|---|---|---|")
    for name, batches in loaders.items():
        padded = sum(b["input_ids"].numel() for b in batches)
        real = sum(int((b["labels"].shape[1] - (b["input_ids"] == tokenizer.pad_token_id).sum(1)).sum()) for b in batches)
        print(f"| {name} | {padded / real:.2f} | {seconds[name] / args.batches:.3f} |")


if __name__ == "__main__":
    main()
