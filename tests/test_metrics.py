"""Scorers, written from the official definitions (SQuAD, InfoSeek's infoseek_eval.py, MMSearch,
SimpleVQA) and the MMSearch-R1 paper's search ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fvqa.answers import exact_match, normalize_answer, sub_exact_match
from fvqa.eval.metrics import (
    MISSING,
    Grade,
    bootstrap_ci,
    breakdown,
    correct_without_search,
    infoseek_final,
    infoseek_gold_range,
    infoseek_score,
    mmsearch_f1,
    mmsearch_f1_alternatives,
    parse_numeric_prediction,
    range_iou,
    search_ratio,
    search_usage,
    simplevqa_summary,
    token_f1,
)

# ------------------------------------------------------------------------- normalisation / EM


@pytest.mark.parametrize(
    ("text", "norm"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("ZÜRICH", "zürich"),  # unicode lower-cases, accents stay (as SQuAD)
        ("“Paris”", "“paris”"),  # only ASCII punctuation is stripped (as SQuAD)
        ("  ", ""),
    ],
)
def test_normalize_answer(text: str, norm: str) -> None:
    assert normalize_answer(text) == norm


def test_exact_match_over_ground_truth_and_candidates() -> None:
    golds = ["Eiffel Tower", "La Tour Eiffel"]
    assert exact_match("the eiffel tower.", golds) == 1.0
    assert exact_match("la tour eiffel", golds) == 1.0
    assert exact_match("Eiffel", golds) == 0.0
    assert exact_match("Zürich", ["ZÜRICH"]) == 1.0
    assert exact_match("Zurich", ["Zürich"]) == 0.0
    assert exact_match("anything", []) == 0.0


def test_a_bare_string_gold_is_one_answer_not_letters() -> None:
    assert exact_match("e", "Eiffel") == 0.0
    assert exact_match("Eiffel", "Eiffel") == 1.0
    assert sub_exact_match("e", "Eiffel") == 0.0  # one-way: the gold must occur in the prediction
    assert sub_exact_match("Eiffel Tower, Paris", "Eiffel Tower") == 1.0


def test_sub_exact_match() -> None:
    assert sub_exact_match("It is the Eiffel Tower in Paris", ["Eiffel Tower"]) == 1.0
    assert sub_exact_match("Eiffel", ["Eiffel Tower"]) == 0.0  # a part of the gold is not the gold
    assert sub_exact_match("Big Ben", ["Eiffel Tower"]) == 0.0
    assert sub_exact_match("Big Ben", ["Eiffel Tower", "big ben"]) == 1.0  # any gold may match
    assert sub_exact_match("the", ["Eiffel Tower"]) == 0.0  # normalises to nothing
    assert sub_exact_match("anything at all", ["", "The"]) == 0.0  # empty golds never match
    assert sub_exact_match("", ["Eiffel Tower"]) == 0.0


# --------------------------------------------------------------------------- InfoSeek numbers


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("9-10", (9.0, 10.0)),  # hyphen after a digit splits a range
        ("between 9 and 10 metres", (9.0, 10.0)),
        ("10-9", 10.0),  # descending: first number alone
        ("1990s-2000s", 1990.0),  # hyphen after 's' is a minus sign: 1990, -2000 -> descending
        ("-5 to -3", (-5.0, -3.0)),  # signs
        ("+7", 7.0),
        ("1,234,567 people", 1234567.0),  # thousands commas
        ("1,00", 1.0),  # not a thousands group: 1 then 00 -> descending -> 1
        ("3.14", 3.14),
        ("1.5e3 to 2E3", (1500.0, 2000.0)),  # exponents
        ("2.5E-3", 0.0025),
        (".5", 5.0),  # upstream strips the leading dot
        ("3.", 3.0),
        ("1.2.3", (1.2, 3.0)),  # regex splits it: '1.2' and '.3' -> 3
        ("-.5.3 then 7", 7.0),  # two dots left -> only '-' before the first: skipped (upstream crashes)
        ("5 5", (5.0, 5.0)),  # equal numbers are a (degenerate) range
        ("1 2 0.5", (1.0, 2.0)),  # only the first two numbers count
        ("3 2 10", 3.0),
        ("about ٣٠ km", 30.0),  # unicode digits are digits
        ("unknown", (0.0, 0.0)),  # no number
        ("", (0.0, 0.0)),
    ],
)
def test_parse_numeric_prediction(text: str, parsed: float | tuple[float, float]) -> None:
    assert parse_numeric_prediction(text) == parsed


OFFICIAL_GOLD = [{"wikidata": 100.0, "range": [90.0, 110.0]}]


@pytest.mark.parametrize(
    ("pred", "score"),
    [
        ("100", 1.0),
        ("90", 1.0),  # bounds are inclusive
        ("110", 1.0),
        ("89.99", 0.0),
        ("110.01", 0.0),
        ("about 95 metres", 1.0),
        ("95-105", 1.0),  # range inside the gold range
        ("105-95", 1.0),  # descending: read as the first number alone, 105, inside the range
        ("120-95", 0.0),  # descending: 120 alone, outside (as a range it would have IoU 0.5)
        ("80-120", 1.0),  # IoU 20/40 = 0.5 exactly -> correct
        ("80-120.01", 0.0),  # IoU just under 0.5
        ("70-100", 0.0),  # IoU 10/40
        ("100-130", 0.0),
        ("1,000", 0.0),
        ("1e2", 1.0),
        ("no idea", 0.0),  # [0, 0] outside the gold range
    ],
)
def test_infoseek_numerical(pred: str, score: float) -> None:
    assert infoseek_score(pred, OFFICIAL_GOLD, "Numerical") == score


def test_iou_edge_cases() -> None:
    assert range_iou((0, 2), (1, 3)) == pytest.approx(1 / 3)
    assert range_iou((0, 1), (2, 3)) == 0.0  # disjoint
    assert range_iou((0, 1), (1, 2)) == 0.0  # touching at a point
    assert range_iou((0, 2), (0, 1)) == pytest.approx(0.5)
    # a prediction range twice the gold width and covering it: IoU exactly 0.5 counts
    assert infoseek_score("0-2", [{"range": [0, 1]}], "numerical") == 1.0
    assert infoseek_score("0-2.001", [{"range": [0, 1]}], "numerical") == 0.0
    # half-overlapping range of the same width: IoU 1/3
    assert infoseek_score("5-15", {"range": [10, 20]}, "numerical") == 0.0
    # a degenerate gold range takes only that exact number, or a range equal to it
    assert infoseek_score("1883", [{"range": [1883, 1883]}], "Numerical") == 1.0
    assert infoseek_score("1883-1883", [{"range": [1883, 1883]}], "Numerical") == 1.0
    assert infoseek_score("1882-1884", [{"range": [1883, 1883]}], "Numerical") == 0.0


def test_no_number_is_zero_range_and_matches_a_gold_range_around_zero() -> None:
    """Upstream reads 'no number' as [0, 0]: right when the gold range contains zero."""
    assert infoseek_score("I cannot tell", {"range": [-1, 1]}, "Numerical") == 1.0
    assert infoseek_score("I cannot tell", {"range": [1, 2]}, "Numerical") == 0.0


@pytest.mark.parametrize(
    ("answer_eval", "gold"),
    [
        ([{"wikidata": 5, "range": [4.5, 5.5]}], (4.5, 5.5)),
        ([{"wikidata": 5, "range": [4.5, 5.5]}, {"wikidata": 9, "range": [8, 10]}], (4.5, 5.5)),
        ({"wikidata": 5, "range": ["4.5", "5.5"]}, (4.5, 5.5)),
        (["4.5", "5.5"], (4.5, 5.5)),
        (100, (90.0, 110.00000000000001)),  # bare number v -> [0.9v, 1.1v]
        ("100", (90.0, 110.00000000000001)),
        (["100"], (90.0, 110.00000000000001)),
        (-100, (-110.00000000000001, -90.0)),  # ordered bounds for a negative number
    ],
)
def test_gold_range_shapes(answer_eval: object, gold: tuple[float, float]) -> None:
    assert infoseek_gold_range(answer_eval) == pytest.approx(gold)


def test_bare_gold_number_gets_ten_percent_tolerance() -> None:
    assert infoseek_score("109", 100, "Numerical") == 1.0
    assert infoseek_score("111", 100, "Numerical") == 0.0
    assert infoseek_score("-95", -100, "Numerical") == 1.0


@pytest.mark.parametrize(
    ("answer_eval", "reason"),
    [
        ([{"wikidata": 5}], "no 'range'"),
        ({"range": [5]}, "two bounds"),
        ({"range": 5}, "must be a \\[lo, hi\\] list"),
        ({"range": []}, "two bounds"),
        ({"range": [6, 5]}, "descending"),
        ({"range": ["x", 5]}, "must be a number"),
        ({"range": [float("nan"), 5]}, "NaN"),
        (None, "must be a number"),
        (True, "must be a number"),
        ([], "two bounds"),
    ],
)
def test_bad_numerical_gold_raises_with_reason(answer_eval: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        infoseek_score("5", answer_eval, "Numerical")


def test_infoseek_string_and_time() -> None:
    golds = ["United States of America", "USA", "the US"]
    assert infoseek_score("usa", golds, "String") == 1.0
    assert infoseek_score("The U.S.", golds, "string") == 1.0  # punctuation and article dropped
    assert infoseek_score("America", golds, "String") == 0.0
    # strings are never parsed as numbers, even when they look numeric
    assert infoseek_score("1e3", ["1000"], "String") == 0.0
    assert infoseek_score("1e3", ["1000"], "Numerical") == 1.0
    # time: exact match only (no +/- one year, no year-of-a-date), as the official code does
    assert infoseek_score("1889", ["1889"], "Time") == 1.0
    assert infoseek_score("1890", ["1889"], "Time") == 0.0
    assert infoseek_score("31 March 1889", ["1889"], "Time") == 0.0
    assert infoseek_score("March 31, 1889", ["31 March 1889", "March 31, 1889"], "TIME") == 1.0
    assert infoseek_score("Zürich", "zürich", "String") == 1.0  # a bare string gold is one answer


def test_infoseek_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="unknown InfoSeek question type"):
        infoseek_score("x", ["x"], "entity")
    with pytest.raises(ValueError, match="non-empty list"):
        infoseek_score("x", [], "String")
    with pytest.raises(ValueError, match="non-string"):
        infoseek_score("x", ["x", 3], "String")
    with pytest.raises(TypeError, match="prediction must be a string"):
        infoseek_score(None, ["x"], "String")  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_numeric_parsing_never_crashes(text: str) -> None:
    parsed = parse_numeric_prediction(text)
    assert isinstance(parsed, float | tuple)
    assert infoseek_score(text, OFFICIAL_GOLD, "Numerical") in (0.0, 1.0)


def test_infoseek_final_is_harmonic_mean() -> None:
    assert infoseek_final(0.5, 0.5) == pytest.approx(0.5)
    assert infoseek_final(0.6, 0.3) == pytest.approx(2 * 0.6 * 0.3 / 0.9)
    assert infoseek_final(60.0, 30.0) == pytest.approx(40.0)  # works on percentages too
    assert infoseek_final(0.0, 0.9) == 0.0
    with pytest.raises(ValueError):
        infoseek_final(-0.1, 0.5)


# --------------------------------------------------------------------------------- MMSearch F1


def test_token_f1() -> None:
    assert token_f1("Eiffel Tower", "the Eiffel Tower") == 1.0
    # pred 3 tokens, gold 2, 2 common: P=2/3, R=1 -> F1 = 0.8
    assert token_f1("Eiffel Tower Paris", "Eiffel Tower") == pytest.approx(0.8)
    assert token_f1("Big Ben", "Eiffel Tower") == 0.0
    assert token_f1("a", "the") == 1.0  # both normalise to nothing
    assert token_f1("", "Eiffel") == 0.0
    # repeated tokens count once per occurrence
    assert token_f1("tower tower", "tower") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_mmsearch_f1_official_scores_gt_answer_only() -> None:
    """MMSearch's eval_end2end.py scores against gt_answer alone; the alternatives are a named variant."""
    assert mmsearch_f1("Apple Vision Pro", "Vision Pro") == pytest.approx(0.8)
    assert mmsearch_f1_alternatives("Apple Vision Pro", "Vision Pro", ["Apple Vision Pro"]) == 1.0
    assert mmsearch_f1_alternatives("Apple Vision Pro", "Vision Pro", []) == pytest.approx(0.8)
    assert mmsearch_f1_alternatives("Apple Vision Pro", "Vision Pro", None) == pytest.approx(0.8)
    assert mmsearch_f1_alternatives("Pixel 9", "Vision Pro", ["Apple Vision Pro"]) == 0.0


