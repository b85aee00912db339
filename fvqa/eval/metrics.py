"""Benchmark scoring and aggregation for evaluation.

Answer normalisation and exact / sub-exact match live in ``fvqa.answers`` (shared with the probe,
the reward and annotation). The benchmark scorers follow each benchmark's official definition
(InfoSeek, MMSearch, SimpleVQA), because published numbers move by 10-15 points with the scoring
protocol; where the official code would crash or is ambiguous, the function's docstring says what
we do instead.

Everything here is a pure function: no I/O, no model calls.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from fvqa.answers import exact_match, gold_list, normalize_answer

# --------------------------------------------------------------------------------------- InfoSeek

NumericPrediction = float | tuple[float, float]

# One number as the official InfoSeek scorer reads it: sign, an optional leading dot, digits,
# thousands groups, a decimal part and an exponent.
_NUMBER = re.compile(
    r"""
    [+-]?              # sign
    \.?\d+             # integer part; ".5" is allowed (and later loses its dot, as upstream)
    (?:,\d{3})*        # thousands groups: 1,234,567
    \.?\d*             # decimal part
    (?:[eE][+-]?\d+)?  # exponent
    """,
    re.VERBOSE,
)
_IOU_THRESHOLD = 0.5
_EPS = 1e-12  # upstream pads both range lengths and the threshold by this much


class InfoSeekType(StrEnum):
    """InfoSeek's three question types (the qtype files spell them String/Numerical/Time)."""

    STRING = "string"
    NUMERICAL = "numerical"
    TIME = "time"


def infoseek_question_type(question_type: str) -> InfoSeekType:
    """Parse a qtype label case-insensitively; an unknown label is an error, not a string question."""
    try:
        return InfoSeekType(str(question_type).strip().lower())
    except ValueError:
        allowed = ", ".join(t.value for t in InfoSeekType)
        raise ValueError(
            f"unknown InfoSeek question type {question_type!r} (expected one of {allowed})"
        ) from None


def _split_hyphen_ranges(text: str) -> str:
    """'9-10' -> '9 - 10': a hyphen right after a digit separates a range, it is not a minus sign."""
    return "".join(
        " - " if ch == "-" and i > 0 and text[i - 1].isdigit() else ch for i, ch in enumerate(text)
    )


def _to_float(token: str) -> float | None:
    """Turn one matched token into a float the way upstream does, or None if nothing numeric is left.

    Commas go, dots at either end go (so '.5' reads as 5 and '3.' as 3), and a token that still has
    two or more dots keeps the part before its first dot. Upstream raises on a token that is then
    only a sign ('-.5.3' -> '-'); we skip such a token instead of crashing the whole evaluation.
    """
    token = token.replace(",", "").strip(".")
    if token.count(".") > 1:
        token = token.split(".")[0]
    try:
        return float(token)
    except ValueError:
        return None


def parse_numeric_prediction(text: str) -> NumericPrediction:
    """Read a model's numeric answer as a single number or an ascending (lo, hi) range.

    Only the first two numbers count: two ascending (or equal) numbers form a range, otherwise the
    first number stands alone; with no number at all the answer is the range (0, 0) - which, as in
    the official scorer, is counted correct when the gold range lies around zero.
    """
    numbers = [
        n for n in (_to_float(t) for t in _NUMBER.findall(_split_hyphen_ranges(text))) if n is not None
    ]
    if not numbers:
        return (0.0, 0.0)
    if len(numbers) >= 2 and numbers[0] <= numbers[1]:
        return (numbers[0], numbers[1])
    return numbers[0]


def _as_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{what} is NaN")
    return number


