"""The LLM-task runner through the real client against the loopback OpenAI-wire server.

One task shape (format one input, parse one reply or reject it with a reason) and one runner for
every LLM stage: rejects keep their reason codes, a cached reply is never requested twice, and the
generate and tag stages price themselves with the same `estimate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from rich.console import Console
from support.fake_openai import FakeOpenAI, bad_request, last_user_text, server_error

from fvqa.config import GenerateConfig, RunConfig, TagConfig
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.llm.runner import TaskRun, estimate, run_task
from fvqa.llm.task import REQUEST_FAILED, UNPARSEABLE, LLMTask, Reject, Reply, Request
from fvqa.pipelines.base import Stage, StageContext, execute_stage
from fvqa.store import Workspace


class Shout(LLMTask[str, str]):
    """Free text: the reply must be the input in capitals."""

    name = "shout"
    completion_tokens = 5

    def format(self, item: str) -> Request:
        if not item:
            raise Reject("empty input", "nothing to shout")
        messages = [{"role": "user", "content": f"Repeat in capitals: {item}"}]
        return Request(messages, params={"max_tokens": 16})

    def parse(self, item: str, reply: Reply) -> str:
        if reply.text != item.upper():
            raise Reject("not capitals", f"wanted {item.upper()!r}\nraw reply: {reply.text}")
        return reply.text


class Number(BaseModel):
    value: int


class Count(LLMTask[str, int]):
    """Structured: the reply must be JSON `{"value": <int>}`."""

    name = "count"
    completion_tokens = 8

    def format(self, item: str) -> Request:
        return Request([{"role": "user", "content": f"How many letters in {item}?"}], Number)

    def parse(self, item: str, reply: Reply) -> int:
        return reply.value.value


def _shout_reply(body: dict[str, Any]) -> Any:
    word = last_user_text(body).rsplit(" ", 1)[-1]
    if word == "forbidden":
        return bad_request("this word is not allowed")
    return word.lower() if word == "whisper" else word.upper()


def _count_reply(body: dict[str, Any]) -> str:
    text = last_user_text(body)
    if "prose" in text or "That reply is invalid" in text:
        return "It has five letters, I think."  # not JSON, and the repair is not JSON either
    return f'{{"value": {len(text.rsplit(" ", 1)[-1].rstrip("?"))}}}'


def _llm(srv: FakeOpenAI, **kw: Any) -> LLMConfig:
    kw.setdefault("price", {})  # list prices set explicitly: a loopback endpoint without one is billed $0
    return LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model",
                     max_retries=0, backoff_base_s=0.0, **kw)


def _run(task: LLMTask[str, Any], inputs: dict[str, str], llm: LLMConfig,
         cache: Path) -> tuple[TaskRun, dict[str, Any]]:
    seen: dict[str, Any] = {}
    run = run_task(task, inputs, llm, cache,
                   on_output=lambda k, out, reply: seen.__setitem__(k, ("out", out, reply.cached)),
                   on_reject=lambda k, rej: seen.__setitem__(k, ("reject", rej.reason, rej.detail)),
                   on_retry=lambda k, why: seen.__setitem__(k, ("retry", why)))
    return run, seen


def test_every_input_ends_in_one_callback_with_a_reason(tmp_path: Path):
    inputs = {"a": "hello", "b": "whisper", "c": "forbidden", "d": ""}
    with FakeOpenAI(_shout_reply) as srv:
        run, seen = _run(Shout(), inputs, _llm(srv), tmp_path / "cache")
        assert srv.count("POST", "/v1/chat/completions") == 3  # the empty input was rejected unsent
        assert srv.chat_bodies()[0]["max_tokens"] == 16  # the task's params travel in the body
    assert seen["a"] == ("out", "HELLO", False)
    assert seen["b"][:2] == ("reject", "not capitals") and "raw reply: whisper" in seen["b"][2]
    assert seen["c"][:2] == ("reject", REQUEST_FAILED) and "this word is not allowed" in seen["c"][2]
    assert seen["d"] == ("reject", "empty input", "nothing to shout")
    assert run.n_out == 1 and run.rejected == {"not capitals": 1, REQUEST_FAILED: 1, "empty input": 1}
    assert run.paid_calls == 2 and run.cache_hits == 0 and run.usd > 0  # the 400 is not a paid call


def test_a_cached_reply_is_not_requested_twice(tmp_path: Path):
    inputs = {"a": "hello", "b": "world", "c": "forbidden", "d": "whisper"}
    with FakeOpenAI(_shout_reply) as srv:
        first, _ = _run(Shout(), inputs, _llm(srv), tmp_path / "cache")
        sent = srv.count("POST", "/v1/chat/completions")
        assert sent == 4 and first.paid_calls == 3
        again, seen = _run(Shout(), inputs, _llm(srv), tmp_path / "cache")  # a new client, the same cache
        assert srv.count("POST", "/v1/chat/completions") == sent  # nothing sent: replies and the 400 cached
    assert again.paid_calls == 0 and again.cache_hits == 4 and again.usd == 0
    assert seen["a"] == ("out", "HELLO", True) and seen["c"][1] == REQUEST_FAILED
    assert again.rejected == first.rejected  # the same outcome from the cache


def test_transient_failure_is_a_retry_not_a_reject(tmp_path: Path):
    with FakeOpenAI(_shout_reply) as srv:
        srv.inject(server_error(503))
        run, seen = _run(Shout(), {"a": "hello"}, _llm(srv), tmp_path / "cache")
        assert seen["a"][0] == "retry" and "HTTP 503" in seen["a"][1]
        assert run.transient == [seen["a"][1]] and not run.rejected and run.n_out == 0
        again, seen = _run(Shout(), {"a": "hello"}, _llm(srv), tmp_path / "cache")  # not cached: asked again
    assert seen["a"] == ("out", "HELLO", False) and again.paid_calls == 1


def test_structured_reply_that_fails_to_parse_is_an_unparseable_reject_row(tmp_path: Path, monkeypatch):
    """Through a stage: the reject lands in the `rejects` table under the task's name and reason code."""
    from fvqa import reasons

    monkeypatch.setitem(reasons.STAGE_CODES, "count", dict(reasons.LLM))  # a stage of this test only

    class CountStage(Stage):
        name = "count"
        outputs = ("items",)

        def run(self, ctx: StageContext) -> None:
            from fvqa.pipelines.llm_task import run_stage_task

            run_stage_task(ctx, Count(), {"k1": "Paris", "k2": "prose"}, llm,
                           lambda k, n, _: counted.__setitem__(k, n))

    counted: dict[str, Any] = {}
    with FakeOpenAI(_count_reply) as srv:
        llm = _llm(srv)
        with Workspace(tmp_path / "ws") as ws:
            stats = execute_stage(CountStage(), ws, RunConfig(workspace=tmp_path / "ws"), Console(quiet=True))
            rows = ws.execute("SELECT stage, key, reason, detail FROM rejects")
        assert srv.count("POST", "/v1/chat/completions") == 3  # two first requests, one repair
        assert "response_format" in srv.chat_bodies()[0]  # the reply model travels as a JSON schema
    assert counted["k1"] == 5
    assert stats.rejected == {UNPARSEABLE: 1} and stats.paid_calls == 3 and stats.cost_usd > 0
    ((stage, key, reason, detail),) = rows
    assert (stage, key, reason) == ("count", "k2", UNPARSEABLE)
    assert "after one repair" in detail and "raw reply: It has five letters" in detail


