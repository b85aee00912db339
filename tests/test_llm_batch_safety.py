"""The Batch API never pays twice and keeps its books (issue 20, items 4 and 10).

Against the loopback OpenAI-wire server: a batch create that fails ambiguously (the server created
the batch, then answered 500 or too late) leaves exactly one batch; duplicates are cancelled, and one
that could not be cancelled is booked; file transfers have their own timeout; lines a batch did not
answer wait for the next batch unless online fallback is asked for.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.fake_openai import FakeOpenAI, Reply, ambiguous, error_body, last_user_text, slow

from fvqa.llm import LLMClient
from fvqa.llm.batch import BatchError, BatchRunner
from fvqa.llm.cache import read_spend
from fvqa.llm.config import Endpoint, LLMConfig, Price
from fvqa.llm.ledger import CostLedger
from fvqa.llm.runner import run_task
from fvqa.llm.task import LLMTask, Request
from fvqa.llm.task import Reply as TaskReply

PRICE = Price(input_per_1m=2.5, output_per_1m=10.0, batch_factor=0.5)


def cfg_for(url: str, **kw: Any) -> LLMConfig:
    base = {"model": "fake-model", "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0,
            "max_retries": 3, "batch_poll_s": 0.02, "price": PRICE}
    return LLMConfig(endpoints=[Endpoint(base_url=url, api_key_env=None)], **{**base, **kw})


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


REQUESTS = {name: user(name) for name in ("alpha", "beta", "gamma")}


def batch_run(cfg: LLMConfig, cache: Path, ledger: CostLedger, requests: dict[str, Any] = REQUESTS) -> Any:
    async def go() -> Any:
        async with LLMClient(cfg, cache, ledger=ledger, stage="tag") as llm:
            try:
                return await BatchRunner(llm).run(requests)
            finally:
                llm.cache.close()

    return asyncio.run(go())


def billed(srv: FakeOpenAI) -> tuple[int, float]:
    """(lines, batch-price usd) the server completed in batches that were not cancelled."""
    lines, usd = 0, 0.0
    for batch in srv.batches.values():
        if batch["status"] != "completed" or not batch.get("output_file_id"):
            continue
        for line in srv.files[batch["output_file_id"]][1].decode().splitlines():
            body = json.loads(line)["response"]["body"]
            lines += 1
            usd += PRICE.usd(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"], batch=True)
    return lines, usd


@pytest.mark.parametrize("fault", [ambiguous(500), slow(1.5)], ids=["created-then-500", "slower-than-timeout"])
def test_ambiguous_batch_create_makes_one_batch(tmp_path: Path, fault: Reply) -> None:
    with FakeOpenAI(lambda body: "ok " + last_user_text(body)) as srv:
        srv.inject_route("POST", "/v1/batches", fault)
        ledger = CostLedger()
        out = batch_run(cfg_for(srv.base_url, timeout_s=0.5), tmp_path, ledger)
        assert len(srv.batches) == 1  # the server holds one batch: adopted after the failure, not re-created
        assert srv.count("POST", "/v1/batches") == 1
        assert out.batch_ids == list(srv.batches)
        assert all(r.ok and r.text == f"ok {rid}" for rid, r in out.results.items()) and not out.pending
        lines, usd = billed(srv)
        cost = ledger.stage("tag")
        assert lines == cost.calls == 3 and cost.usd == pytest.approx(usd)
        [row] = read_spend(tmp_path)  # merged once, booked once
        assert (row.calls, row.batch) == (3, True) and row.usd == pytest.approx(usd)
        # a re-run is answered from the cache: nothing is created or booked again
        again = CostLedger()
        batch_run(cfg_for(srv.base_url), tmp_path, again)
        assert len(srv.batches) == 1 and again.stage("tag").cache_hits == 3 and again.stage("tag").calls == 0
        assert read_spend(tmp_path)[0].calls == 3


def test_create_that_keeps_failing_after_creating_still_makes_one_batch(tmp_path: Path) -> None:
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.inject_route("POST", "/v1/batches", ambiguous(502), ambiguous(500), ambiguous(503))
        out = batch_run(cfg_for(srv.base_url), tmp_path, CostLedger())
        assert len(srv.batches) == 1 and srv.count("POST", "/v1/batches") == 1
        assert all(r.ok for r in out.results.values())


def test_create_refused_is_retried_and_a_dead_api_names_the_rerun(tmp_path: Path) -> None:
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.inject_route("POST", "/v1/batches", Reply(429, error_body("slow down"), {"Retry-After": "0"}))
        out = batch_run(cfg_for(srv.base_url), tmp_path / "a", CostLedger())
        assert len(srv.batches) == 1 and srv.count("POST", "/v1/batches") == 2  # a 429 created nothing
        assert all(r.ok for r in out.results.values())
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.inject_route("POST", "/v1/batches", *[Reply(500, error_body("down"))] * 10)  # not applied
        with pytest.raises(BatchError, match="looks for it again"):
            batch_run(cfg_for(srv.base_url, max_retries=2), tmp_path / "b", CostLedger())
        assert not srv.batches
        srv.clear_faults()
        srv._route_faults.clear()
        out = batch_run(cfg_for(srv.base_url), tmp_path / "b", CostLedger())
        assert len(srv.batches) == 1 and all(r.ok for r in out.results.values())


def test_duplicate_batches_of_one_job_are_cancelled_or_booked(tmp_path: Path) -> None:
    """Three batches exist for one job (left by an older fvqa's blind retries): the oldest is kept,
    a running duplicate is cancelled (nothing billed), a finished one is booked as real spend."""
    with FakeOpenAI(lambda body: "ok " + last_user_text(body)) as srv:
        srv.hold_batches = True
        cfg = cfg_for(srv.base_url)
        ledger = CostLedger()

        async def submit_only() -> Any:
            async with LLMClient(cfg, tmp_path, ledger=ledger, stage="tag") as llm:
                try:
                    return await BatchRunner(llm).run(REQUESTS, wait=False)
                finally:
                    llm.cache.close()

        first = asyncio.run(submit_only())
        assert len(first.pending) == 3
        [kept] = srv.batches

        job = srv.batches[kept]["metadata"]["fvqa_job"]
        file_id = srv.batches[kept]["input_file_id"]
        extra = [httpx.post(srv.base_url + "/batches", json={"input_file_id": file_id, "endpoint":
                 "/v1/chat/completions", "completion_window": "24h", "metadata": {"fvqa_job": job}}).json()["id"]
                 for _ in range(2)]
        srv.hold_batches = False
        for _ in range(srv.batch_polls):  # the second duplicate finishes before anyone could cancel it
            httpx.get(f"{srv.base_url}/batches/{extra[1]}")
        assert srv.batches[extra[1]]["status"] == "completed"
        with sqlite3.connect(tmp_path / "llm.sqlite") as con:  # as if the batch id was never recorded
            con.execute("UPDATE batch_jobs SET batch_id = NULL, status = 'uploaded'")
        out = batch_run(cfg, tmp_path, ledger)
        assert out.batch_ids == [kept] and all(r.ok for r in out.results.values())
        assert srv.batches[extra[0]]["status"] == "cancelled"
        assert srv.count("POST", f"/v1/batches/{extra[0]}/cancel") == 1
        lines, usd = billed(srv)
        assert lines == 6  # the kept batch and the finished duplicate: both billed by the server
        cost = ledger.stage("tag")
        assert cost.calls == 6 and cost.usd == pytest.approx(usd)
        spend = read_spend(tmp_path)
        assert sum(r.calls for r in spend) == 6 and sum(r.usd for r in spend) == pytest.approx(usd)
        # merged once: every request has one reply; a re-run books nothing more
        batch_run(cfg, tmp_path, CostLedger())
        assert sum(r.calls for r in read_spend(tmp_path)) == 6


def test_file_transfers_use_their_own_timeout(tmp_path: Path) -> None:
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.inject_route("GET", "/v1/files/", slow(1.0))  # the result download is slower than timeout_s
        out = batch_run(cfg_for(srv.base_url, timeout_s=0.3, batch_transfer_timeout_s=10), tmp_path / "a",
                        CostLedger())
        assert all(r.ok for r in out.results.values())
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.inject_route("GET", "/v1/files/", *[slow(1.0)] * 5)
        with pytest.raises(BatchError, match="batch_transfer_timeout_s=0.3"):
            batch_run(cfg_for(srv.base_url, batch_transfer_timeout_s=0.3, max_retries=1), tmp_path / "b",
                      CostLedger())


class Echo(LLMTask[str, str]):
    name = "tag"
    completion_tokens = 4

    def format(self, item: str) -> Request:
        return Request(user(item), params={"max_tokens": 8})

    def parse(self, item: str, reply: TaskReply) -> str:
        return reply.text


def _flaky_in_batch(body: dict[str, Any]) -> Any:
    text = last_user_text(body)
    return Reply(500, error_body("line failed")) if text.startswith("bad") else "ok " + text


@pytest.mark.parametrize("fallback", [False, True])
def test_failed_batch_lines_wait_for_the_next_batch_unless_online_fallback(tmp_path: Path, fallback: bool) -> None:
    inputs = {"k1": "good one", "k2": "bad one", "k3": "bad two"}
    with FakeOpenAI(_flaky_in_batch) as srv:
        cfg = cfg_for(srv.base_url, batch=True, batch_online_fallback=fallback, max_retries=0)
        outs: dict[str, str] = {}
        retries: dict[str, str] = {}
        run = run_task(Echo(), inputs, cfg, tmp_path, on_output=lambda k, o, r: outs.__setitem__(k, o),
                       on_retry=lambda k, why: retries.__setitem__(k, why))
        if fallback:  # sent online at once, at full price (and the online server fails them too)
            assert srv.count("POST", "/v1/chat/completions") == 2
            assert set(retries) == {"k2", "k3"} and all("HTTP 500" in w for w in retries.values())
            return
        assert outs == {"k1": "ok good one"} and set(retries) == {"k2", "k3"}
        assert srv.count("POST", "/v1/chat/completions") == 0  # nothing re-sent online
        assert all("sent again on the next run, in a new batch" in w for w in retries.values())
        assert run.paid_calls == 1 and len(srv.batches) == 1
        srv.responder = lambda body: "ok " + last_user_text(body)
        run_task(Echo(), inputs, cfg, tmp_path, on_output=lambda k, o, r: outs.__setitem__(k, o))
        assert len(outs) == 3 and srv.count("POST", "/v1/chat/completions") == 0
        assert len(srv.batches) == 2  # the failed lines went into the next batch
        second = list(srv.batches.values())[1]
        assert second["request_counts"]["total"] == 2
