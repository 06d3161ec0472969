import math
import warnings

import pytest
import torch

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
    vqa_soft_score,
)


def as_floats(result):
    return {key: float(value) for key, value in result.items()}


def test_exact_match_overall_and_per_category():
    metric = ExactMatchAccuracy(categories=["color", "count", "shape"])
    metric.update(["Red.", "blue", "3"], ["red", "green", "3"], ["color", "color", "count"])
    result = as_floats(metric.compute())
    # red==red, blue!=green, 3==3 -> 2/3; color 1/2; count 1/1; shape has no item -> nan
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["acc/color"] == pytest.approx(0.5)
    assert result["acc/count"] == 1.0
    assert math.isnan(result["acc/shape"])


def test_exact_match_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown categories"):
        ExactMatchAccuracy(categories=["a"]).update(["x"], ["x"], ["b"])
    with pytest.raises(ValueError, match="categories are required"):
        ExactMatchAccuracy(categories=["a"]).update(["x"], ["x"])
    with pytest.raises(ValueError, match="categories=None"):
        ExactMatchAccuracy().update(["x"], ["x"], ["a"])
    with pytest.raises(ValueError, match="same length"):
        ExactMatchAccuracy().update(["x", "y"], ["x"])
    with pytest.raises(ValueError, match="unique"):
        ExactMatchAccuracy(categories=["a", "a"])


def test_exact_match_without_updates_is_nan_not_zero():
    with pytest.warns(UserWarning, match=r"compute`` method of metric ExactMatchAccuracy was called before the "
                                         r"``update`` method"):
        result = ExactMatchAccuracy().compute()
    assert math.isnan(float(result["acc"]))


def test_gqa_normalises_only_the_prediction():
    metric = GQAAccuracy()
    metric.update(["Table.", "table"], ["table", "Table"])
    # "Table." -> "table" == "table"; "table" != "Table" (GQA compares the stored answer verbatim) -> 1/2
    assert float(metric.compute()["acc"]) == 0.5


def test_merged_states_equal_one_metric_over_all_items():
    """DDP: two ranks' sum states merged give the same result as one process that saw everything."""
    predictions = ["red", "blue", "3", "circle", "2"]
    targets = ["red", "green", "3", "circle", "4"]
    categories = ["color", "color", "count", "shape", "count"]
    whole = ExactMatchAccuracy(categories=["color", "count", "shape"])
    whole.update(predictions, targets, categories)
    rank0, rank1 = (ExactMatchAccuracy(categories=["color", "count", "shape"]) for _ in range(2))
    rank0.update(predictions[:2], targets[:2], categories[:2])
    rank1.update(predictions[2:], targets[2:], categories[2:])
    rank0.merge_state(rank1)
    assert as_floats(rank0.compute()) == as_floats(whole.compute())
    assert float(whole.compute()["acc"]) == pytest.approx(3 / 5)


def test_items_repeated_by_a_distributed_sampler_count_once():
    """DDP pads each rank's share with repeats of the first items: with ids, a repeat on any rank counts once."""
    predictions = ["red", "blue", "3", "circle", "2"]
    targets = ["red", "green", "3", "circle", "4"]
    categories = ["color", "color", "count", "shape", "count"]
    ids = [11, 12, 13, 14, 15]
    whole = ExactMatchAccuracy(categories=["color", "count", "shape"])
    whole.update(predictions, targets, categories)
    rank0, rank1 = (ExactMatchAccuracy(categories=["color", "count", "shape"]) for _ in range(2))
    rank0.update(predictions[0::2], targets[0::2], categories[0::2], ids[0::2])  # items 0, 2, 4
    rank1.update(predictions[1::2] + predictions[:1], targets[1::2] + targets[:1], categories[1::2] + categories[:1],
                 ids[1::2] + ids[:1])  # items 1, 3 and a repeat of item 0
    rank0.merge_state(rank1)
    assert as_floats(rank0.compute()) == as_floats(whole.compute())
    without_ids = ExactMatchAccuracy(categories=["color", "count", "shape"])
    without_ids.update(predictions + predictions[:1], targets + targets[:1], categories + categories[:1])
    assert float(without_ids.compute()["acc"]) == pytest.approx(4 / 6)  # the repeat counted twice
    with pytest.raises(ValueError, match="same length"):
        whole.update(["red"], ["red"], ["color"], ids=[1, 2])