def test_the_task_must_bill_the_stage_it_rejects_for(tmp_path: Path):
    class Other(Stage):
        name = "other"

        def run(self, ctx: StageContext) -> None:
            from fvqa.pipelines.llm_task import run_stage_task

            run_stage_task(ctx, Count(), {"k": "x"}, LLMConfig(), lambda *_: None)

    with Workspace(tmp_path / "ws") as ws, pytest.raises(ValueError, match="stage 'other'"):
        execute_stage(Other(), ws, RunConfig(workspace=tmp_path / "ws"), Console(quiet=True))


def test_estimate_counts_cached_requests_and_needs_no_key(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FVQA_UNSET_KEY", raising=False)
    inputs = {"a": "hello", "b": "world"}
    with FakeOpenAI(_shout_reply) as srv:
        _run(Shout(), {"a": "hello"}, _llm(srv), tmp_path / "cache")
        keyed = _llm(srv).model_copy(update={"endpoints": [Endpoint(base_url=srv.base_url,
                                                                    api_key_env="FVQA_UNSET_KEY")]})
        est = estimate(Shout(), inputs, keyed, tmp_path / "cache")
    chars = len("Repeat in capitals: hello") + len("Repeat in capitals: world")
    assert (est.calls, est.cached, est.paid_calls) == (2, 1, 1)
    assert est.prompt_tokens == round(chars / 4 / 2) and est.completion_tokens == 5
    with pytest.raises(NotImplementedError):  # inputs that do not exist yet need a typical size
        estimate(Shout(), {}, keyed, tmp_path / "cache", expected=3)


def test_generate_and_tag_estimates_come_from_the_one_estimate(tmp_path: Path, monkeypatch):
    import fvqa.pipelines.llm_task as llm_task
    from fvqa.pipelines.generate import GenerateStage
    from fvqa.pipelines.tag import TagStage
    from fvqa.textgen.qa_task import QATask
    from fvqa.textgen.tag_task import TagTask

    calls: list[tuple[str, int, Any]] = []

    def spy(task: LLMTask[Any, Any], inputs: Any, llm: LLMConfig, cache_dir: Path, **kw: Any) -> Any:
        est = estimate(task, inputs, llm, cache_dir, **kw)
        calls.append((task.name, len(inputs), est))
        return est

    monkeypatch.setattr(llm_task, "estimate", spy)
    llm = LLMConfig(endpoints=[Endpoint(base_url="http://127.0.0.1:9/v1", api_key_env=None)], model="m")
    cfg = RunConfig(workspace=tmp_path / "ws", generate=GenerateConfig(backend="llm", llm=llm),
                    tag=TagConfig(backend="llm", llm=llm))
    with Workspace(cfg.workspace) as ws:
        ests = [stage.estimate(StageContext(ws, cfg, stage, console=Console(quiet=True)))
                for stage in (GenerateStage(), TagStage())]
    assert [c[0] for c in calls] == [QATask.name, TagTask.name]
    for est, (_, _, got) in zip(ests, calls, strict=True):  # nothing built yet: both price expected inputs
        assert est is not None and est.paid_calls == got.paid_calls > 0 and est.usd == got.usd
        assert est.tokens == got.prompt_tokens + got.completion_tokens
    assert calls[0][2].completion_tokens == 60 * calls[0][2].paid_calls  # QATask's typical reply
    assert calls[1][2].completion_tokens == 25 * calls[1][2].paid_calls  # TagTask's


def test_judge_and_summariser_are_tasks_of_the_same_shape(tmp_path: Path):
    from fvqa.eval.judge import Judge, JudgeRequest
    from fvqa.search.summarize import SUMMARY_PROMPT, PageQuestion, SummaryTask, llm_summarizer

    def reply(body: dict[str, Any]) -> Any:
        text = last_user_text(body)
        if "Model's answer: Paris" in text:
            return "<judge>Yes</judge> <reason>same city</reason>"
        if "Model's answer: Lyon" in text:
            return "Lyon is wrong."  # no verdict tag
        if "Model's answer: boom" in text:
            return bad_request("judge refused")
        return "  The tower is in Paris.  "  # the summariser

    with FakeOpenAI(reply) as srv:
        judge = Judge(_llm(srv), tmp_path / "cache")
        asks = [JudgeRequest("Where?", "Paris", (), p) for p in ("Paris", "Lyon", "boom")]
        ok, bad, failed = judge.judge_many(asks)
        summaries: dict[str, str] = {}
        page = PageQuestion("The tower is in Paris. It is tall.", "Where?")
        run_task(SummaryTask(), {"p": page}, _llm(srv), tmp_path / "cache",
                 on_output=lambda k, s, _: summaries.__setitem__(k, s))
    assert (ok.score, ok.reason, ok.error) == (1.0, "same city", None)
    assert bad.score == 0.0 and bad.error is not None and bad.error.startswith("no <judge>Yes/No</judge>")
    assert failed.error is not None and failed.error.startswith("judge request failed: HTTP 400")
    assert judge.client.ledger.stage("eval-judge").calls == 2  # billed to the judge's row
    assert summaries == {"p": "The tower is in Paris."}

    prompts: list[str] = []
    summarize = llm_summarizer(lambda p: prompts.append(p) or "", max_sentences=3)
    with pytest.raises(ValueError, match="empty reply"):  # a Reject is a ValueError: the next page is used
        summarize("Page text.", "Why?")
    assert prompts == [SUMMARY_PROMPT.format(question="Why?", page="Page text.", max_sentences=3)]