def infoseek_gold_range(answer_eval: Any, tolerance: float = 0.1) -> tuple[float, float]:
    """The gold (lo, hi) of a numerical InfoSeek item; raises ValueError with the reason if malformed.

    Accepts the official shape (a list holding one ``{"wikidata": v, "range": [lo, hi]}`` dict; only
    the first dict counts, as upstream), that dict itself, an already extracted ``[lo, hi]`` pair,
    or a bare gold number v (alone or as the one element of a list), which becomes [0.9v, 1.1v]
    (bounds ordered, so a negative v works).
    Loaders call this to reject bad rows before any model call is paid for.
    """
    if isinstance(answer_eval, list | tuple) and len(answer_eval) == 1:
        answer_eval = answer_eval[0]  # the official one-dict list, or a one-number list
    elif isinstance(answer_eval, list | tuple) and answer_eval and isinstance(answer_eval[0], Mapping):
        answer_eval = answer_eval[0]
    if isinstance(answer_eval, Mapping):
        if "range" not in answer_eval:
            raise ValueError(f"numerical answer_eval has no 'range': {dict(answer_eval)!r}")
        answer_eval = answer_eval["range"]
        if not isinstance(answer_eval, list | tuple):
            raise ValueError(f"numerical 'range' must be a [lo, hi] list, got {answer_eval!r}")
    if isinstance(answer_eval, list | tuple):
        if len(answer_eval) < 2:
            raise ValueError(f"numerical gold range needs two bounds, got {list(answer_eval)!r}")
        lo = _as_number(answer_eval[0], "gold range lower bound")
        hi = _as_number(answer_eval[1], "gold range upper bound")
        if lo > hi:
            raise ValueError(f"gold range is descending: [{lo}, {hi}]")
        return (lo, hi)
    value = _as_number(answer_eval, "numerical gold answer")
    a, b = value * (1 - tolerance), value * (1 + tolerance)
    return (min(a, b), max(a, b))


def range_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two closed intervals, with upstream's tiny length padding."""
    lo_a, hi_a = min(a), max(a)
    lo_b, hi_b = min(b), max(b)
    overlap = max(0.0, min(hi_a, hi_b) - max(lo_a, lo_b))
    union = (hi_a - lo_a + _EPS) + (hi_b - lo_b + _EPS) - overlap
    return overlap / union if union > 0 else 0.0


def numeric_range_score(prediction: NumericPrediction, gold: tuple[float, float]) -> float:
    """1.0 if a number lies in the gold range (inclusive), or a range lies inside it or has IoU >= 0.5."""
    lo, hi = gold
    if not isinstance(prediction, tuple):
        return float(lo <= prediction <= hi)
    p_lo, p_hi = prediction
    if lo <= p_lo <= hi and lo <= p_hi <= hi:
        return 1.0
    return float(range_iou(prediction, gold) >= _IOU_THRESHOLD - _EPS)


def _string_answers(answer_eval: Any) -> list[str]:
    answers = gold_list(answer_eval) if isinstance(answer_eval, str | list | tuple) else None
    if not answers:
        raise ValueError(f"answer_eval must be a non-empty list of strings, got {answer_eval!r}")
    bad = [a for a in answers if not isinstance(a, str)]
    if bad:
        raise ValueError(f"answer_eval holds non-string answers {bad!r}")
    return answers


def infoseek_score(prediction: str, answer_eval: Any, question_type: str) -> float:
    """The official InfoSeek score of one prediction: 1.0 or 0.0.

    String and Time questions: normalised exact match against any answer in ``answer_eval`` (the
    official code does only that for Time, whatever its docstring promises about +/- one year).
    Numerical questions: see ``parse_numeric_prediction`` and ``numeric_range_score``.
    Malformed gold data or an unknown question type raise ValueError saying what is wrong.
    """
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    qtype = infoseek_question_type(question_type)
    if qtype is InfoSeekType.NUMERICAL:
        return numeric_range_score(parse_numeric_prediction(prediction), infoseek_gold_range(answer_eval))
    return exact_match(prediction, _string_answers(answer_eval))


