"""Writes docs/results.md from the outputs of `make demo` (and the optional benchmark / ablation runs).

    python scripts/report.py [--run-dir runs/demo] [--out docs/results.md]

Only sections whose inputs exist are written; every number comes from a file a command produced, and each
section names that command. The main job's outputs (MAIN_OUTPUTS) must all be there, and every input must read
cleanly: otherwise the report names the file and writes nothing, so the existing output stays as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvlm_prune.archives import weights_digest, write_atomically  # noqa: E402
from lvlm_prune.evaluation.paired import compare_answer_files, score_answers_exact_match  # noqa: E402

# What `make demo` (scripts/demo.py, all stages) leaves in its run directory.
MAIN_OUTPUTS = ("timings.json", "base_eval.json", "sweep/run/sweep.csv", "rcp_r0.889/run/sweep.csv",
                "rcp_r0.778/run/sweep.csv", "accm_r0.969/run/sweep.csv")
SWEEP_NUMBERS = ("prune_ratio", "realised_prune_ratio", "avg_visual_tokens", "text_tokens", "tflops", "tflops_total",
                 "latency_ms", "accuracy")
SWEEP_STATUSES = ("ok", "unreachable", "failed")


class ReportInputError(Exception):
    """An input of the report is missing or unreadable; the message names the file."""


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportInputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                               "rerun the command that wrote it") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ReportInputError(f"{path}: cannot be read ({error})") from error


def scene_sizes(run: Path) -> str:
    """'8-12 objects per scene' from the sweep's saved test config (LightningCLI's `config_test.yaml`), or ''."""
    config = run / "sweep" / "run" / "config_test.yaml"
    if not config.is_file():
        return ""
    try:
        loaded = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ReportInputError(f"{config}: cannot be read as YAML ({error})") from error
    with reading(config):
        data = (loaded or {}).get("data") or {}
        arguments = data.get("init_args") or {}
        low, high = arguments.get("min_objects"), arguments.get("max_objects")
    return f"{low}-{high} objects per scene" if low is not None and high is not None else ""


def llm_layers(run: Path) -> str:
    """'the 12-layer model' from the base model's saved config, or 'the base model'."""
    config = run / "base_model" / "config.json"
    if not config.is_file():
        return "the base model"
    with reading(config):
        return f"the {int(read_json(config)['text_config']['num_hidden_layers'])}-layer model"


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Names `path` in an error from content of the wrong shape (a missing key, a string for a number)."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise ReportInputError(f"{path}: unexpected content ({type(error).__name__}: {error})") from error