# -------------------------------------------------------------------------------- SimpleVQA


def test_simplevqa_summary() -> None:
    grades = ["correct"] * 6 + ["incorrect"] * 2 + ["not_attempted"] * 2
    s = simplevqa_summary(grades)
    assert (s.n, s.correct, s.incorrect, s.not_attempted) == (10, 6, 2, 2)
    assert s.correct_rate == pytest.approx(0.6)
    assert s.correct_given_attempted == pytest.approx(0.75)
    assert s.f_score == pytest.approx(2 * 0.6 * 0.75 / 1.35)


def test_simplevqa_grade_spellings_and_edge_cases() -> None:
    s = simplevqa_summary(["Correct", "NOT ATTEMPTED", "not-attempted", Grade.INCORRECT])
    assert (s.correct, s.incorrect, s.not_attempted) == (1, 1, 2)
    nothing_attempted = simplevqa_summary(["not_attempted"] * 3)
    assert (nothing_attempted.correct_given_attempted, nothing_attempted.f_score) == (0.0, 0.0)
    assert simplevqa_summary([]).n == 0
    with pytest.raises(ValueError, match="unknown grade 'maybe'"):
        simplevqa_summary(["correct", "maybe"])


# ----------------------------------------------------------------------------- search usage


def test_search_ratio() -> None:
    assert search_ratio([2, 2, 2], 2) == 1.0  # RAG: always both searches
    assert search_ratio([0, 1, 2, 1], 2) == pytest.approx(0.5)
    assert search_ratio([0, 0], 3) == 0.0
    assert search_ratio(np.array([1, 1]), np.int64(2)) == 0.5  # numpy counts from a dataframe
    assert search_ratio([1, 3], [2, 3]) == pytest.approx(4 / 5)  # per-item limits


