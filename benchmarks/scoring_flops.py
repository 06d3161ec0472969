"""FLOPs a pruning method spends scoring tokens, which the sweep's totals do not count (docs/flops.md).

Runs each method once in the engine on a random tiny default (the shape of configs/synthetic/base.yaml), counts the
matmul FLOPs of its scoring hooks (`before_llm`, `at_layer`) with FlopCounterMode, subtracts what the method's own
`plugin_flops` already counts (RCP's pruners and context encoders), and prints them beside the counted total of
`llava_prefill_report`.

    OMP_NUM_THREADS=1 python benchmarks/scoring_flops.py --text-tokens 15
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from lvlm_prune.accm.compensation import PruMergePlusPruning
from lvlm_prune.baselines import build_method
from lvlm_prune.engine import PrunedLlava
from lvlm_prune.flops import llava_prefill_report, register_cpu_sdpa_flop_formulas
from lvlm_prune.modeling.tiny import TinyLlavaSpec, build_tiny_llava
from lvlm_prune.rcp.compensation import RCPCompensation

IMAGE_TOKEN = 73


def scoring_flops(engine: PrunedLlava, method, ids, mask, pixels) -> tuple[float, list[float]]:
    """(FLOPs of the method's scoring hooks for one sample, visual tokens per layer)."""
    counted = [0]
    for hook in ("before_llm", "at_layer"):
        original = getattr(method, hook)

        def wrapped(ctx, _original=original):
            with FlopCounterMode(display=False) as counter:
                out = _original(ctx)
            counted[0] += counter.get_total_flops()
            return out

        setattr(method, hook, wrapped)
    with torch.no_grad():
        out = engine(ids, mask, pixels, method=method, logits="none")
    return float(counted[0]), out.visual_tokens_per_layer[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text-tokens", type=int, default=15, help="prompt tokens besides the image (results.md: 15)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.889, 0.5])
    args = parser.parse_args()
    if args.text_tokens < 2:
        parser.error(f"--text-tokens {args.text_tokens}: the prompt needs BOS and at least one text token after the image")
    torch.manual_seed(0)
    register_cpu_sdpa_flop_formulas()
    spec = TinyLlavaSpec()
    model = build_tiny_llava(spec, vocab_size=IMAGE_TOKEN + 1, image_token_id=IMAGE_TOKEN).eval()
    engine = PrunedLlava(model)
    n = spec.num_visual_tokens
    ids = torch.randint(3, IMAGE_TOKEN - 3, (1, n + args.text_tokens))
    ids[:, 0], ids[:, 1:1 + n] = 1, IMAGE_TOKEN
    mask, pixels = torch.ones_like(ids), torch.randn(1, 3, spec.image_size, spec.image_size)
    rcp = RCPCompensation(target_prune_ratio=0.889, pruning_layers=[0], bottleneck=64, num_queries=16, context_dim=64,
                          adapter_bottleneck=32)
    rcp.attach(engine)
    print("| r | method | scoring MFLOPs | counted total MFLOPs | scoring / counted |")
    print("|---|---|---|---|---|")
    for ratio in args.ratios:
        methods = {name: build_method(name, ratio, **({"stage_ends": (1, 6, 9)} if name == "pdrop" else {}))
                   for name in ("random", "pool", "fastv", "pdrop", "visionzip", "dart")}
        methods["prumerge+"] = PruMergePlusPruning(ratio)
        methods["rcp"] = rcp.inference_method(ratio)
        for name, method in methods.items():
            method = engine.bind(method)
            flops, schedule = scoring_flops(engine, method, ids, mask, pixels)
            plugins = method.plugin_flops(args.text_tokens)
            flops -= plugins.get("rcp_pruners", 0.0) + plugins.get("rcp_context", 0.0)  # counted already
            # every vision layer charged, as the sweep's totals (a model reading layer -2 still runs the last)
            total = llava_prefill_report(model.config, args.text_tokens, schedule, "exact", plugins=plugins,
                                         run_all_vision_layers=True).total
            print(f"| {ratio} | {name} | {flops / 1e6:.2f} | {total / 1e6:.1f} | {100 * flops / total:.2f} % |")


if __name__ == "__main__":
    main()
