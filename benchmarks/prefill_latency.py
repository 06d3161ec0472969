"""Prefill latency of each pruning method against all visual tokens, on a LLaVA-shaped random model.

    python benchmarks/prefill_latency.py [--layers 16] [--hidden 1024] [--batch 4] [--ratio 0.889] [--repeats 5]

Prints a table (method, realised ratio, analytic LLM FLOPs reduction, measured latency reduction, their ratio,
scoring overhead as a share of a full prefill) and eval throughput at batch 8 vs batch 1, and writes the same as
JSON (--out). Random weights: speed does not depend on them. The LLM is LLaVA-shaped (576 visual tokens from a
336 px / 14 px grid, 64 text tokens, SwiGLU, RoPE) but narrower and shallower than 7B so that it runs on a CPU;
the vision tower is kept small since it is the same for every method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import interleaved_median_seconds, median_seconds  # noqa: E402
from lvlm_prune.baselines import build_method  # noqa: E402
from lvlm_prune.engine import PrunedLlava  # noqa: E402
from lvlm_prune.flops import LLMShape, llm_prefill_flops  # noqa: E402
from lvlm_prune.modeling.tiny import TinyLlavaSpec, build_tiny_llava  # noqa: E402

METHODS = ("random", "pool", "fastv", "pdrop", "visionzip", "dart")


def make_inputs(model, batch: int, text_tokens: int, num_visual: int, image_size: int):
    image_id = model.config.image_token_id
    ids = torch.randint(3, image_id - 1, (batch, 1 + num_visual + text_tokens))
    ids[:, 0] = 1
    ids[:, 1 : 1 + num_visual] = image_id
    return ids, torch.ones_like(ids), torch.randn(batch, 3, image_size, image_size)


class TimedScores:
    """Wraps a method: accumulates the seconds spent inside its scoring hooks. `sync` (CUDA's synchronize) runs
    before and after each hook, so a hook's time is its own work, not kernels queued by the layers before it."""

    def __init__(self, method, sync):
        self.method, self.seconds = method, 0.0
        for hook in ("before_llm", "at_layer"):
            original = getattr(method, hook)

            def timed(ctx, _original=original):
                sync()
                start = time.perf_counter()
                out = _original(ctx)
                sync()
                self.seconds += time.perf_counter() - start
                return out

            setattr(method, hook, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.889)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pdrop-stage-ends", type=int, nargs=3, default=None, metavar=("A", "B", "C"),
                        help="PyramidDrop's stage ends (default: 1, L/2, 3L/4, as the sweeps end its first stage "
                             "after layer 1; its own L/4, L/2, 3L/4 cannot remove more than 75 %%)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    spec = TinyLlavaSpec(image_size=336, patch_size=14, vision_hidden_size=64, vision_layers=1, vision_heads=2,
                         hidden_size=args.hidden, intermediate_size=int(args.hidden * 11008 / 4096),
                         num_layers=args.layers, num_heads=args.hidden // 128, num_kv_heads=args.hidden // 128,
                         max_position_embeddings=2048, vision_feature_layer=-1)
    dtype = getattr(torch, args.dtype)
    model = build_tiny_llava(spec, vocab_size=32000, image_token_id=31999).to(args.device, dtype).eval()
    engine = PrunedLlava(model)
    n = spec.num_visual_tokens
    ids, mask, pixels = (t.to(args.device) for t in make_inputs(model, args.batch, args.text_tokens, n, 336))
    pixels = pixels.to(dtype)
    shape = LLMShape.from_config(model.config.text_config)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def prefill(method=None):
        with torch.no_grad():
            engine(ids, mask, pixels, method=method, logits="last")
        sync()

    if args.pdrop_stage_ends is None:
        args.pdrop_stage_ends = [1, args.layers // 2, 3 * args.layers // 4]
    options = {"pdrop": {"stage_ends": list(args.pdrop_stage_ends)}}
    methods = {}
    unreachable = {}
    for name in METHODS:
        try:
            methods[name] = engine.bind(build_method(name, args.ratio, **options.get(name, {})))
        except ValueError as error:
            unreachable[name] = str(error)
    # every round times the full prefill and each method once: a drift in the machine's speed moves them alike
    seconds = interleaved_median_seconds(
        {"full": prefill, **{name: (lambda m=method: prefill(m)) for name, method in methods.items()}}, args.repeats)
    full_seconds = seconds["full"]
    full_flops = llm_prefill_flops(shape, args.text_tokens + 1, [n] * args.layers)
    rows = [{"method": "full", "realised_ratio": 0.0, "flops_reduction": 0.0, "latency_ms": full_seconds * 1e3,
             "latency_reduction": 0.0, "ratio_of_reductions": None, "scoring_overhead": 0.0}]
    for name in METHODS:
        if name in unreachable:
            rows.append({"method": name, "status": f"unreachable: {unreachable[name]}"})
            continue
        scoring = []
        for _ in range(args.repeats + 1):  # the first run warms up
            timed = TimedScores(engine.bind(build_method(name, args.ratio, **options.get(name, {}))), sync)
            with torch.no_grad():
                out = engine(ids, mask, pixels, method=timed.method, logits="none")
            scoring.append(timed.seconds)
        counts = out.visual_tokens_per_layer.float().mean(0).tolist()
        flops = llm_prefill_flops(shape, args.text_tokens + 1, counts)
        flops_reduction = 1 - flops / full_flops
        latency_reduction = 1 - seconds[name] / full_seconds
        rows.append({
            "method": name, "realised_ratio": 1 - sum(counts) / (len(counts) * n), "flops_reduction": flops_reduction,
            "latency_ms": seconds[name] * 1e3, "latency_reduction": latency_reduction,
            "ratio_of_reductions": latency_reduction / flops_reduction,
            "scoring_overhead": statistics.median(scoring[1:]) / full_seconds,
        })

    throughput = {}
    for batch in (1, 8) if "fastv" in methods else ():  # FastV at the ratio, when it can reach it
        b_ids, b_mask, b_pixels = (t.to(args.device) for t in make_inputs(model, batch, args.text_tokens, n, 336))
        b_pixels = b_pixels.to(dtype)

        def generate():
            with torch.no_grad():
                engine.generate(b_ids, b_mask, b_pixels, method=engine.bind(build_method("fastv", args.ratio)),
                                max_new_tokens=8)
            sync()

        throughput[batch] = batch / median_seconds(generate, max(1, args.repeats - 1))

    print(f"device {args.device} ({torch.get_num_threads()} threads), {args.dtype}, LLM {args.layers} x {args.hidden} "
          f"(FFN {spec.intermediate_size}), {n} visual + {args.text_tokens} text tokens, batch {args.batch}, "
          f"r = {args.ratio} (layer-averaged), median of {args.repeats} interleaved rounds")
    print(f"{'method':>10s} {'realised r':>10s} {'FLOPs red.':>10s} {'latency ms':>11s} {'latency red.':>12s} "
          f"{'lat/FLOPs':>9s} {'scoring %':>9s}")
    for row in rows:
        if "status" in row:
            print(f"{row['method']:>10s}  {row['status']}")
            continue
        ratio = "-" if row["ratio_of_reductions"] is None else f"{row['ratio_of_reductions']:.2f}"
        print(f"{row['method']:>10s} {row['realised_ratio']:10.3f} {row['flops_reduction']:10.3f} {row['latency_ms']:11.1f} "
              f"{row['latency_reduction']:12.3f} {ratio:>9s} {100 * row['scoring_overhead']:8.2f}%")
    if throughput:
        print(f"eval throughput (generate, fastv r={args.ratio}, 8 new tokens): batch 1 {throughput[1]:.2f} samples/s, "
              f"batch 8 {throughput[8]:.2f} samples/s ({throughput[8] / throughput[1]:.2f}x)")
    else:
        print(f"eval throughput: not measured, fastv is unreachable at r={args.ratio}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "timing": "interleaved", "rows": rows, "throughput": throughput}, indent=2))


if __name__ == "__main__":
    main()
