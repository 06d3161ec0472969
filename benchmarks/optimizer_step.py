"""What the optimizer adds to a base training step: AdamW against Muon + AdamW (`model.init_args.optimizer`).

    python benchmarks/optimizer_step.py [--llm-layers 4 12] [--repeats 20]

For the committed base spec at each depth, builds both optimizers over one freshly initialised model and times,
interleaved round by round (`benchmarks/timing.py`, so all see the same machine state): forward + backward of one
packed training batch of the base configs' mix, `step()` of AdamW and `step()` of Muon + AdamW (on that batch's
gradients, at a learning rate too small to matter). Prints the median milliseconds of each and the optimizer's
share of a whole step, with the machine's fp32 matmul throughput.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_median_seconds, matmul_gflops  # noqa: E402
from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from lvlm_prune.data import answer_cross_entropy  # noqa: E402
from lvlm_prune.modeling.optimizers import OPTIMIZERS, build_optimizer  # noqa: E402
from lvlm_prune.modeling.tiny import TinyLlavaSpec, build_tiny_llava  # noqa: E402

BASE_MIX = dict(batch_size=32, train_min_objects=1, turns_per_image=3, describe_fraction=0.5, context_fraction=0.2,
                token_drop_fraction=0.3, pack_length=256)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    data = SyntheticVQADataModule(num_train=64, **BASE_MIX)
    batch = next(iter(data.train_dataloader()))
    tokenizer = data.processor.tokenizer
    print(f"torch threads: {torch.get_num_threads()}, fp32 matmul {matmul_gflops():.0f} GFLOP/s")
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

        forward_backward()
        steps = {name: build_optimizer(model, name, lr=1e-9, weight_decay=0.01).step for name in OPTIMIZERS}
        seconds = interleaved_median_seconds({"compute": forward_backward, **steps}, args.repeats)
        compute = 1000 * seconds["compute"]
        cells = []
        for name in OPTIMIZERS:
            step = 1000 * seconds[name]
            cells += [f"{step:.1f}", f"{step / (compute + step):.1%}"]
        print(f"| {layers} | {compute:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