def sweep_rows(path: Path) -> list[dict]:
    """The rows of a `sweep.csv` ([] when there is none), each checked: complete, a known status, numbers where
    the status is 'ok' or the pair was measured (an unreachable row with a realised ratio)."""
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ReportInputError(f"{path}: cannot be read ({error})") from error
    if text and not text.endswith("\n"):
        raise ReportInputError(f"{path}: line {text.count(chr(10)) + 1} ends in the middle of a row (the file is cut "
                               "short); rerun the sweep")
    reader = csv.DictReader(text.splitlines())
    missing = [c for c in (*SWEEP_NUMBERS, "method", "status") if c not in (reader.fieldnames or ())]
    if missing:
        raise ReportInputError(f"{path}: not a sweep table, it has no column(s) {', '.join(missing)}")
    rows = []
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        if None in row:
            raise ReportInputError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
        if None in row.values():
            raise ReportInputError(f"{where}: fewer fields than the header's {len(reader.fieldnames)} (the row is cut "
                                   "short)")
        if not row["status"].startswith(SWEEP_STATUSES):
            raise ReportInputError(f"{where}: unknown status {row['status']!r}; expected one of {SWEEP_STATUSES}")
        # an unreachable pair the sweep ran keeps its measurements (a realised ratio): the report reads them too
        if row["status"] == "ok" or row["realised_prune_ratio"]:
            for column in (*SWEEP_NUMBERS, *(("num_samples",) if row.get("num_samples") else ())):
                try:
                    float(row[column])
                except ValueError:
                    raise ReportInputError(f"{where}: {column}={row[column]!r} is not a number") from None
        rows.append(row)
    return rows


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x over (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def measured(rows: list[dict]) -> list[dict]:
    """Rows that ran: 'ok', or marked unreachable only because their realised ratio missed the requested one (on
    the FLOPs axis such a point is still a point the method reaches)."""
    return [r for r in rows if r.get("accuracy") not in (None, "") and r.get("tflops_total") not in (None, "")]


def accm_on_flops_plane(baseline_rows: list[dict], accm_rows: list[dict]) -> list[str]:
    """ACCM's accuracy against the training-free baselines at ACCM's own total FLOPs: each baseline's curve (linear
    between its measured points and the full-token point) read there, and the best accuracy any measured baseline
    point (full tokens included) reaches at no more FLOPs, which also covers a curve that is not monotone and an
    ACCM point beyond a curve's range. The margin is over the larger. 'accm_oracle' is left out: its pick runs the
    base with all visual tokens (the reference) and on every candidate, which its FLOPs do not count."""
    curves: dict[str, list[tuple[float, float]]] = {}
    points = [(float(r["tflops_total"]), float(r["accuracy"])) for r in measured(baseline_rows)]
    full = [(float(r["tflops_total"]), float(r["accuracy"])) for r in measured(baseline_rows) if r["method"] == "full"]
    for r in measured(baseline_rows):
        if r["method"] != "full":
            curves.setdefault(r["method"], []).append((float(r["tflops_total"]), float(r["accuracy"])))
    for curve in curves.values():
        curve += full
    methods = sorted(curves)
    body = []
    for r in sorted((r for r in accm_rows if r["method"] != "accm_oracle"),
                    key=lambda r: (float(r["prune_ratio"]), r["method"])):
        x = float(r["tflops_total"])
        read = {m: interpolate(curves[m], x) for m in methods}
        cheaper = [y for flops, y in points if flops <= x]
        best_cheaper = max(cheaper) if cheaper else None
        known = [v for v in (*read.values(), best_cheaper) if v is not None]
        margin = f"{100 * (float(r['accuracy']) - max(known)):+.1f}" if known else "-"
        body.append([r["method"], f"{float(r['prune_ratio']):.4f}", f"{x * 1e3:.3f}", f"{float(r['accuracy']):.3f}",
                     *["-" if read[m] is None else f"{read[m]:.3f}" for m in methods],
                     "-" if best_cheaper is None else f"{best_cheaper:.3f}", margin])
    return [table(["method", "r", "GFLOPs total", "accuracy", *[f"{m} at same FLOPs" for m in methods],
                   "best point at no more FLOPs", "points over best"], body)]


def check_run_dir(run: Path) -> None:
    if not run.is_dir():
        raise ReportInputError(f"--run-dir {run}: no such directory (the run directory of `make demo`, "
                               "RUN_DIR=runs/demo by default)")
    missing = [name for name in MAIN_OUTPUTS if not (run / name).is_file()]
    if missing:
        raise ReportInputError(f"--run-dir {run} lacks the main job's output(s) {', '.join(missing)}; run "
                               f"`make demo RUN_DIR={run}` (scripts/demo.py) to make them, or point --run-dir at its "
                               "run directory")


SWEEP_DIRS = ("sweep", "rcp_r0.889", "rcp_r0.778", "accm_r0.969")


def flops_convention(run: Path) -> str:
    """The LLM FLOPs convention all the run's sweeps used (their `sweep.json`); one table cannot mix two."""
    conventions: dict[str, Path] = {}
    for name in SWEEP_DIRS:
        settings = run / name / "run" / "sweep.json"
        if settings.exists():
            recorded = read_json(settings)
            with reading(settings):
                conventions.setdefault(recorded.get("flops_convention", "fastv"), settings)
    if len(conventions) > 1:
        raise ReportInputError("the sweeps count the LLM's FLOPs in different conventions, which one table cannot "
                               "compare: " + ", ".join(f"{c} in {path}" for c, path in conventions.items())
                               + " (PruningSweep init_args.flops_convention)")
    return next(iter(conventions), "fastv")


def same_questions(baselines: list[dict], accm: list[dict]) -> None:
    """The FLOPs-plane comparison reads two sweeps' accuracies against each other: they must score the same count."""
    counts = {where: sorted({int(float(r["num_samples"])) for r in rows if r.get("num_samples") not in (None, "")})
              for where, rows in (("sweep/run/sweep.csv", baselines), ("accm_r0.969/run/sweep.csv", accm))}
    if len({tuple(c) for c in counts.values()}) > 1:
        raise ReportInputError("ACCM and the training-free baselines were scored on different numbers of questions ("
                               + ", ".join(f"{where}: {c}" for where, c in counts.items())
                               + "); sweep both on the same split and batches")


def answer_file(run: Path, sweep_dir: str, method: str, ratio: float) -> Path:
    """Where a sweep with `answers` wrote one pair's answers."""
    return run / sweep_dir / "run" / "answers" / f"{method}_r{ratio:g}.jsonl"


def paired_comparisons(run: Path) -> list[list[str]]:
    """Rows comparing, question by question, the pairs the issues' targets compare: RCP (each of its swept ratios,
    and the r = 0.778 checkpoint) against the most accurate training-free method at the same ratio, and ACCM's
    selector pick against a random candidate and against its vision-side pruning alone (and the oracle pick
    against the selector's, the room a better selector has; the label-free picks, first beam and LVLM confidence,
    against the selector's when swept). Only pairs whose answer files both exist."""
    baselines = [r for r in sweep_rows(run / "sweep" / "run" / "sweep.csv") if r["status"] == "ok"
                 and r["method"] != "full"]
    best: dict[float, dict] = {}
    for r in baselines:
        ratio = float(r["prune_ratio"])
        if ratio not in best or float(r["accuracy"]) > float(best[ratio]["accuracy"]):
            best[ratio] = r
    wanted: list[tuple[str, float, Path, Path]] = []  # (what B is against A, r, A's file, B's file)
    for sweep_dir, label in (("rcp_r0.889", "rcp"), ("rcp_r0.778", "rcp@0.778")):
        for r in sweep_rows(run / sweep_dir / "run" / "sweep.csv"):
            ratio = float(r["prune_ratio"])
            if r["status"] == "ok" and ratio in best:
                other = best[ratio]["method"]
                wanted.append((f"{label} vs {other} (best training-free at r)", ratio,
                               answer_file(run, "sweep", other, ratio), answer_file(run, sweep_dir, r["method"], ratio)))
    accm_ratios = sorted({float(r["prune_ratio"]) for r in sweep_rows(run / "accm_r0.969" / "run" / "sweep.csv")
                          if r["status"] == "ok"})
    for ratio in accm_ratios:
        for reference, other in (("accm_random", "accm"), ("accm_prune_only", "accm"), ("accm", "accm_oracle"),
                                 ("accm", "accm_top_beam"), ("accm", "accm_confidence"),
                                 ("accm", "accm_confidence_gate"), ("accm_prune_only", "accm_confidence_gate"),
                                 ("accm", "accm_gated"), ("accm_prune_only", "accm_gated")):
            wanted.append((f"{other} vs {reference}", ratio, answer_file(run, "accm_r0.969", reference, ratio),
                           answer_file(run, "accm_r0.969", other, ratio)))
    rows = []
    for what, ratio, first, second in wanted:
        if not (first.is_file() and second.is_file()):
            continue
        try:
            result = compare_answer_files(score_answers_exact_match(first), score_answers_exact_match(second))
        except (OSError, ValueError) as error:
            raise ReportInputError(f"{error} (comparing {first} with {second})") from error
        low, high = result.interval_95 or (float("nan"), float("nan"))
        rows.append([what, f"{ratio:.4f}", str(result.num_questions), f"{result.accuracy_a:.3f}",
                     f"{result.accuracy_b:.3f}", f"{100 * result.difference:+.1f}",
                     f"[{100 * low:+.1f}, {100 * high:+.1f}]", str(result.only_a_correct), str(result.only_b_correct),
                     f"{result.p_value:.2g}"])
    return rows


def build(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The report's text and the figure it shows (None: none), from the files under `args`; a `ReportInputError`
    naming the file on a bad input."""
    run = Path(args.run_dir)
    check_run_dir(run)
    figure = None
    swept = sweep_rows(run / "sweep" / "run" / "sweep.csv")
    swept += sweep_rows(run / "rcp_r0.889" / "run" / "sweep.csv")
    swept += [{**r, "method": "rcp@0.778"} for r in sweep_rows(run / "rcp_r0.778" / "run" / "sweep.csv")]
    swept += sweep_rows(run / "accm_r0.969" / "run" / "sweep.csv")
    ok = [r for r in swept if r["status"] == "ok"]
    counts = sorted({int(float(r["num_samples"])) for r in ok if r.get("num_samples")})
    described = [f"{' or '.join(map(str, counts))} questions"] if counts else []
    described += [sizes] if (sizes := scene_sizes(run)) else []
    split = f" ({', '.join(described)})" if described else ""
    parts = ["# Measured results", "",
             "Generated by `python scripts/report.py` from the files `make demo` (and the commands named below) wrote; "
             f"CPU, fp32. Accuracies are exact match on the synthetic test split{split} "
             "unless a section says otherwise.", ""]

    timings = run / "timings.json"
    if timings.exists():
        recorded = read_json(timings)
        with reading(timings):
            # {"seconds": {stage: s}, "interrupted": [stage], "total": s}; before: {stage: s, "total": s}
            flat = "seconds" not in recorded
            t = {k: v for k, v in recorded.items() if k != "total"} if flat else dict(recorded["seconds"])
            interrupted = set(recorded.get("interrupted", ()))
            t["total"] = sum(t.values())
            note = " (interrupted, finished by a later invocation: the attempts' sum)"
            rows = [[k + (note if k in interrupted else ""), f"{v / 60:.1f}"] for k, v in t.items()]
            stages = [k for k in ("base_describe", "base_stage1", "base") if k in t]
            if "base" in t and len(stages) > 1:  # the base's training budget covers all its stages
                label = " + ".join({"base_describe": "stage 0", "base_stage1": "stage 1", "base": "stage 2"}[k]
                                   for k in stages)
                rows.insert(list(t).index("base") + 1, [f"base training ({label})",
                                                         f"{sum(t[k] for k in stages) / 60:.1f}"])
        parts += ["## Main job (`make demo`) stage times", "", table(["stage", "minutes"], rows), ""]
    machine = run / "machine.json"
    if machine.exists():
        records = read_json(machine)
        with reading(machine):
            speeds = [f"{r['fp32_matmul_gflops']:.0f} ({r['threads']} threads, {r['time']}, stages "
                      f"{' '.join(r['stages'])})" for r in records]
        parts += ["Machine speed at the start of each `scripts/demo.py` invocation, fp32 512x512 matmul GFLOP/s "
                  "(stage times scale with it): " + "; ".join(speeds) + ".", ""]

    base_eval = run / "base_eval.json"
    if base_eval.exists():
        results = read_json(base_eval)
        with reading(base_eval):
            families = sorted({k.removeprefix("acc/") for v in results.values() for k in v if k.startswith("acc/")})
            rows = [[name, f"{v.get('acc', float('nan')):.3f}",
                     *[f"{v.get('acc/' + f, float('nan')):.3f}" for f in families]] for name, v in results.items()]
        parts += ["## Base LVLM (`make demo`, stage base_eval)", "", table(["setting", "accuracy", *families], rows), ""]

    if ok:
        body = [[r["method"], f"{float(r['prune_ratio']):.4f}", f"{float(r['realised_prune_ratio']):.3f}",
                 f"{float(r['avg_visual_tokens']):.1f}", f"{float(r['text_tokens']):.1f}",
                 f"{float(r['tflops']) * 1e3:.3f}", f"{float(r['tflops_total']) * 1e3:.3f}",
                 f"{float(r['latency_ms']):.1f}", f"{float(r['accuracy']):.3f}"]
                for r in sorted(ok, key=lambda r: (float(r["prune_ratio"]), r["method"]))]
        convention = flops_convention(run)
        llm = ("in the FastV convention (the papers' number: a multiply-add counts once)" if convention == "fastv"
               else "counted exactly (a multiply-add counts twice)")
        # the oracle's pick runs the base on the full prompt and on every candidate: far more than the 3.1 % above
        oracle = ("; `accm_oracle`'s total also leaves out its pick's KL passes, the base run with all visual tokens "
                  "and on every candidate, which cost more than a full-token prefill"
                  if any(r["method"] == "accm_oracle" for r in ok) else "")
        parts += ["## Accuracy vs FLOPs (`make demo`, stages sweep, rcp, rcp_r0.778, accm)", "",
                  f"GFLOPs per sample: LLM prefill {llm}, and the total in one unit, exact (a multiply-add counts "
                  "twice): the LLM prefill, the vision "
                  "tower, projector and the method's own modules (not the computations a method runs to score tokens, up to "
                  f"about 3.1 % more: `docs/flops.md`{oracle}). `realised r` is the layer-averaged fraction of visual "
                  "tokens removed; latency is generation time per sample at the sweep's batch size.", "",
                  table(["method", "r", "realised r", "visual tokens", "text tokens", "GFLOPs LLM", "GFLOPs total",
                         "latency ms", "accuracy"], body), ""]
        figure = run / "accuracy_vs_flops.png" if (run / "accuracy_vs_flops.png").exists() else None
        # without the run's figure the report shows none: an image left from another run would not match the table
        parts += ["![accuracy vs FLOPs](accuracy_vs_flops.png)" if figure else
                  f"(No figure: {run / 'accuracy_vs_flops.png'} is missing; `scripts/demo.py`'s summary draws it.)", ""]
        unreachable = [r for r in swept if r["status"].startswith("unreachable")]
        # the sweep keeps the measurements of a pair it ran whose realised ratio missed the requested one
        missed = [r for r in unreachable if r["realised_prune_ratio"]]
        if unreachable:
            parts += [f"Unreachable budgets (the method's schedule cannot remove that many tokens on {llm_layers(run)}"
                      + ("; where a realised r is given, the method ran but its realised ratio lies more than the "
                         "sweep's ratio_tolerance from r" if missed else "") + "):",
                      "", *[f"- {r['method']} at r = {r['prune_ratio']}"
                            + (f" (realised r = {float(r['realised_prune_ratio']):.3f})" if r in missed else "")
                            for r in unreachable], ""]

    baselines = measured(sweep_rows(run / "sweep" / "run" / "sweep.csv"))
    accm = [r for r in sweep_rows(run / "accm_r0.969" / "run" / "sweep.csv")
            if r["status"] == "ok" and r["method"] != "accm_prune_only"]
    if baselines and accm:
        same_questions(baselines, accm)
        parts += ["## ACCM on the accuracy-vs-total-FLOPs plane", "",
                  "Each training-free baseline's accuracy read off its curve (linear between its measured points and "
                  "the full-token point) at ACCM's own total FLOPs (caption model and caption tokens included, and "
                  "the selector where it picks: the random pick runs none); '-' where ACCM's FLOPs lie outside that "
                  "curve. 'best point at no more FLOPs' is the highest accuracy of any measured baseline point (full "
                  "tokens included) that costs no more. The margin is over the best of these. The oracle pick is not "
                  "on this plane: it runs the base with all visual tokens (the reference) and on every candidate, "
                  "which its FLOPs do not count. Target: at r = 0.969, at least +10 points over the best.", "",
                  *accm_on_flops_plane(baselines, accm), ""]

    paired = paired_comparisons(run)
    if paired:
        parts += ["## Paired comparisons on the same test questions (the sweeps' answer files)", "",
                  "Two accuracies on one split share their questions, so the difference between them is measured "
                  "far more precisely than either accuracy (one accuracy's standard error is about 1.5 points here): "
                  "only the questions one of the two answers correctly and the other does not carry information. "
                  "Per row: the second method's accuracy minus the first's, its 95 % interval (Wald, from the "
                  "per-question differences), the questions only one of them gets right, and the exact two-sided "
                  "McNemar p-value; one test per row, not corrected for the number of rows. Any two answer files "
                  "compare the same way: `python scripts/compare_answers.py A.jsonl B.jsonl --by-category`.", "",
                  table(["comparison (second vs first)", "r", "questions", "first", "second", "points",
                         "95 % interval", "only first right", "only second right", "McNemar p"], paired), ""]

    ablations = run / "rcp_ablations.md"
    if ablations.exists():
        parts += ["## RCP ablations (`python scripts/rcp_ablations.py`)", "", *ablations_provenance(run),
                  ablations.read_text(), ""]

    bench = Path(args.benchmark)
    if bench.exists():
        data = read_json(bench)
        with reading(bench):
            parts += benchmark_section(data)

    cost = Path(args.rcp_cost)
    if cost.exists():
        c = read_json(cost)
        with reading(cost):
            parts += rcp_cost_section(c)
    return "\n".join(parts), figure


def ablations_provenance(run: Path) -> list[str]:
    """Nothing when the ablation table was made from this run's base (bit-identical weights); else a line saying it
    was not, or that nothing says which base it was made from."""
    record = run / "rcp_ablations.json"
    if not record.exists():
        return [f"**Not checked against this run's base**: {record} is missing (the table predates the record); "
                "rerun `python scripts/rcp_ablations.py` to make and check it.", ""]
    with reading(record):
        made_from = read_json(record)["base_weights_sha256"]
    if made_from != weights_digest(run / "base_model"):
        return [f"**Made from another base** than {run / 'base_model'} (its weights differ from those {record} "
                "records): these numbers are not this run's; rerun `python scripts/rcp_ablations.py`.", ""]
    return []


def benchmark_section(data: dict) -> list[str]:
    a = data["args"]
    body = []
    for r in data["rows"]:
        if "status" in r:
            body.append([r["method"], "-", "-", "-", "-", "-", r["status"].split(":")[0]])
            continue
        ratio = "-" if r["ratio_of_reductions"] is None else f"{r['ratio_of_reductions']:.2f}"
        body.append([r["method"], f"{r['realised_ratio']:.3f}", f"{r['flops_reduction']:.3f}", f"{r['latency_ms']:.0f}",
                     f"{r['latency_reduction']:.3f}", ratio, f"{100 * r['scoring_overhead']:.2f}%"])
    tp = data["throughput"]
    return [f"## Prefill latency (`python benchmarks/prefill_latency.py --batch {a['batch']} --out "
            f"docs/benchmark_prefill.json`, {a['device']}, {a['dtype']})", "",
            f"LLaVA-shaped random model: LLM {a['layers']} layers x {a['hidden']}, 576 visual + {a['text_tokens']} "
            f"text tokens, batch {a['batch']}, SDPA, r = {a['ratio']}"
            + (f", PyramidDrop stage ends {a['pdrop_stage_ends']}" if a.get("pdrop_stage_ends") else "")
            + (f", median of {a['repeats']} rounds, each timing every row once (scoring: median of {a['repeats']} "
               "runs after one warm-up)." if data.get("timing") == "interleaved" else f", median of {a['repeats']} runs."),
            "",
            table(["method", "realised r", "LLM FLOPs reduction", "latency ms", "latency reduction",
                   "latency red. / FLOPs red.", "scoring overhead"], body), "",
            f"Eval throughput (generate 8 tokens, FastV): batch 1 {float(tp['1']):.2f} samples/s, batch 8 "
            f"{float(tp['8']):.2f} samples/s.", ""]


def rcp_cost_section(c: dict) -> list[str]:
    return ["## RCP cost (`python benchmarks/rcp_cost.py --out docs/benchmark_rcp_cost.json`)", "",
            f"The tiny base of `make demo` (cost does not depend on the weights), RCP pruning layers "
            f"{c.get('pruning_layers', 'of the paper, scaled')}, CPU ({c['threads']} threads), batch {c['batch']}, "
            f"measured in one run (median of {c.get('repeats', 5)} rounds"
            f"{', each timing every row once' if 'repeats' in c else ''}).", "",
            table(["measurement", "ms", "relative"], [
                ["full-token forward (teacher-forced)", f"{c['full_forward_ms']:.1f}", "1.00"],
                ["RCP training step (teacher + soft student + backward + AdamW)", f"{c['rcp_train_step_ms']:.1f}",
                 f"{c['train_step_over_forward']:.2f} x forward"],
                ["generation, full tokens (4 new tokens)", f"{c['full_generate_ms']:.1f}", "1.00"],
                [f"generation, RCP at r = {c['ratio']}", f"{c['rcp_generate_ms']:.1f}",
                 f"{c['rcp_over_full_generate']:.2f} x full"]]), ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--benchmark", default="docs/benchmark_prefill.json")
    parser.add_argument("--rcp-cost", default="docs/benchmark_rcp_cost.json")
    parser.add_argument("--out", default="docs/results.md")
    args = parser.parse_args(argv)
    try:
        text, figure = build(args)
    except ReportInputError as error:
        sys.exit(f"report.py: {error}\nnothing written: {args.out} is unchanged")
    out = Path(args.out)
    if figure is not None:
        write_atomically(out.parent / "accuracy_vs_flops.png", figure.read_bytes())
    write_atomically(out, text.encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
