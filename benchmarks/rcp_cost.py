"""Cost of RCP: one training step (no-grad teacher pass + soft student pass + backward into the plug-in) and
inference at a ratio, each relative to one full-token forward of the same frozen base, measured in one run.

    python benchmarks/rcp_cost.py [--base runs/demo/base_model] [--plugin runs/demo/rcp_r0.889/plugin.safetensors]
        [--saliency-weight 1.0]

With --saliency-weight the same plug-in's training step with the saliency ranking loss (whose teacher pass runs with
gradients to the keep weights) is timed too, interleaved with the others.

Without --plugin the RCP modules are freshly initialised (cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_median_seconds  # noqa: E402
from datamodules.synthetic import SyntheticVQADataModule  # noqa: E402
from lightning_modules.compensation import load_plugin_weights  # noqa: E402
from lvlm_prune.engine import PrunedLlava  # noqa: E402
from lvlm_prune.modeling.loading import freeze, load_base_model  # noqa: E402
from lvlm_prune.rcp.compensation import RCPCompensation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="runs/demo/base_model")
    parser.add_argument("--plugin", default=None)
    parser.add_argument("--ratio", type=float, default=0.889)
    parser.add_argument("--pruning-layers", type=int, nargs="+", default=[0],
                        help="RCP pruning layers (default: the embedded default's, configs/synthetic/rcp.yaml)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15,
                        help="rounds; each round times every measurement once (interleaved)")
    parser.add_argument("--saliency-weight", type=float, default=0.0,
                        help="also time the training step with this RCPCompensation.saliency_weight")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    engine = PrunedLlava(freeze(load_base_model(args.base)))
    plugin = RCPCompensation(target_prune_ratio=args.ratio, pruning_layers=args.pruning_layers, bottleneck=64,
                             num_queries=16, context_dim=64, adapter_bottleneck=32)
    plugin.attach(engine)
    if args.plugin:
        load_plugin_weights(plugin, args.plugin)
    data = SyntheticVQADataModule(processor_path=args.base, num_train=args.batch, batch_size=args.batch,
                                  num_test=args.batch, eval_batch_size=args.batch)
    batch = next(iter(data.train_dataloader()))
    test = next(iter(data.test_dataloader()))
    inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["position_ids"])
    optimizer = torch.optim.AdamW(plugin.parameters(), lr=1e-4)

    def full_forward():
        with torch.no_grad():
            engine(*inputs, logits="all")

    def train_step(saliency_weight: float = 0.0):
        plugin.saliency_weight = saliency_weight
        losses = plugin.training_losses(engine, batch, progress=0.5)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()

    prompt = (test["prompt_input_ids"], test["prompt_attention_mask"], test["pixel_values"])

    def generate_full():
        engine.generate(*prompt, position_ids=test["prompt_position_ids"], max_new_tokens=4)

    method = plugin.inference_method(args.ratio)

    def generate_rcp():
        with torch.no_grad():
            engine.generate(*prompt, position_ids=test["prompt_position_ids"], method=method, max_new_tokens=4)

    measurements = {"forward": full_forward, "step": train_step, "full_gen": generate_full, "rcp_gen": generate_rcp}
    if args.saliency_weight > 0:
        measurements["saliency_step"] = lambda: train_step(args.saliency_weight)
    timed = interleaved_median_seconds(measurements, args.repeats)
    forward, step, full_gen, rcp_gen = (timed[k] for k in ("forward", "step", "full_gen", "rcp_gen"))
    result = {"threads": torch.get_num_threads(), "batch": args.batch, "ratio": args.ratio, "repeats": args.repeats,
              "pruning_layers": list(plugin.pruning_layers),
              "full_forward_ms": forward * 1e3, "rcp_train_step_ms": step * 1e3,
              "train_step_over_forward": step / forward, "full_generate_ms": full_gen * 1e3,
              "rcp_generate_ms": rcp_gen * 1e3, "rcp_over_full_generate": rcp_gen / full_gen}
    print(f"CPU, {torch.get_num_threads()} threads, batch {args.batch}, base {args.base}")
    print(f"full-token forward (teacher-forced): {forward * 1e3:8.1f} ms")
    print(f"RCP training step (teacher + student + backward + AdamW): {step * 1e3:8.1f} ms "
          f"= {step / forward:.2f} x the full forward")
    if args.saliency_weight > 0:
        saliency_step = timed["saliency_step"]
        result.update(saliency_weight=args.saliency_weight, rcp_train_step_saliency_ms=saliency_step * 1e3,
                      saliency_train_step_over_forward=saliency_step / forward)
        print(f"RCP training step with the saliency ranking loss: {saliency_step * 1e3:8.1f} ms "
              f"= {saliency_step / forward:.2f} x the full forward")
    print(f"generation, 4 new tokens: full {full_gen * 1e3:.1f} ms, RCP at r={args.ratio} {rcp_gen * 1e3:.1f} ms "
          f"= {rcp_gen / full_gen:.2f} x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
