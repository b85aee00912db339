"""The LLM judge: our own prompt implementing the paper's ten judging rules (App. D.6), pinned.

Published numbers move by 10-15 points with the scoring protocol, so the judge is part of the
result: its model, prompt hash, temperature (0) and top_p (0.1) are recorded with every score, and
each verdict is cached by the LLM layer (the request is the cache key), so re-scoring the same
predictions costs nothing and gives the same verdicts. The prompt texts are ours and can be
replaced from a YAML file (`judge`, `simplevqa_grader`) to run the paper's exact wording.

Two styles. ``fvqa``: the request is text only and grades the extracted answer. ``paper``: as the
paper's GPT-4o judge (App. F.3), the request carries the question's image and grades the model's
whole final response. The paper's own prompt text is not shipped here: give it with `prompt_path`
(the report names the prompt's hash and source either way).

Replies: ``<judge>Yes</judge> <reason>...</reason>`` for the binary judge (style paper also reads a
reply that only starts with Yes or No, for a prompt that asks for a bare verdict);
``<grade>correct|incorrect|not_attempted</grade> <reason>...</reason>`` for SimpleVQA's grader.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fvqa.errors import ConfigError
from fvqa.eval.metrics import Grade, parse_grade
from fvqa.llm.client import LLMClient
from fvqa.llm.config import LLMConfig
from fvqa.llm.images import image_part
from fvqa.llm.runner import arun_task
from fvqa.llm.task import REQUEST_FAILED, UNPARSEABLE, LLMTask, Reject, Reply, Request

JUDGE_PROMPT = """\
You are grading an answer to a question about an image. Decide whether the model's answer is \
correct with respect to the ground truth, following these rules:

1. The answer is correct if it means the same as the ground truth or as any one of the candidate \
answers; wording, word order and letter case do not matter.
2. A more specific form of the ground truth is correct (ground truth "bird", answer "blue jay"; \
ground truth "1990s", answer "1994" only if the question asks for the decade's member).
3. Extra details are fine as long as the core answer is there and nothing added contradicts it.
4. Units may differ if the quantities are equal (1.5 km and 1500 m), and numbers may be written \
as digits or words.
5. For people, the first name and the last name must both match; a title or middle name may be \
added or left out.
6. For yes/no questions the answer must give the same yes or no as the ground truth.
7. Dates and numbers must match at the precision the ground truth gives (a different year is wrong).
8. An answer that lists several alternatives or hedges between them is wrong unless every option \
is correct.
9. A refusal, "I don't know", or an answer that is empty or only restates the question is wrong.
10. Judge only the final answer against the ground truth; do not use your own knowledge to \
overrule the ground truth.

Question: {question}
Ground truth: {ground_truth}
Candidate answers: {candidates}
Model's answer: {prediction}

Reply in exactly this form: <judge>Yes</judge> or <judge>No</judge>, followed by \
<reason>one short sentence</reason>."""

SIMPLEVQA_PROMPT = """\
You are grading an answer to a factual question about an image, in SimpleQA's three grades:

- correct: the answer contains the ground truth's meaning fully and contradicts nothing in it \
(extra consistent detail, different wording or letter case are fine; for names the first and \
last name must match; numbers must match at the precision of the ground truth);
- incorrect: the answer states something that contradicts the ground truth, or hedges between \
alternatives of which one is wrong;
- not_attempted: the answer does not commit to a specific answer (a refusal, "I don't know", \
missing information) and contradicts nothing.

Question: {question}
Ground truth: {ground_truth}
Model's answer: {prediction}

Reply in exactly this form: <grade>correct</grade>, <grade>incorrect</grade> or \
<grade>not_attempted</grade>, followed by <reason>one short sentence</reason>."""

_JUDGE = re.compile(r"<judge>\s*(yes|no)\s*</judge>", re.IGNORECASE)
_BARE = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_GRADE = re.compile(r"<grade>\s*([a-z _-]+?)\s*</grade>", re.IGNORECASE)
_REASON = re.compile(r"<reason>(.*?)</reason>", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class JudgeRequest:
    question: str
    ground_truth: str
    candidates: tuple[str, ...]
    prediction: str  # the extracted answer (style fvqa) or the whole final response (style paper)
    three_way: bool = False  # SimpleVQA's grader instead of Yes/No
    image: bytes | None = field(default=None, repr=False)  # style paper: the judge sees the image


@dataclass(frozen=True)
class Verdict:
    """A judge's decision: score 1/0, a SimpleVQA grade if asked, the reason, or why it failed."""

    score: float
    grade: str | None
    reason: str
    error: str | None = None
    cached: bool = False


def parse_judge_reply(text: str, *, bare: bool = False) -> tuple[float, str]:
    """(1.0 | 0.0, reason) from ``<judge>Yes/No</judge> <reason>..</reason>``; ValueError if absent.
    With `bare` (the paper style, whose prompt may ask for a bare verdict) a reply starting with
    Yes or No counts too."""
    m = _JUDGE.search(text or "") or (_BARE.search(text or "") if bare else None)
    if m is None:
        raise ValueError(f"no <judge>Yes/No</judge> in the judge's reply: {(text or '')[:200]!r}")
    reason = _REASON.search(text)
    return float(m.group(1).lower() == "yes"), reason.group(1).strip() if reason else ""


def parse_grade_reply(text: str) -> tuple[Grade, str]:
    """(grade, reason) from ``<grade>..</grade> <reason>..</reason>``; ValueError if absent/unknown."""
    m = _GRADE.search(text or "")
    if m is None:
        raise ValueError(f"no <grade>...</grade> in the grader's reply: {(text or '')[:200]!r}")
    reason = _REASON.search(text)
    return parse_grade(m.group(1)), reason.group(1).strip() if reason else ""


def load_judge_prompts(path: Path | None) -> dict[str, str]:
    """The two prompt texts, overridden from a YAML file with `judge` and/or `simplevqa_grader`."""
    prompts = {"judge": JUDGE_PROMPT, "simplevqa_grader": SIMPLEVQA_PROMPT}
    if path is None:
        return prompts
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read judge prompts {path}: {exc}") from exc
    if not isinstance(data, dict) or not set(data) <= set(prompts):
        raise ConfigError(f"{path}: expected a mapping with keys judge and/or simplevqa_grader")
    for name, text in data.items():
        needed = ["{question}", "{ground_truth}", "{prediction}"]
        if not isinstance(text, str) or any(n not in text for n in needed):
            raise ConfigError(f"{path}: prompt {name!r} must be a string containing {', '.join(needed)}")
        prompts[name] = text
    return prompts


class JudgeTask(LLMTask[JudgeRequest, Verdict]):
    """A prediction and its gold answers -> a verdict (Yes/No, or SimpleVQA's three grades)."""

    name = "eval-judge"

    def __init__(self, prompts: Mapping[str, str], params: Mapping[str, Any], *, bare: bool = False) -> None:
        self.prompts = dict(prompts)
        self.params = dict(params)
        self.bare = bare

    def format(self, item: JudgeRequest) -> Request:
        template = self.prompts["simplevqa_grader" if item.three_way else "judge"]
        text = template.format(
            question=item.question, ground_truth=item.ground_truth, prediction=item.prediction,
            candidates="; ".join(item.candidates) if item.candidates else "(none)")
        if item.image is None:
            return Request([{"role": "user", "content": text}], params=self.params)
        content = [{"type": "text", "text": text}, image_part(item.image)]
        return Request([{"role": "user", "content": content}], params=self.params)

    def parse(self, item: JudgeRequest, reply: Reply) -> Verdict:
        try:
            if item.three_way:
                grade, reason = parse_grade_reply(reply.text)
                return Verdict(float(grade is Grade.CORRECT), grade.value, reason, cached=reply.cached)
            score, reason = parse_judge_reply(reply.text, bare=self.bare)
            return Verdict(score, None, reason, cached=reply.cached)
        except ValueError as exc:
            raise Reject(UNPARSEABLE, f"{exc}\nraw reply: {reply.text}", why=str(exc)) from exc

    @staticmethod
    def failed(item: JudgeRequest, error: str) -> Verdict:
        """The verdict of a request that got no usable verdict, with the error kept (the runner scores an
        unusable reply 0 and leaves a failed request unscored, to be asked again)."""
        return Verdict(0.0, Grade.NOT_ATTEMPTED.value if item.three_way else None, "", error=error)


class Judge:
    """Pinned LLM judge over the cached LLM client; `judge_many` is synchronous for the runner."""

    def __init__(self, cfg: LLMConfig, cache_dir: Path, *, temperature: float = 0.0, top_p: float = 0.1,
                 max_tokens: int = 256, prompt_path: Path | None = None, style: str = "fvqa") -> None:
        self.cfg, self.style = cfg, style
        self.client = LLMClient(cfg, cache_dir, stage=JudgeTask.name)
        self.params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        self.prompts = load_judge_prompts(prompt_path)
        self.task = JudgeTask(self.prompts, self.params, bare=style == "paper")
        digest = hashlib.sha256("\x00".join(self.prompts[k] for k in sorted(self.prompts)).encode())
        self.prompt_hash = digest.hexdigest()[:12]
        self.prompt_source = str(prompt_path) if prompt_path is not None else "fvqa wording"
        self.id = f"{cfg.model}@t{temperature:g}-p{top_p:g}-{self.prompt_hash}" + ("-paper" if style == "paper" else "")

    async def ajudge_many(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        # A verdict depends only on (question, gold, candidates, prediction, grader), not on the model or
        # workflow that produced the prediction: identical requests (direct and on-demand giving the same
        # answer, two models agreeing) are sent once, concurrently, and share the verdict.
        unique = list(dict.fromkeys(requests))
        inputs = {str(i): r for i, r in enumerate(unique)}
        index = {r: str(i) for i, r in enumerate(unique)}
        verdicts: dict[str, Verdict] = {}

        def on_reject(key: str, rej: Reject) -> None:
            # "judge request failed" marks verdicts the next scoring asks again (see eval.runner)
            error = f"judge {rej.why}" if rej.reason == REQUEST_FAILED else rej.why
            verdicts[key] = self.task.failed(inputs[key], error)

        def on_retry(key: str, why: str) -> None:  # transient, or still in a batch: asked again next time
            error = f"judge request failed: {why.removeprefix('request failed: ')}"
            verdicts[key] = self.task.failed(inputs[key], error)

        def on_output(key: str, verdict: Verdict, _: Reply) -> None:
            verdicts[key] = verdict

        async with self.client:
            await arun_task(self.task, inputs, self.client, on_output=on_output, on_reject=on_reject,
                            on_retry=on_retry)
        return [verdicts[index[r]] for r in requests]

    def judge_many(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """Verdicts in request order, one request per distinct input; failures are verdicts with `error` set
        (a request failure starts with "judge request failed": the runner leaves it unscored), never raised."""
        if not requests:
            return []
        return asyncio.run(self.ajudge_many(requests))