@pytest.mark.parametrize(
    ("calls", "limit", "reason"),
    [
        ([3], 2, "more than its limit"),
        ([-1], 2, "non-negative integer"),
        ([1.5], 2, "non-negative integer"),
        ([], 2, "no items"),
        ([1, 1], [2], "2 search counts but 1 limits"),
        ([0], 0, "sum to 0"),
    ],
)
def test_search_ratio_rejects_bad_input(calls: list, limit: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        search_ratio(calls, limit)  # type: ignore[arg-type]


def test_search_usage_split() -> None:
    u = search_usage(image_calls=[1, 1, 0, 0], text_calls=[1, 0, 2, 0], max_search_steps=3)
    assert u.search_ratio == pytest.approx(5 / 12)
    assert (u.image_calls, u.text_calls) == (2, 3)
    assert u.image_share == pytest.approx(0.4)
    assert u.items_with_image_search == 0.5
    assert u.items_with_text_search == 0.5
    assert u.items_without_search == 0.25
    with pytest.raises(ValueError, match="2 image counts but 1 text counts"):
        search_usage([1, 0], [0], 3)


def test_correct_without_search() -> None:
    assert correct_without_search([1.0, 1.0, 0.0, 1.0], [0, 1, 0, 0]) == 0.5
    with pytest.raises(ValueError, match="3 scores but 2 search counts"):
        correct_without_search([1.0, 0.0, 1.0], [0, 0])


# ---------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_is_deterministic() -> None:
    values = [1.0] * 58 + [0.0] * 42
    mean, lo, hi = bootstrap_ci(values, seed=7)
    assert mean == pytest.approx(0.58)
    assert lo < mean < hi
    # about +/- 1.96 * sqrt(p(1-p)/n) = +/- 0.097 for n = 100
    assert 0.06 < hi - mean < 0.14 and 0.06 < mean - lo < 0.14
    assert bootstrap_ci(values, seed=7) == (mean, lo, hi)
    assert bootstrap_ci(values, seed=8) != (mean, lo, hi)


def test_bootstrap_ci_narrows_with_more_data_and_alpha() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 50).astype(float)
    large = rng.integers(0, 2, 2000).astype(float)
    _, lo_s, hi_s = bootstrap_ci(small)
    _, lo_l, hi_l = bootstrap_ci(large)
    assert hi_l - lo_l < hi_s - lo_s
    _, lo_90, hi_90 = bootstrap_ci(small, alpha=0.1)
    assert hi_90 - lo_90 < hi_s - lo_s


