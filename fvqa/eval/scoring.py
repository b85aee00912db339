"""Score one prediction with every applicable metric: EM, SubEM, the benchmark's official scorer, judge.

The official scorer per benchmark: FVQA - exact match over ground truth + candidates (upstream's
reward); InfoSeek - the official InfoSeek score (per question type); MMSearch - end-to-end token F1;
SimpleVQA - the judge's three-way grade (correct counts); LiveVQA - the judge (its paper's
protocol). Lenient variants of an official scorer (MMSearch F1 over the alternative answers too) are
kept beside it under their own names (`variants`), never in its place. Without a judge, SimpleVQA and LiveVQA fall back to exact match, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fvqa.answers import exact_match, sub_exact_match
from fvqa.eval.metrics import infoseek_score, mmsearch_f1, mmsearch_f1_alternatives

JUDGE_OFFICIAL = ("simplevqa", "livevqa")


@dataclass
class RuleScores:
    em: float
    subem: float
    official: float | None  # None: the official scorer is the judge
    official_name: str
    variants: dict[str, float] = field(default_factory=dict)  # name -> lenient variant of the official score


def rule_scores(kind: str, prediction: str | None, answer: str, aliases: list[str], answer_eval: Any = None,
                question_type: str | None = None) -> RuleScores:
    """Rule-based scores of one prediction (a missing prediction scores 0 everywhere)."""
    golds = aliases or [answer]
    if prediction is None:
        return RuleScores(0.0, 0.0, None if kind in JUDGE_OFFICIAL else 0.0, official_name(kind))
    em, subem = exact_match(prediction, golds), sub_exact_match(prediction, golds)
    variants: dict[str, float] = {}
    if kind == "infoseek":
        official: float | None = infoseek_score(prediction, answer_eval, question_type or "string")
    elif kind == "mmsearch":
        official = mmsearch_f1(prediction, answer)
        variants["mmsearch_f1_alternatives"] = mmsearch_f1_alternatives(
            prediction, answer, [a for a in golds if a != answer])
    elif kind in JUDGE_OFFICIAL:
        official = None
    else:
        official = em
    return RuleScores(em, subem, official, official_name(kind), variants)


def official_name(kind: str) -> str:
    return {"infoseek": "infoseek_score", "mmsearch": "mmsearch_f1", "simplevqa": "simplevqa_grade",
            "livevqa": "judge"}.get(kind, "exact_match")
