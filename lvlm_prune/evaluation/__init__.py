"""Benchmark evaluation: LLaVA question/answer files, official scoring protocols as torchmetrics metrics,
answer export.

Plain Python + torch + torchmetrics (no Lightning).
"""

from lvlm_prune.evaluation.export import (
    answer_id_for,
    build_answer_records,
    write_answers_jsonl,
    write_gqa_predictions,
    write_llava_answers,
    write_vqav2_submission,
)
from lvlm_prune.evaluation.metrics import (
    CIDErD,
    ExactMatchAccuracy,
    GQAAccuracy,
    MMBenchCircularAccuracy,
    MMEScore,
    POPEMetrics,
    ScienceQAAccuracy,
    VQASoftAccuracy,
    cider_d,
)
from lvlm_prune.evaluation.normalize import (
    gqa_prediction,
    m4c_normalize_answer,
    normalize_answer,
    normalize_vqa_answer,
    parse_mme_answer,
    parse_option_letter,
    parse_pope_answer,
    parse_scienceqa_choice,
)
from lvlm_prune.evaluation.paired import (
    compare_answer_files,
    compare_paired,
    mcnemar_exact_p,
    score_answers_exact_match,
)
from lvlm_prune.evaluation.readers import (
    AnswerRecord,
    QuestionRecord,
    match_answers,
    read_answers,
    read_questions,
)
from lvlm_prune.evaluation.scoring import BENCHMARK_SCORERS, score_answer_file

__all__ = [
    "BENCHMARK_SCORERS",
    "AnswerRecord",
    "CIDErD",
    "ExactMatchAccuracy",
    "GQAAccuracy",
    "MMBenchCircularAccuracy",
    "MMEScore",
    "POPEMetrics",
    "QuestionRecord",
    "ScienceQAAccuracy",
    "VQASoftAccuracy",
    "answer_id_for",
    "build_answer_records",
    "cider_d",
    "compare_answer_files",
    "compare_paired",
    "gqa_prediction",
    "m4c_normalize_answer",
    "match_answers",
    "mcnemar_exact_p",
    "normalize_answer",
    "normalize_vqa_answer",
    "parse_mme_answer",
    "parse_option_letter",
    "parse_pope_answer",
    "parse_scienceqa_choice",
    "read_answers",
    "read_questions",
    "score_answers_exact_match",
    "score_answer_file",
    "write_answers_jsonl",
    "write_gqa_predictions",
    "write_llava_answers",
    "write_vqav2_submission",
]