def test_bootstrap_ci_constant_and_bad_input() -> None:
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    for bad, reason in [([], "non-empty"), ([1.0, math.nan], "NaN"), ([[1.0]], "flat")]:
        with pytest.raises(ValueError, match=reason):
            bootstrap_ci(bad)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci([1.0], n_resamples=0)


# ---------------------------------------------------------------------------------- breakdown


def test_breakdown_groups_with_counts() -> None:
    records = [
        {"knowledge_type": "Arts", "search_label": "search_free", "score": 1.0},
        {"knowledge_type": "Arts", "search_label": "image_search", "score": 0.0},
        {"knowledge_type": "Place", "search_label": "text_search", "score": True},
        {"search_label": "text_search", "score": 0.5},
    ]
    by_type = breakdown(records, "knowledge_type")
    assert list(by_type) == [MISSING, "Arts", "Place"]
    assert (by_type["Arts"].n, by_type["Arts"].accuracy) == (2, 0.5)
    assert (by_type["Place"].n, by_type["Place"].accuracy) == (1, 1.0)
    assert by_type[MISSING].n == 1  # not dropped: counts add up to the number of records
    assert sum(g.n for g in by_type.values()) == len(records)
    by_label = breakdown(records, "search_label")
    assert by_label["text_search"].accuracy == pytest.approx(0.75)
    by_fn = breakdown(records, lambda r: r["score"] >= 0.5)
    assert by_fn["True"].n == 3


def test_breakdown_rejects_records_without_score() -> None:
    with pytest.raises(ValueError, match="record 1 has no numeric 'score'"):
        breakdown([{"k": "a", "score": 1.0}, {"k": "a"}], "k")