# Per metric class with per-item states: a constructor and each rank's share of the items (one update() each).
# Rank 0's share repeats an item, rank 1's repeats one of rank 0's, as a distributed sampler's padding does.
TWO_RANK_CASES = {
    "exact_match": (
        lambda: ExactMatchAccuracy(categories=["color", "count", "shape"]),
        (["red", "blue", "3", "red"], ["red", "green", "3", "red"], ["color", "color", "count", "color"],
         [11, 12, 13, 11]),
        (["circle", "5", "red"], ["circle", "4", "red"], ["shape", "count", "color"], [14, 15, 11]),
    ),
    "mme": (
        MMEScore,
        (["Yes", "No", "Yes"], ["Yes", "Yes", "No"], ["color", "color", "code_reasoning"], ["1.jpg", "1.jpg", "2.jpg"]),
        (["No", "No"], ["No", "no"], ["color", "color"], ["3.jpg", "3.jpg"]),
    ),
    "mmbench": (
        lambda: MMBenchCircularAccuracy(categories=["ocr", "scene"]),
        (["A", "A", "B"], ["A", "B", "B"], [3, 1_000_003, 4], [["x", "y"]] * 3, ["scene", "scene", "ocr"]),
        (["A"], ["A"], [1_000_004], [["x", "y"]], ["ocr"]),
    ),
}
SCORED_BY = {"nobody": (), "rank 0 only": (0,), "both ranks": (0, 1)}


