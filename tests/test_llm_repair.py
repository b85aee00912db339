"""An invalid structured reply: mended locally by json_repair first (free), re-asked only if that fails.

Against the loopback OpenAI-wire server, so every paid request is counted: a local mend sends
nothing more, a re-ask exactly one request, and a reply cut off at max_tokens is never mended
(closing its brackets would pass a truncated answer as complete).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from support.fake_openai import FakeOpenAI, Reply, completion, last_user_text

from fvqa import reasons
from fvqa.config import RunConfig
from fvqa.llm.client import LLMClient
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.llm.structured import StructuredResult
from fvqa.llm.task import LLMTask, Request
from fvqa.llm.task import Reply as TaskReply
from fvqa.pipelines.base import Stage, StageContext, execute_stage
from fvqa.store import Workspace


class QA(BaseModel):
    question: str
    answer: str


def _llm(srv: FakeOpenAI) -> LLMConfig:
    return LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model",
                     max_retries=0, backoff_base_s=0.0, price={})


def _ask(srv: FakeOpenAI, cache: Path) -> StructuredResult[QA]:
    async def go() -> StructuredResult[QA]:
        async with LLMClient(_llm(srv), cache) as llm:
            return await llm.complete_json([{"role": "user", "content": "make a QA pair"}], QA)

    return asyncio.run(go())


def test_broken_json_is_mended_locally_without_a_request(tmp_path: Path) -> None:
    sloppy = "Here it is:\n{'question': 'Who built it?', 'answer': 'Eiffel',}"  # quotes, comma, prose
    with FakeOpenAI(lambda body: sloppy) as srv:
        res = _ask(srv, tmp_path)
        assert res.ok and res.repaired == "local" and res.value == QA(question="Who built it?", answer="Eiffel")
        assert srv.count("POST") == 1 and res.raw == sloppy  # no re-ask; raw keeps what the model said
        again = _ask(srv, tmp_path)  # cached reply, same deterministic mend
        assert again.repaired == "local" and srv.count("POST") == 1


def test_a_reply_json_repair_cannot_fix_is_reasked_once(tmp_path: Path) -> None:
    def reply(body: dict[str, Any]) -> str:
        if "That reply is invalid" in last_user_text(body):
            return '{"question": "Who built it?", "answer": "Eiffel"'  # the re-ask's reply, mended locally
        return '{"question": "Who built it?"}'  # valid JSON, missing a field: nothing to mend

    with FakeOpenAI(reply) as srv:
        res = _ask(srv, tmp_path)
        assert res.ok and res.repaired == "reask" and res.value.answer == "Eiffel"
        assert srv.count("POST") == 2
        assert "field 'answer': Field required" in srv.chat_bodies()[1]["messages"][-1]["content"]


def test_a_reply_cut_off_at_max_tokens_is_reasked_not_mended(tmp_path: Path) -> None:
    cut = '{"question": "Who built it?", "answer": "Eif'

    def reply(body: dict[str, Any]) -> Reply | str:
        if "That reply is invalid" in last_user_text(body):
            return '{"question": "Who built it?", "answer": "Eiffel"}'
        return Reply(body=completion(cut, finish_reason="length"))

    with FakeOpenAI(reply) as srv:
        res = _ask(srv, tmp_path)
        assert res.ok and res.repaired == "reask" and res.value.answer == "Eiffel"  # not "Eif"
        assert srv.count("POST") == 2


class Maybe(BaseModel):
    note: str = ""  # every field defaulted: `{}` would validate


def test_a_mend_to_an_empty_object_is_not_an_answer() -> None:
    from fvqa.llm.structured import repair_locally

    assert repair_locally("I have no idea {}", Maybe) is None  # mends to {} or []: re-ask instead
    assert repair_locally("Sure, no JSON here.", Maybe) is None
    assert repair_locally("{'note': 'ok',}", Maybe) == Maybe(note="ok")
    assert repair_locally('{"note": "cut', Maybe, "length") is None


class PairTask(LLMTask[str, QA]):
    name = "pairs"
    completion_tokens = 20

    def format(self, item: str) -> Request:
        return Request([{"role": "user", "content": f"make a QA pair about {item}"}], QA)

    def parse(self, item: str, reply: TaskReply) -> QA:
        return reply.value


def _pair_reply(body: dict[str, Any]) -> str:
    text = last_user_text(body)
    if "That reply is invalid" in text:
        return '{"question": "Q?", "answer": "fixed"}'
    if text.endswith("sloppy"):
        return '{"question": "Q?", "answer": "mended",}'
    if text.endswith("prose"):
        return "Sure! The answer is a tower."
    return '{"question": "Q?", "answer": "fine"}'


def test_stage_counts_local_and_reask_repairs_apart(tmp_path: Path, monkeypatch) -> None:
    """Each output's `repaired` reaches on_output (provenance); the stage stats count both kinds."""
    monkeypatch.setitem(reasons.STAGE_CODES, "pairs", dict(reasons.LLM))  # a stage of this test only
    seen: dict[str, Any] = {}

    class PairStage(Stage):
        name = "pairs"
        outputs = ("items",)

        def run(self, ctx: StageContext) -> None:
            from fvqa.pipelines.llm_task import run_stage_task

            run_stage_task(ctx, PairTask(), {"a": "fine", "b": "sloppy", "c": "prose"}, llm,
                           lambda k, out, reply: seen.__setitem__(k, (out.answer, reply.repaired)))

    with FakeOpenAI(_pair_reply) as srv:
        llm = _llm(srv)
        with Workspace(tmp_path / "ws") as ws:
            stats = execute_stage(PairStage(), ws, RunConfig(workspace=tmp_path / "ws"), Console(quiet=True))
        assert srv.count("POST", "/v1/chat/completions") == 4  # three first requests, one re-ask
    assert seen == {"a": ("fine", False), "b": ("mended", "local"), "c": ("fixed", "reask")}
    assert stats.paid_calls == 4 and stats.extra["repaired"] == {"local": 1, "reask": 1}
    assert stats.as_dict()["repaired"] == {"local": 1, "reask": 1}  # stored with the run