def harmonic_mean(*values: float) -> float:
    """Harmonic mean; 0 if any value is 0 (upstream pads zeros to 1e-12, which gives ~0 too)."""
    if not values:
        raise ValueError("harmonic mean of nothing")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs non-negative values, got {values!r}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def infoseek_final(unseen_question_acc: float, unseen_entity_acc: float) -> float:
    """InfoSeek's headline number: harmonic mean of the unseen-question and unseen-entity accuracies."""
    return harmonic_mean(unseen_question_acc, unseen_entity_acc)


# --------------------------------------------------------------------------------------- MMSearch


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between two answers after normalisation (both empty counts as a match)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def mmsearch_f1(prediction: str, gt_answer: str) -> float:
    """MMSearch's official end-to-end score: token F1 against ``gt_answer`` alone, as MMSearch's own
    ``eval_end2end.py`` scores it (``alternative_gt_answers`` play no part there)."""
    return token_f1(prediction, gt_answer)


def mmsearch_f1_alternatives(
    prediction: str, gt_answer: str, alternative_gt_answers: Iterable[str] | None = None
) -> float:
    """A more lenient variant, reported under its own name: the best token F1 over ``gt_answer`` and
    its ``alternative_gt_answers`` (never the official number)."""
    golds = [gt_answer, *gold_list(alternative_gt_answers or [])]
    return max(token_f1(prediction, g) for g in golds)


# -------------------------------------------------------------------------------------- SimpleVQA


class Grade(StrEnum):
    """SimpleVQA's (SimpleQA's) three judge grades."""

    CORRECT = "correct"
    INCORRECT = "incorrect"
    NOT_ATTEMPTED = "not_attempted"


def parse_grade(grade: str | Grade) -> Grade:
    """Accept 'correct', 'Incorrect', 'not attempted', 'NOT_ATTEMPTED', ...; anything else is an error."""
    key = re.sub(r"[\s\-]+", "_", str(grade).strip().lower())
    try:
        return Grade(key)
    except ValueError:
        raise ValueError(f"unknown grade {grade!r} (expected correct, incorrect or not_attempted)") from None


@dataclass(frozen=True)
class GradeSummary:
    """Counts and SimpleVQA's three headline rates."""

    n: int
    correct: int
    incorrect: int
    not_attempted: int
    correct_rate: float
    correct_given_attempted: float
    f_score: float


def simplevqa_summary(grades: Iterable[str | Grade]) -> GradeSummary:
    """Correct rate, correct-given-attempted, and their harmonic mean (SimpleVQA's F-score)."""
    counts = Counter(parse_grade(g) for g in grades)
    n = sum(counts.values())
    correct, incorrect = counts[Grade.CORRECT], counts[Grade.INCORRECT]
    attempted = correct + incorrect
    correct_rate = correct / n if n else 0.0
    given_attempted = correct / attempted if attempted else 0.0
    denom = correct_rate + given_attempted
    f_score = 2 * correct_rate * given_attempted / denom if denom else 0.0
    return GradeSummary(
        n=n,
        correct=correct,
        incorrect=incorrect,
        not_attempted=counts[Grade.NOT_ATTEMPTED],
        correct_rate=correct_rate,
        correct_given_attempted=given_attempted,
        f_score=f_score,
    )


# ----------------------------------------------------------------------------------- search usage


def _counts(values: Sequence[int], what: str) -> list[int]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise ValueError(f"{what}[{i}] must be a non-negative integer, got {v!r}")
        out.append(int(v))
    return out


def search_ratio(n_search_calls: Sequence[int], max_search_steps: int | Sequence[int]) -> float:
    """The paper's search ratio: search calls made / maximum search calls allowed, over all items.

    ``max_search_steps`` is one limit for every item or one per item. A count above its limit is an
    error: it means the trajectory broke the protocol or the limit passed in is wrong.
    """
    calls = _counts(n_search_calls, "n_search_calls")
    if not calls:
        raise ValueError("search ratio of no items")
    limits = _counts(
        [max_search_steps] * len(calls)
        if isinstance(max_search_steps, int | np.integer)
        else max_search_steps,
        "max_search_steps",
    )
    if len(limits) != len(calls):
        raise ValueError(f"{len(calls)} search counts but {len(limits)} limits")
    over = [i for i, (c, m) in enumerate(zip(calls, limits, strict=True)) if c > m]
    if over:
        i = over[0]
        raise ValueError(f"item {i} made {calls[i]} search calls, more than its limit {limits[i]}")
    total = sum(limits)
    if total == 0:
        raise ValueError("maximum search steps sum to 0: the search ratio is undefined")
    return sum(calls) / total


