"""Is one method really more accurate than another on the same questions? A paired comparison of answer files.

    python scripts/compare_answers.py REFERENCE.jsonl OTHER.jsonl [OTHER.jsonl ...] [--by-category] [--json OUT]

Each file is a LLaVA answer `.jsonl` whose records carry their reference `answer`, as `cli.py test` writes them
with `callbacks.answer_writer.AnswerFileWriter` (e.g. `--trainer.callbacks+=callbacks.answer_writer.AnswerFileWriter
--trainer.callbacks.filename accm.jsonl`); all files must answer the same questions. Each OTHER is compared with
REFERENCE: both exact-match accuracies, the difference OTHER - REFERENCE with a 95 % interval, the questions only one
of them answers correctly, and the exact McNemar p-value (two-sided; one test per row, not corrected for several
rows). `--by-category` adds one row per question category (family).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lvlm_prune.archives import write_atomically  # noqa: E402
from lvlm_prune.evaluation.paired import (  # noqa: E402
    PairedComparison,
    ScoredAnswers,
    compare_answer_files,
    score_answers_exact_match,
)


def label(scored: ScoredAnswers) -> str:
    return f"{scored.path.name} ({', '.join(scored.model_ids)})" if any(scored.model_ids) else scored.path.name


def row(name: str, category: str, result: PairedComparison) -> dict[str, object]:
    return {
        "file": name,
        "category": category,
        "questions": result.num_questions,
        "accuracy_reference": result.accuracy_a,
        "accuracy": result.accuracy_b,
        "difference": result.difference,
        "interval_95": list(result.interval_95) if result.interval_95 else None,
        "only_reference_correct": result.only_a_correct,
        "only_this_correct": result.only_b_correct,
        "mcnemar_p": result.p_value,
    }


def markdown(rows: list[dict[str, object]], reference: str) -> str:
    lines = [
        f"Reference: {reference}",
        "",
        "| file | category | questions | reference acc | acc | difference | 95 % interval | only reference right "
        "| only this right | McNemar p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in rows:
        interval = entry["interval_95"]
        shown = f"[{100 * interval[0]:+.1f}, {100 * interval[1]:+.1f}]" if interval else "-"
        lines.append(
            f"| {entry['file']} | {entry['category'] or 'all'} | {entry['questions']} | "
            f"{100 * entry['accuracy_reference']:.1f} | {100 * entry['accuracy']:.1f} | "
            f"{100 * entry['difference']:+.1f} | {shown} | {entry['only_reference_correct']} | "
            f"{entry['only_this_correct']} | {entry['mcnemar_p']:.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="answer file every other file is compared with")
    parser.add_argument("others", nargs="+", help="answer files to compare with the reference")
    parser.add_argument("--by-category", action="store_true", help="also one row per question category")
    parser.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    for path in [args.reference, *args.others]:
        if not Path(path).is_file():
            parser.error(f"no answer file at {path}")
    try:
        reference = score_answers_exact_match(args.reference)
        others = [score_answers_exact_match(path) for path in args.others]
    except ValueError as error:
        parser.error(str(error))
    categories = sorted(set(reference.categories.values()) - {""}) if args.by_category else []
    rows: list[dict[str, object]] = []
    for other in others:
        try:
            rows.append(row(label(other), "", compare_answer_files(reference, other)))
            rows.extend(row(label(other), name, compare_answer_files(reference, other, name)) for name in categories)
        except ValueError as error:
            parser.error(str(error))
    print(markdown(rows, label(reference)))
    if args.json:
        write_atomically(Path(args.json), json.dumps({"reference": label(reference), "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
