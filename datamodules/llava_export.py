"""Export of the synthetic benchmark in LLaVA's file formats, so file-based readers run on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from datamodules.synthetic_vqa import render

if TYPE_CHECKING:
    from datamodules.synthetic import SyntheticVQADataModule


def export_split(data: "SyntheticVQADataModule", split: str, out_dir: Path) -> Path:
    """Writes `images/<id>.png`, `questions.jsonl` (LLaVA evaluation questions: `question_id`, `image`,
    `text`, `category`, plus the reference `answer`) and `instructions.json` (LLaVA instruction data: `id`,
    `image`, `conversations` with a human turn holding `<image>` and a gpt turn)."""
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    questions, instructions = [], []
    for sample in data.samples(split):
        image_name = f"{sample.question_id}.png"
        render(sample.scene, data.config.cell_size).save(images / image_name)
        questions.append({"question_id": sample.question_id, "image": image_name, "text": sample.question,
                          "category": sample.family, "answer": sample.answer})
        instructions.append({"id": sample.question_id, "image": image_name, "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ]})
    tmp = out_dir / "questions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(q) + "\n" for q in questions))
    (out_dir / "instructions.json").write_text(json.dumps(instructions))
    tmp.rename(out_dir / "questions.jsonl")  # written last: its presence marks a complete export
    return out_dir
