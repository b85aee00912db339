"""Agreement measures against hand-computed values and Krippendorff's published example."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fvqa.annotation.agreement import cohen_kappa, field_agreement, krippendorff_alpha_nominal
from fvqa.annotation.parse import AnnotationProblem, parse_manual, parse_review


def test_cohen_kappa_hand_computed() -> None:
    a = ["keep", "keep", "fix", "reject", "keep", "keep"]
    b = ["keep", "keep", "fix", "reject", "fix", "keep"]
    # p_o = 5/6; p_e = (4*3 + 1*2 + 1*1) / 36 = 15/36; kappa = (30-15)/(36-15) = 15/21
    assert cohen_kappa(a, b) == pytest.approx(15 / 21)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa(["x", "x"], ["x", "x"]))  # no variation: undefined, not 1 or 0
    # systematic disagreement goes below zero
    assert cohen_kappa(["a", "b", "a", "b"], ["b", "a", "b", "a"]) == pytest.approx(-1.0)


def test_krippendorff_alpha_published_example() -> None:
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12 units,
    # nominal alpha = 0.743 (missing values left out of each unit)
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    units = [[c[u] for c in coders if c[u] is not None] for u in range(12)]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)


def test_krippendorff_alpha_small_hand_computed() -> None:
    # units (a,a) (a,b) (b,b): o_aa=2, o_ab=o_ba=1, o_bb=2; n_a=n_b=3, n=6
    # alpha = 1 - (n-1) * (o_ab+o_ba) / (n_a n_b + n_b n_a) = 1 - 5*2/18 = 4/9
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"]]) == pytest.approx(4 / 9)


def test_field_agreement_picks_measure_by_annotator_count() -> None:
    two = {"i1": {"x": "keep", "y": "keep"}, "i2": {"x": "fix", "y": "keep"}, "i3": {"x": "fix"}}
    method, value, n = field_agreement(two)
    assert (method, n) == ("cohen_kappa", 2)
    three = {"i1": {"x": "a", "y": "a", "z": "b"}, "i2": {"x": "b", "y": "b"}}
    method, value, n = field_agreement(three)
    assert method == "krippendorff_alpha" and n == 2
    assert value == pytest.approx(krippendorff_alpha_nominal([["a", "a", "b"], ["b", "b"]]))


def _choice(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": [value]}}


def _text(name: str, value: str) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "textarea", "value": {"text": [value]}}


@pytest.mark.parametrize(
    ("result", "message"),
    [
        ([], "annotation has no verdict"),
        ([_choice("verdict", "maybe")], 'unknown_value: verdict: ["maybe"]'),
        ([_choice("verdict", "fix")], "fix_without_answer"),
        ([_choice("verdict", "keep"), _choice("knowledge_type", "Cooking")], "unknown_value: knowledge_type: "),
        ([_choice("verdict", "keep"), _choice("search", "yes")], "unknown_value: search: "),
    ],
)
def test_parse_review_rejects_with_reason(result: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(AnnotationProblem, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_review(result, "proposed")


def test_parse_review_and_manual_fields() -> None:
    got = parse_review([_choice("verdict", "fix"), _text("answer", " Paris "), _choice("knowledge_type", "Place"),
                        _choice("search", "text_search_required")], "Lyon")
    assert got["answer"] == "Paris" and got["knowledge_type"] == "Place"
    assert got["search_label"] == "text_search_required" and got["proposed_answer"] == "Lyon"
    keep = parse_review([_choice("verdict", "keep"), _text("answer", "ignored")], "Lyon")
    assert keep["answer"] is None
    manual = parse_manual([_text("question", "Who?"), _text("answer", "Ada"), _text("aliases", "A. L.\n\nAda L."),
                           _choice("knowledge_type", "People")])
    assert manual["aliases"] == ["A. L.", "Ada L."]
    with pytest.raises(AnnotationProblem, match="no answer"):
        parse_manual([_text("question", "Who?"), _choice("knowledge_type", "People")])