@dataclass(frozen=True)
class SearchUsage:
    """How a run used its tools: the overall search ratio and the image/text split."""

    n: int
    search_ratio: float
    image_calls: int
    text_calls: int
    image_share: float  # image calls / all calls (0 when no call was made)
    items_with_image_search: float  # share of items
    items_with_text_search: float
    items_without_search: float


def search_usage(
    image_calls: Sequence[int], text_calls: Sequence[int], max_search_steps: int | Sequence[int]
) -> SearchUsage:
    """Split the search ratio into image and text calls, per call and per item."""
    img = _counts(image_calls, "image_calls")
    txt = _counts(text_calls, "text_calls")
    if len(img) != len(txt):
        raise ValueError(f"{len(img)} image counts but {len(txt)} text counts")
    totals = [i + t for i, t in zip(img, txt, strict=True)]
    ratio = search_ratio(totals, max_search_steps)
    n, n_img, n_txt = len(totals), sum(img), sum(txt)
    return SearchUsage(
        n=n,
        search_ratio=ratio,
        image_calls=n_img,
        text_calls=n_txt,
        image_share=n_img / (n_img + n_txt) if n_img + n_txt else 0.0,
        items_with_image_search=sum(1 for i in img if i) / n,
        items_with_text_search=sum(1 for t in txt if t) / n,
        items_without_search=sum(1 for s in totals if s == 0) / n,
    )


def correct_without_search(scores: Sequence[float], n_search_calls: Sequence[int]) -> float:
    """Share of all items answered correctly (score >= 0.5) without any search call."""
    calls = _counts(n_search_calls, "n_search_calls")
    if len(scores) != len(calls):
        raise ValueError(f"{len(scores)} scores but {len(calls)} search counts")
    if not calls:
        raise ValueError("no items")
    return sum(1 for s, c in zip(scores, calls, strict=True) if c == 0 and s >= 0.5) / len(calls)


# ---------------------------------------------------------------------------------- aggregation


def bootstrap_ci(
    values: Sequence[float], n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and a percentile-bootstrap (1 - alpha) interval around it.

    Seeded, so a report regenerated from the same scores shows the same interval.
    """
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty flat list of numbers")
    if not np.all(np.isfinite(data)):
        raise ValueError("bootstrap_ci got NaN or infinite values")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(data.mean()), float(lo), float(hi)


MISSING = "(missing)"


@dataclass(frozen=True)
class Group:
    """One row of a breakdown table."""

    n: int
    accuracy: float


def breakdown(
    records: Iterable[Mapping[str, Any]],
    key: str | Callable[[Mapping[str, Any]], Any],
    score_key: str = "score",
) -> dict[str, Group]:
    """Mean score per value of ``key`` (a field name or a function of the record), with counts.

    Records without the field are grouped under ``"(missing)"`` rather than dropped, so the group
    sizes always add up to the number of records. A record without a numeric score is an error.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for i, rec in enumerate(records):
        value = key(rec) if callable(key) else rec.get(key)
        group = MISSING if value is None or value == "" else str(value)
        score = rec.get(score_key)
        if isinstance(score, bool):
            score = float(score)
        if not isinstance(score, int | float) or math.isnan(score):
            raise ValueError(f"record {i} has no numeric {score_key!r}: {score!r}")
        sums[group] = sums.get(group, 0.0) + float(score)
        counts[group] = counts.get(group, 0) + 1
    return {g: Group(n=counts[g], accuracy=sums[g] / counts[g]) for g in sorted(counts)}
