"""MMSearch-R1's outcome reward (paper eq. 1) as a veRL custom reward function.

``reward = (1 - alpha) * acc * penalty + alpha * format``: ``acc`` is exact match (or SubEM) of the
last turn's ``<answer>`` against the ground truth and candidate answers after SQuAD normalisation;
``penalty`` is ``1 - search_penalty`` when a correct answer used any search (or once per search with
``per_search``); ``format`` is 1 when every turn obeys the tag rules and the trajectory's shape is
allowed (``fvqa.protocol.trajectory_format``). With ``format_rule="upstream"`` and mode EM the
values equal upstream's ``mmsearch_r1_score.compute_score`` (1.0, 0.91, 0.9, 0.81, 0.1, 0.0, ...).

Use in veRL: ``custom_reward_function.path=<this file> custom_reward_function.name=compute_score``;
options go in ``custom_reward_function.reward_kwargs`` (alpha, search_penalty, mode, format_rule,
per_search).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from fvqa.answers import exact_match, sub_exact_match
from fvqa.protocol import (
    FormatRule,
    Limits,
    count_searches,
    extract_answer,
    trajectory_format,
)

Judge = Callable[[str, Sequence[str]], float]
RESULT_KEYS = ("score", "acc", "format", "n_image_search", "n_text_search")

# How a whole multi-turn response is cut into assistant turns when the rollout did not hand over
# the turns themselves. A user (tool) turn starts with "Searched results: <information>" or with a
# bare search-error line, and ends where the next assistant turn starts.
_USER_TURN_WITH_MARKERS = re.compile(
    r"<\|im_end\|>\s*<\|im_start\|>user\n.*?<\|im_end\|>\s*<\|im_start\|>assistant\n", re.DOTALL
)
_USER_TURN_DECODED = re.compile(
    r"\s*\buser\n(?:Searched results: <information>.*?</information>\n|\[(?:Image|Text) Search Results\] "
    r"There is an error encountered).*?\nassistant\n",
    re.DOTALL,
)


def split_turns(solution_str: str) -> list[str]:
    """Cut a decoded multi-turn response into assistant turns.

    veRL decodes the response tokens (assistant turns and the tool turns between them) into one
    string. With chat markers kept (``skip_special_tokens=False``) the user turns are cut out at
    ``<|im_end|><|im_start|>user ... <|im_start|>assistant``; with markers stripped (veRL's default)
    at ``user\\nSearched results: <information>...</information>\\n ... \\nassistant\\n`` (or a bare
    search-error turn). This is a fallback: our agent loop passes the exact turns in
    ``extra_info["assistant_turns"]``, which ``compute_score`` prefers.
    """
    if "<|im_start|>" in solution_str:
        parts = _USER_TURN_WITH_MARKERS.split(solution_str)
        return [p.replace("<|im_end|>", "").replace("<|endoftext|>", "") for p in parts]
    return _USER_TURN_DECODED.split(solution_str)


def _golds(ground_truth: Any, candidates: Any = None) -> list[str]:
    """Ground truth plus candidate answers, as upstream merges them (JSON string or list)."""
    if isinstance(candidates, str):
        try:
            candidates = json.loads(candidates)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"candidate_answers is a string but not a JSON list: {candidates[:80]!r}"
            ) from exc
    out: list[str] = []
    for name, value in (("ground_truth", ground_truth), ("candidate_answers", candidates)):
        if value is None:
            continue
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, Iterable):
            out.extend(v for v in value if isinstance(v, str))
        else:
            raise TypeError(f"{name} must be a str or a list of str, got {type(value).__name__}")
    return out


def answer_correct(
    answer: str | None, golds: Sequence[str], mode: str = "EM", judge: Judge | None = None
) -> float:
    """1.0 if the answer is right under ``mode``: EM, SubEM, or an LLM ``judge`` callable.

    SubEM is upstream's one-way check (a normalised gold answer occurs in the normalised answer,
    ``fvqa.answers.sub_exact_match``): the reverse direction would pay a one-letter answer that
    occurs in the gold, which a policy learns to exploit. Empty golds never match (upstream's
    ``"" in pred`` would accept every answer).
    """
    if answer is None:
        return 0.0
    if mode == "EM":
        return exact_match(answer, golds)
    if mode == "SubEM":
        return sub_exact_match(answer, golds)
    if mode == "judge":
        if judge is None:
            raise ValueError("mode='judge' needs a judge callable (answer, golds) -> 0.0..1.0")
        return float(judge(answer, golds))
    raise ValueError(f"unknown reward mode {mode!r}; use 'EM', 'SubEM' or 'judge'")


def score_turns(
    assistant_turns: Sequence[str],
    ground_truths: Sequence[str],
    *,
    alpha: float = 0.1,
    search_penalty: float = 0.1,
    mode: str = "EM",
    format_rule: FormatRule = "limits",
    per_search: bool = False,
    limits: Limits | None = None,
    judge: Judge | None = None,
) -> dict[str, float | int]:
    """Reward of one trajectory given as its assistant turns (tool turns left out).

    Returns ``score``, ``acc`` (correctness before the search penalty), ``format`` (0/1) and the
    search counts. Differences from upstream, which asserts on an empty list and raises ValueError
    on more than 3 turns: no turn scores 0 everywhere; more turns than the rule set allows are
    scored normally with ``format = 0`` (under ``upstream`` the search count then looks at every
    turn but the last), so one odd rollout cannot crash a training step.
    """
    if isinstance(assistant_turns, str):
        raise TypeError("assistant_turns must be a list of turn strings, not one string")
    if not assistant_turns:
        return {"score": 0.0, "acc": 0.0, "format": 0.0, "n_image_search": 0, "n_text_search": 0}
    acc = answer_correct(extract_answer(assistant_turns[-1]), list(ground_truths), mode, judge)
    fmt = 1.0 if trajectory_format(assistant_turns, format_rule, limits).ok else 0.0
    n_img, n_txt = count_searches(assistant_turns, format_rule)
    score = acc
    n_search = n_img + n_txt
    # Same operations in the same order as upstream, so the floats match bit for bit.
    if n_search > 0 and score > 0.99:
        for _ in range(n_search if per_search else 1):
            score *= 1 - search_penalty
    score = (1 - alpha) * score + alpha * fmt
    return {"score": score, "acc": acc, "format": fmt, "n_image_search": n_img, "n_text_search": n_txt}


def as_limits(value: Limits | Mapping[str, Any] | None) -> Limits | None:
    """``reward_kwargs.limits`` as veRL hands it over (a config mapping), validated as ``Limits``.

    The training config fills it from ``fvqa.limits``, so the format reward allows exactly the
    trajectories the rollout allows; a typo'd key is an error, not the paper's default.
    """
    if value is None or isinstance(value, Limits):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"reward_kwargs.limits must be a mapping like fvqa.limits, got {type(value).__name__}")
    return Limits.model_validate({str(k): v for k, v in value.items()})


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kw: Any,
) -> dict[str, float | int]:
    """veRL custom reward: score one rollout; always returns the keys in ``RESULT_KEYS``.

    Turns: ``extra_info["assistant_turns"]`` (a list set by our agent loop) if present, else
    ``split_turns(solution_str)``. Gold answers: ``ground_truth`` (str or list) plus
    ``extra_info["candidate_answers"]`` (list or JSON string; veRL passes only
    ``reward_model.ground_truth``, so ``train prepare`` copies the candidates into extra_info).
    Options: ``kw`` (from ``reward_kwargs``) sets run defaults; ``limits`` (a
    mapping, filled from ``fvqa.limits``) is the rollout's limits; per-sample ``extra_info`` keys
    override them, including upstream's names (``search_penalty``, ``format_penalty`` = alpha,
    ``reward_mode`` = mode, ``use_search_count_penalty`` = per_search). ``data_source`` is not used.
    """
    del data_source
    info = dict(extra_info or {})
    opts: dict[str, Any] = {
        "alpha": kw.get("alpha", 0.1),
        "search_penalty": kw.get("search_penalty", 0.1),
        "mode": kw.get("mode", "EM"),
        "format_rule": kw.get("format_rule", "limits"),
        "per_search": bool(kw.get("per_search", False)),
    }
    for ours, theirs in (
        ("alpha", "format_penalty"),
        ("search_penalty", "search_penalty"),
        ("mode", "reward_mode"),
        ("per_search", "use_search_count_penalty"),
        ("format_rule", "format_rule"),
    ):
        if info.get(theirs) is not None:
            opts[ours] = info[theirs]
    turns = info.get("assistant_turns")
    if turns is None:
        if not isinstance(solution_str, str):
            raise TypeError(f"solution_str must be a str, got {type(solution_str).__name__}")
        turns = split_turns(solution_str)
    golds = _golds(ground_truth, info.get("candidate_answers"))
    return score_turns(
        [str(t) for t in turns],
        golds,
        limits=as_limits(kw.get("limits")),
        judge=kw.get("judge"),
        **opts,
    )
