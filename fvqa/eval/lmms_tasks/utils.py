"""The functions the task pack's YAMLs name (``!function utils.<name>``), built on fvqa's own code.

A doc is one row of a data file written by `fvqa.eval.lmms_tasks.export` (the fields of
`fvqa.eval.lmms.lmms_doc` plus the image's bytes), i.e. an item exactly as `fvqa eval run` loads it
(same validation, same rejects left out). The prompt is fvqa's direct-answer prompt (the `fvqa`
protocol, tagged answers); the reply is read as fvqa's direct workflow reads it (one round, the
``<answer>`` span) and scored by `fvqa.eval.scoring.rule_scores`, so ``exact_match``,
``sub_exact_match`` and the official rule metric equal fvqa's for the same reply. There is no judge
here: ``accuracy`` is the official rule score, or exact match where the official scorer is the judge
(SimpleVQA, LiveVQA), as ``fvqa eval run`` with ``primary_metric: official`` and the judge off.
"""

from __future__ import annotations

import json
from typing import Any

from fvqa.eval.scoring import JUDGE_OFFICIAL, rule_scores
from fvqa.protocol import (
    IMAGE_PLACEHOLDER,
    Limits,
    default_prompts,
    next_action,
    opening_user_text,
    parse_turn,
)

DIRECT_LIMITS = Limits(max_rounds=1, max_image_search=0, max_text_search=0)
"""As `fvqa.agent`'s direct mode: one round, no tools."""


def doc_to_visual(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> list[Any]:
    """The item's image, decoded to RGB (as lmms-eval's image tasks hand it to models)."""
    from fvqa.protocol import to_pil

    image = doc["image"]
    if isinstance(image, dict):  # a datasets Image struct {bytes, path}
        image = image.get("bytes")
    if not isinstance(image, bytes | bytearray):  # already decoded by datasets
        return [image.convert("RGB")]
    return [to_pil(bytes(image))]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """fvqa's direct opening text without its ``<image>`` placeholder (lmms-eval models place the
    image themselves). ``pre_prompt``/``post_prompt`` in the kwargs wrap it, as lmms-eval's tasks do."""
    kwargs = lmms_eval_specific_kwargs or {}
    text = opening_user_text(default_prompts().direct_answer, doc["question"]).replace(IMAGE_PLACEHOLDER, "")
    return f"{kwargs.get('pre_prompt', '')}{text.strip()}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any], model_specific_target_kwargs: Any = None) -> str:
    """The ground truth (the other accepted answers are in ``aliases``, scored by `process_results`)."""
    return str(doc["answer"])


def read_prediction(reply: str) -> str | None:
    """The answer of a direct reply as fvqa's direct workflow reads it (None: no valid answer turn)."""
    if next_action([reply], DIRECT_LIMITS).stop_reason != "answer":
        return None
    return parse_turn(reply).answer


def metric_names(kind: str) -> list[str]:
    """What `process_results` returns for a benchmark kind (the YAML's ``metric_list``, in order)."""
    names = ["accuracy", "exact_match", "sub_exact_match"]
    official = rule_scores(kind, "x", "x", ["x"], ["x"], "string")
    if official.official is not None and official.official_name not in names:
        names.append(official.official_name)
    names.extend(official.variants)
    return names


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """Score the one reply with fvqa's rule scorers; keys are `metric_names(doc["kind"])`."""
    reply = results[0] if results else ""
    if isinstance(reply, list):  # several repeats: the first, as lmms-eval's take_first filter
        reply = reply[0] if reply else ""
    prediction = read_prediction(str(reply))
    answer_eval = doc.get("answer_eval")
    if isinstance(answer_eval, str):
        answer_eval = json.loads(answer_eval)
    kind = doc["kind"]
    rs = rule_scores(kind, prediction, doc["answer"], list(doc.get("aliases") or []), answer_eval,
                     doc.get("question_type"))
    official = rs.official if rs.official is not None else rs.em  # the judge's benchmarks: exact match
    out = {"accuracy": float(official), "exact_match": rs.em, "sub_exact_match": rs.subem}
    if kind not in JUDGE_OFFICIAL and rs.official is not None:
        out[rs.official_name] = float(rs.official)
    names = metric_names(kind)
    for name in names:
        if name not in out:
            out[name] = float(rs.variants.get(name, 0.0))
    return {name: out[name] for name in names}