def _score_on_two_ranks(rank: int, port: int, out: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    # a dtype mismatch aborts in gloo's all-gather, or leaves the other rank waiting: fail fast instead
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        warnings.simplefilter("ignore")  # compute() before any update() warns
        results = {}
        for name, (make, *shares) in TWO_RANK_CASES.items():
            for scored_by, ranks in SCORED_BY.items():
                metric = make()  # a fresh metric: compute() again without an update would return its cache unsynced
                if rank in ranks:
                    metric.update(*shares[rank])
                results[name, scored_by] = as_floats(metric.compute())
        torch.save(results, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Every case of `TWO_RANK_CASES` computed on 2 gloo processes (one spawn for all: it costs seconds)."""
    import socket

    import torch
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("two_ranks")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_score_on_two_ranks, args=(port, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("scored_by", list(SCORED_BY))
@pytest.mark.parametrize("name", list(TWO_RANK_CASES))
def test_per_item_states_sync_when_a_rank_scored_nothing(two_rank_results, name, scored_by):
    """DDP: a rank the sampler gave no batch gathers its empty per-item states in their dtypes (not float32, which
    aborted the all-gather); every rank gets the result of one process that saw the items once."""
    make, *shares = TWO_RANK_CASES[name]
    expected = make()
    for rank in SCORED_BY[scored_by]:
        expected.update(*shares[rank])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute() before any update() warns
        expected = as_floats(expected.compute())
    for result in two_rank_results:
        assert result[name, scored_by] == pytest.approx(expected, nan_ok=True)
    if name == "exact_match" and scored_by == "nobody":
        assert math.isnan(expected["acc"]) and math.isnan(expected["acc/color"])
    if name == "exact_match" and scored_by == "rank 0 only":
        # item 11 twice counts once: red right, blue wrong, 3 right -> 2/3; color 1/2, count 1/1, shape none
        assert expected["acc"] == pytest.approx(2 / 3) and expected["acc/color"] == 0.5
        assert math.isnan(expected["acc/shape"])
    if name == "exact_match" and scored_by == "both ranks":
        # rank 1's repeat of item 11 counts once too: + circle right, 5 wrong -> 3/5; count 1/2
        assert expected["acc"] == pytest.approx(3 / 5) and expected["acc/count"] == 0.5
    if name == "mme" and scored_by == "rank 0 only":
        # color: 1 of image 1's 2 questions right -> acc 50, acc+ 0; code_reasoning wrong -> 0
        assert expected["color/score"] == 50.0 and expected["code_reasoning/score"] == 0.0
    if name == "mmbench" and scored_by == "rank 0 only":
        # question 3: rotation 1000003 wrong; question 4 right -> circular 1/2, scene 0, ocr 1; originals right
        assert expected == {"acc": 0.5, "acc/vanilla": 1.0, "acc/ocr": 1.0, "acc/scene": 0.0}


def test_merged_rotations_from_two_ranks_form_one_circular_group():
    """Cat states: rotations of one question on different ranks are still judged together."""
    choices = [["x", "y"]] * 4
    rank0, rank1 = MMBenchCircularAccuracy(), MMBenchCircularAccuracy()
    rank0.update(["A", "A"], ["A", "A"], [0, 7], choices[:2])
    rank1.update(["B", "A"], ["B", "B"], [1_000_000, 1_000_007], choices[2:])
    rank0.merge_state(rank1)
    result = as_floats(rank0.compute())
    # question 0: both rotations right; question 7: rotation 1000007 wrong -> circular 1/2; originals 0, 7 right -> 1
    assert result["acc"] == 0.5
    assert result["acc/vanilla"] == 1.0


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_soft_score_over_ten_humans(matches, expected):
    # leave-one-out over 10 humans with m agreeing: (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10
    assert vqa_soft_score("cat", ["cat"] * matches + ["dog"] * (10 - matches)) == pytest.approx(expected)


def test_vqa_soft_accuracy_metric_with_categories_and_normalisation():
    metric = VQASoftAccuracy(categories=["number", "other"])
    metric.update(["Two.", "red"], [["2"] * 10, ["red"] + ["blue"] * 9], ["number", "other"])
    result = as_floats(metric.compute())
    # "Two." -> "2", 10 matches -> 1.0; "red" 1 match -> 0.3; mean 0.65
    assert result == pytest.approx({"acc": 0.65, "acc/number": 1.0, "acc/other": 0.3})


def test_vqa_target_normalisation_modes_differ_on_articles():
    humans = [["the red one"] * 10]
    official_vqav2 = VQASoftAccuracy(target_normalization="punctuation")
    official_vqav2.update(["red one"], humans)
    textvqa = VQASoftAccuracy(target_normalization="full")
    textvqa.update(["red one"], humans)
    # VQAv2 leaves "the" in the human answers, TextVQA's evaluator removes it
    assert float(official_vqav2.compute()["acc"]) == 0.0
    assert float(textvqa.compute()["acc"]) == 1.0
    # VQAv2 processes human answers only when they disagree: ten "t-shirt" stay "t-shirt", which the prediction,
    # processed, no longer is; TextVQA processes both sides
    agreeing, disagreeing = VQASoftAccuracy(target_normalization="punctuation"), VQASoftAccuracy(
        target_normalization="punctuation")
    agreeing.update(["t-shirt"], [["t-shirt"] * 10])
    disagreeing.update(["t-shirt"], [["t-shirt"] * 9 + ["shirt"]])
    assert float(agreeing.compute()["acc"]) == 0.0 and float(disagreeing.compute()["acc"]) == 1.0
    # m4c splits "'s" off before comparing, on both sides
    possessive = VQASoftAccuracy(target_normalization="full")
    possessive.update(["whats"], [["what's"] * 10])
    assert float(possessive.compute()["acc"]) == 0.0
    with pytest.raises(ValueError, match="target_normalization"):
        VQASoftAccuracy(target_normalization="lower")
    with pytest.raises(ValueError, match="human_answers is empty"):
        VQASoftAccuracy().update(["x"], [[]])


def test_pope_metrics_per_split_and_zero_division():
    metric = POPEMetrics(splits=["random", "popular"])
    metric.update(["Yes", "No", "Yes, it is.", "There is no cat."], ["yes", "yes", "no", "no"], ["random"] * 4)
    metric.update(["No", "No"], ["yes", "no"], ["popular"] * 2)
    result = as_floats(metric.compute())
    # random: TP=1 FN=1 FP=1 TN=1 -> acc .5, precision .5, recall .5, F1 .5, yes ratio .5
    assert result["random/acc"] == 0.5 and result["random/f1"] == 0.5 and result["random/yes_ratio"] == 0.5
    # popular: nothing predicted yes -> precision 0 (not a division error), recall 0, F1 0, acc 1/2
    assert result["popular/precision"] == 0.0 and result["popular/f1"] == 0.0 and result["popular/acc"] == 0.5
    assert result["f1"] == pytest.approx(0.25) and result["acc"] == pytest.approx(0.5)


def test_pope_precision_counts_false_alarms_and_recall_misses():
    metric = POPEMetrics(splits=["random"])
    metric.update(["yes", "yes", "yes", "no"], ["yes", "no", "no", "yes"], ["random"] * 4)  # TP 1, FP 2, FN 1
    result = as_floats(metric.compute())
    assert result["random/precision"] == pytest.approx(1 / 3) and result["random/recall"] == pytest.approx(1 / 2)
    assert result["random/f1"] == pytest.approx(2 / 5) and result["random/yes_ratio"] == pytest.approx(3 / 4)


def test_pope_rejects_unknown_split_and_label():
    with pytest.raises(ValueError, match="unknown splits"):
        POPEMetrics().update(["yes"], ["yes"], ["val"])
    with pytest.raises(ValueError, match="labels must be"):
        POPEMetrics().update(["yes"], ["maybe"], ["random"])


def test_mme_accuracy_plus_needs_both_questions_of_an_image():
    metric = MMEScore()
    metric.update(
        ["Yes", "No", "Yes", "Yes", "No", "No"],
        ["Yes", "No", "Yes", "No", "yes", "no"],
        ["color", "color", "color", "color", "code_reasoning", "code_reasoning"],
        ["1.jpg", "1.jpg", "2.jpg", "2.jpg", "1.jpg", "1.jpg"],
    )
    result = as_floats(metric.compute())
    # color: 3/4 right -> 75, image 1 both right, image 2 not -> acc+ 50, score 125
    # code_reasoning (same file name, other subtask): 1/2 -> 50, acc+ 0 -> score 50
    assert result["color/acc"] == 75.0 and result["color/acc_plus"] == 50.0 and result["color/score"] == 125.0
    assert result["code_reasoning/score"] == 50.0
    assert result["perception"] == 125.0 and result["cognition"] == 50.0 and result["total"] == 175.0
    assert "existence/score" not in result


def test_mme_merge_joins_an_image_split_across_ranks():
    rank0, rank1 = MMEScore(), MMEScore()
    rank0.update(["Yes"], ["Yes"], ["scene"], ["a.jpg"])
    rank1.update(["Yes"], ["No"], ["scene"], ["a.jpg"])
    rank0.merge_state(rank1)
    result = as_floats(rank0.compute())
    assert result["scene/acc"] == 50.0 and result["scene/acc_plus"] == 0.0


def test_mme_rejects_unknown_subtask_and_answer():
    with pytest.raises(ValueError, match="unknown subtasks"):
        MMEScore().update(["yes"], ["yes"], ["colour"], ["a"])
    with pytest.raises(ValueError, match="answers must be"):
        MMEScore().update(["yes"], ["maybe"], ["color"], ["a"])


def test_mmbench_circular_accuracy_per_category():
    metric = MMBenchCircularAccuracy(categories=["ocr", "scene"])
    choices = [["beach", "forest"], ["forest", "beach"], ["yes", "no"], ["no", "yes"]]
    metric.update(["A", "beach", "B", "B"], ["A", "B", "B", "A"], [3, 1_000_003, 4, 1_000_004], choices,
                  ["scene", "scene", "ocr", "ocr"])
    result = as_floats(metric.compute())
    # question 3: "A" right, "beach" = option B right -> right; question 4: "B" right, "B" wrong -> wrong
    assert result == {"acc": 0.5, "acc/vanilla": 1.0, "acc/ocr": 0.0, "acc/scene": 1.0}


def test_mmbench_rejects_inconsistent_rotations_and_bad_targets():
    metric = MMBenchCircularAccuracy(categories=["a", "b"])
    metric.update(["A", "A"], ["A", "A"], [0, 1_000_000], [["x", "y"]] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="different categories"):
        metric.compute()
    with pytest.raises(ValueError, match="option letters"):
        MMBenchCircularAccuracy().update(["A"], ["C"], [0], [["x", "y"]])
    with pytest.raises(ValueError, match="'AB' is not one of"):  # a letter, not a substring of "AB"
        MMBenchCircularAccuracy().update(["A"], ["AB"], [0], [["x", "y"]])


def _pope_filled():
    metric = POPEMetrics(splits=["random", "popular"])
    metric.update(["yes", "no"], ["yes", "no"], ["random", "random"])  # "popular" gets nothing: its values are nan
    return metric


def _mme_filled():
    metric = MMEScore()
    metric.update(["Yes", "No"], ["Yes", "Yes"], ["color", "code_reasoning"], ["1.jpg", "1.jpg"])
    return metric


def _mmbench_filled():
    metric = MMBenchCircularAccuracy(categories=["ocr", "scene"])
    metric.update(["A", "B"], ["A", "A"], [3, 1_000_003], [["x", "y"], ["y", "x"]], ["ocr", "ocr"])
    return metric


def _exact_match_filled():
    metric = ExactMatchAccuracy(categories=["a", "b"])
    metric.update(["x", "y", "y"], ["x", "x", "x"], ["a", "a", "a"], ids=[1, 2, 2])
    return metric


@pytest.mark.parametrize("filled", [_pope_filled, _mme_filled, _mmbench_filled, _exact_match_filled])
def test_compute_builds_its_tensors_on_the_states_device(filled):
    # Under a different default device, a tensor built without `device=` lands there and meets the states' device in
    # one operation: on a GPU run MME and MMBench failed that way (a CPU sum, a CPU scatter target). `meta` stands in
    # for the GPU here: the states stay on the CPU, any tensor made without a device would not.
    metric = filled()
    expected = {key: float(value) for key, value in filled().compute().items()}
    with torch.device("meta"):
        result = metric.compute()
    assert {value.device.type for value in result.values()} == {"cpu"}
    observed = {key: float(value) for key, value in result.items()}
    assert observed.keys() == expected.keys()
    assert all(observed[k] == expected[k] or (math.isnan(observed[k]) and math.isnan(expected[k])) for k in expected)


def test_scienceqa_accuracy_with_image_subset():
    metric = ScienceQAAccuracy()
    metric.update(["B", "The answer is A.", "C"], [1, 0, 0], [3, 2, 2], [True, False, True])
    result = as_floats(metric.compute())
    # B -> 1 right; A -> 0 right; C beyond 2 choices -> wrong: 2/3; image 1/2; no image 1/1
    assert result == pytest.approx({"acc": 2 / 3, "acc/img": 0.5, "acc/no_img": 1.0})
    multi_letter = ScienceQAAccuracy()
    multi_letter.update(["AB", "A"], [0, 0], [4, 4], [True, True])
    assert float(multi_letter.compute()["acc"]) == 0.5  # "AB" names no option, though it starts with A
    with pytest.raises(ValueError, match="outside"):
        metric.update(["A"], [2], [2], [True])


REFERENCES = {"cat": ["A cat.", "a cat"], "dog": ["A dog!", "a dog"]}


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        # 2 images -> idf log(2); "a" is in both (weight 0). Candidate = references: per ref n=1,2 cosine 1,
        # n=3,4 zero -> mean over n 0.5, averaged over refs, x10 = 5
        ("a cat", 5.0),
        # "cat cat": tf 2 clipped to the reference's 1 -> unigram min(2w, w) * w / (2w * w) = 0.5, bigram "cat cat"
        # absent -> 0; mean over n 0.125, x10 = 1.25 (2.5 without clipping)
        ("cat cat", 1.25),
        # "cat": unigram cosine 1, no bigrams; length (bigrams) 0 vs 1 -> penalty exp(-1/72); 10 * 1/4 * penalty
        ("cat", 2.5 * math.exp(-1 / 72)),
        ("a dog", 0.0),
    ],
)
def test_cider_d_hand_computed(candidate, expected):
    metric = CIDErD(REFERENCES)
    metric.update([candidate], ["cat"])
    assert float(metric.compute()["cider_d"]) == pytest.approx(expected)


def test_cider_d_metric_equals_corpus_function_and_merges():
    mean, per_image = cider_d({"cat": "A cat.", "dog": "dog"}, REFERENCES)
    assert per_image["cat"] == pytest.approx(5.0) and mean == pytest.approx((5.0 + 2.5 * math.exp(-1 / 72)) / 2)
    rank0, rank1 = CIDErD(REFERENCES), CIDErD(REFERENCES)
    rank0.update(["A cat."], ["cat"])
    rank1.update(["dog"], ["dog"])
    rank0.merge_state(rank1)
    assert float(rank0.compute()["cider_d"]) == pytest.approx(mean)


def test_cider_d_rejects_unknown_images_and_empty_references():
    with pytest.raises(ValueError, match="no reference captions"):
        CIDErD(REFERENCES).update(["a cat"], ["bird"])
    with pytest.raises(ValueError, match="without a reference"):
        CIDErD({"cat": []})
    with pytest.raises(ValueError, match="without references"):
        cider_d({"bird": "a bird"}, REFERENCES)



def test_in_loop_score_counts_both_questions_of_one_id_and_a_repeat_once():
    from lightning_modules.common import score

    metric = ExactMatchAccuracy()
    batch = {"question_ids": ["artwork/1.jpg", "artwork/1.jpg", "artwork/1.jpg"],  # MME: one id, two questions
             "questions": ["is it a painting ?", "is it a photo ?", "is it a painting ?"],  # the third: a repeat
             "answers": ["yes", "no", "yes"], "categories": ["artwork"] * 3}
    score(metric, ["yes", "yes", "yes"], batch)
    assert float(metric.compute()["acc"]) == pytest.approx(0.5)
