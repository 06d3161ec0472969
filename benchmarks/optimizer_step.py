"""What the optimizer adds to a base training step: AdamW against Muon + AdamW (`model.init_args.optimizer`).

    python benchmarks/optimizer_step.py [--llm-layers 4 12] [--repeats 30]

For the committed base spec at each depth, builds both optimizers over one freshly initialised model, fills every
gradient with fixed random values and times `optimizer.step()` alternately (so both see the same machine state),
then times forward + backward of one packed training batch of the base configs' mix. Prints the median
milliseconds of each and the optimizer's share of a whole step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from lvlm_prune.data import answer_cross_entropy  # noqa: E402
from lvlm_prune.modeling.optimizers import OPTIMIZERS, build_optimizer  # noqa: E402
from lvlm_prune.modeling.tiny import TinyLlavaSpec, build_tiny_llava  # noqa: E402

BASE_MIX = dict(batch_size=32, train_min_objects=1, turns_per_image=3, describe_fraction=0.5, context_fraction=0.2,
                token_drop_fraction=0.3, pack_length=256)


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    data = SyntheticVQADataModule(num_train=64, **BASE_MIX)
    batch = next(iter(data.train_dataloader()))
    tokenizer = data.processor.tokenizer
    print(f"torch threads: {torch.get_num_threads()}")
    print("| LLM layers | forward + backward ms | " + " | ".join(f"{o} step ms | {o} share" for o in OPTIMIZERS) + " |")
    print("|---" * (2 + 2 * len(OPTIMIZERS)) + "|")
    for layers in args.llm_layers:
        model = build_tiny_llava(TinyLlavaSpec(residual_init="zero", num_layers=layers), len(tokenizer),
                                 data.image_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id,
                                 tokenizer.eos_token_id, seed=0).train()

        def forward_backward() -> None:
            model.zero_grad()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch["position_ids"], pixel_values=batch["pixel_values"]).logits
            answer_cross_entropy(logits, batch["labels"]).backward()

        compute = median_ms(forward_backward, max(5, args.repeats // 3))
        generator = torch.Generator().manual_seed(0)
        for parameter in model.parameters():
            parameter.grad = 1e-3 * torch.randn(parameter.shape, generator=generator)
        optimizers = {name: build_optimizer(model, name, lr=1e-6, weight_decay=0.01) for name in OPTIMIZERS}
        times = {name: [] for name in OPTIMIZERS}
        for _ in range(args.repeats):
            for name, optimizer in optimizers.items():
                times[name].append(median_ms(optimizer.step, 1))
        cells = []
        for name in OPTIMIZERS:
            step = statistics.median(times[name])
            cells += [f"{step:.1f}", f"{step / (compute + step):.1%}"]
        print(f"| {layers} | {compute:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
