"""The LLM layer against a real loopback HTTP server speaking the OpenAI wire format."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import BaseModel, ValidationError
from support.fake_openai import (
    FakeOpenAI,
    Reply,
    bad_request,
    completion,
    error_body,
    hang,
    not_json,
    rate_limited,
    server_error,
)

from fvqa.errors import ConfigError
from fvqa.llm import (
    BatchRunner,
    CostLedger,
    Endpoint,
    LLMClient,
    LLMConfig,
    Price,
    estimate_cost,
    image_part,
)

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def cfg_for(*urls: str, **kw: Any) -> LLMConfig:
    base = {"model": "fake-model", "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0,
            "price": {}}  # list prices set explicitly: a loopback endpoint without a price is billed $0
    return LLMConfig(endpoints=[Endpoint(base_url=u, api_key_env=None) for u in urls], **{**base, **kw})


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def one(cfg: LLMConfig, cache: Path, messages: list[dict[str, Any]], **kw: Any) -> Any:
    async with LLMClient(cfg, cache, **kw) as llm:
        return await llm.complete(messages)


@pytest.fixture
def srv():
    with FakeOpenAI() as server:
        yield server


# -- the fake server itself --------------------------------------------------------------------------


def test_fake_server_speaks_the_official_client_wire_format(srv: FakeOpenAI) -> None:
    from openai import OpenAI

    oc = OpenAI(base_url=srv.base_url, api_key="sk-x", max_retries=0)
    reply = oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "echo: hi" and reply.usage.prompt_tokens > 0
    assert [m.id for m in oc.models.list()] == ["fake-model"]
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
    }
    f = oc.files.create(
        file=("in.jsonl", io.BytesIO(json.dumps(line).encode()), "application/jsonl"), purpose="batch"
    )
    batch = oc.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while batch.status not in ("completed", "failed"):
        batch = oc.batches.retrieve(batch.id)
    out = json.loads(oc.files.content(batch.output_file_id).text)
    assert (
        out["custom_id"] == "a" and out["response"]["body"]["choices"][0]["message"]["content"] == "echo: x"
    )
    srv.inject(rate_limited(2))
    from openai import RateLimitError

    with pytest.raises(RateLimitError):
        oc.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])


# -- retries, Retry-After, timeouts --------------------------------------------------------------------


def test_retries_on_5xx_are_bounded_and_transient_errors_are_not_cached(
    srv: FakeOpenAI, tmp_path: Path
) -> None:
    srv.inject(*[server_error(503)] * 10)
    res = run(one(cfg_for(srv.base_url, max_retries=2), tmp_path, user("q")))
    assert not res.ok and res.error_class == "http_503" and "gave up after 3 attempts" in res.error
    assert srv.count("POST", "/v1/chat/completions") == 3
    assert srv.clear_faults() == 7
    srv.reset_records()
    srv.inject(server_error(500))
    res = run(one(cfg_for(srv.base_url, max_retries=2), tmp_path, user("q")))
    assert res.ok and res.text == "echo: q" and res.attempts == 2  # a transient error was not cached
    assert srv.count("POST", "/v1/chat/completions") == 2


def test_retry_after_is_honoured(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.inject(rate_limited(0.7))
    res = run(one(cfg_for(srv.base_url), tmp_path, user("q")))
    assert res.ok and res.attempts == 2
    first, second = srv.requests
    assert second.t - first.t >= 0.65  # backoff alone would be <= 0.05 s


def test_hang_past_timeout_is_retried_then_reported(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.inject(hang(5))
    t0 = time.monotonic()
    res = run(one(cfg_for(srv.base_url, timeout_s=0.3), tmp_path, user("q")))
    assert res.ok and res.attempts == 2 and time.monotonic() - t0 < 2.5
    srv.inject(hang(5), hang(5))
    res = run(one(cfg_for(srv.base_url, timeout_s=0.3, max_retries=1), tmp_path / "b", user("other")))
    assert not res.ok and res.error_class == "timeout" and "llm.timeout_s=0.3 exceeded on http://127.0.0.1" in res.error


def test_non_json_reply_is_retried(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.inject(not_json(), not_json())
    res = run(one(cfg_for(srv.base_url), tmp_path, user("q")))
    assert res.ok and res.attempts == 3
    srv.inject(*[not_json()] * 3)
    res = run(one(cfg_for(srv.base_url, max_retries=2), tmp_path, user("q2")))
    assert res.error_class == "bad_response" and "non-JSON" in res.error


def test_deterministic_400_is_cached_with_its_class(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.inject(bad_request("image_url is not a valid image"))
    res = run(one(cfg_for(srv.base_url), tmp_path, user("q")))
    assert not res.ok and res.error_class == "http_400" and "not a valid image" in res.error
    assert res.attempts == 1  # not retried
    again = run(one(cfg_for(srv.base_url), tmp_path, user("q")))  # a new client = a re-run
    assert again.cached and again.error_class == "http_400" and srv.count("POST", "/v1/chat") == 1
    fresh = run(one(cfg_for(srv.base_url), tmp_path, user("q"), retry_cached_errors=True))
    assert fresh.ok and srv.count("POST", "/v1/chat") == 2


# -- cache and resume --------------------------------------------------------------------------------


def test_cache_prevents_repeats_across_client_instances(srv: FakeOpenAI, tmp_path: Path) -> None:
    reqs = {f"r{i}": user(f"question {i}") for i in range(20)}
    ledger = CostLedger()

    async def go() -> dict[str, Any]:
        async with LLMClient(cfg_for(srv.base_url), tmp_path, ledger=ledger, stage="generate") as llm:
            return await llm.complete_many(reqs)

    first = run(go())
    assert srv.count("POST", "/v1/chat") == 20 and all(r.ok and not r.cached for r in first.values())
    second = run(go())
    assert srv.count("POST", "/v1/chat") == 20  # nothing sent again
    assert {k: r.text for k, r in second.items()} == {k: r.text for k, r in first.items()}
    cost = ledger.stage("generate")
    assert (
        cost.calls == 20
        and cost.cache_hits == 20
        and cost.usd > 0
        and cost.saved_usd == pytest.approx(cost.usd)
    )

    # a different parameter is a different request
    async def hotter() -> Any:
        async with LLMClient(cfg_for(srv.base_url, temperature=0.7), tmp_path) as llm:
            return await llm.complete(user("question 0"))

    assert not run(hotter()).cached and srv.count("POST", "/v1/chat") == 21


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from fvqa.llm import LLMClient, LLMConfig, Endpoint
    cfg = LLMConfig(endpoints=[Endpoint(base_url={url!r}, api_key_env=None)], model="fake-model",
                    max_concurrency=4, batch_poll_s=0.05)
    reqs = {{f"r{{i}}": [{{"role": "user", "content": f"item {{i}}"}}] for i in range({n})}}
    async def main():
        async with LLMClient(cfg, {cache!r}) as llm:
            {body}
    asyncio.run(main())
    """
)


def spawn(srv: FakeOpenAI, cache: Path, n: int, body: str) -> subprocess.Popen[bytes]:
    code = _CHILD.format(repo=str(REPO), tests=str(TESTS), url=srv.base_url, n=n, cache=str(cache), body=body)
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)


def wait_for(cond: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_sigkill_mid_run_then_rerun_repeats_no_stored_request(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.latency = 0.05
    child = spawn(srv, tmp_path, 40, "await llm.complete_many(reqs)")
    wait_for(lambda: srv.count("POST", "/v1/chat", status=200) >= 12)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with sqlite3.connect(tmp_path / "llm.sqlite") as con:
        stored = {k for (k,) in con.execute("SELECT key FROM responses WHERE ok = 1")}
    assert 8 <= len(stored) < 40
    srv.reset_records()
    reqs = {f"r{i}": user(f"item {i}") for i in range(40)}

    async def rerun() -> tuple[dict[str, Any], set[str]]:
        async with LLMClient(cfg_for(srv.base_url, max_concurrency=4), tmp_path) as llm:
            results = await llm.complete_many(reqs)
            resent = {llm.key_for(b["messages"]) for b in srv.chat_bodies()}
            return results, resent

    results, resent = run(rerun())
    assert all(r.ok for r in results.values()) and len(results) == 40
    assert not (resent & stored)  # nothing that had been stored is paid for again
    assert len(resent) == srv.count("POST", "/v1/chat") == 40 - len(stored)


# -- endpoints ---------------------------------------------------------------------------------------


def test_round_robin_across_endpoints_and_a_dead_one_is_skipped(tmp_path: Path) -> None:
    with FakeOpenAI() as a, FakeOpenAI() as b:
        dead = FakeOpenAI()
        dead_url = dead.base_url
        dead.close()  # a port nobody listens on

        async def go(*urls: str, n: int, tag: str) -> dict[str, Any]:
            async with LLMClient(cfg_for(*urls, max_concurrency=1), tmp_path) as llm:
                return await llm.complete_many({i: user(f"{tag}{i}") for i in range(n)})

        assert all(r.ok for r in run(go(a.base_url, b.base_url, n=10, tag="x")).values())
        assert a.count("POST") == b.count("POST") == 5
        results = run(go(dead_url, a.base_url, n=10, tag="y"))
        assert all(r.ok for r in results.values())
        assert (
            sum(r.attempts for r in results.values()) == 11
        )  # the dead endpoint cost one attempt, then skipped


def test_health_reports_each_endpoint(srv: FakeOpenAI, tmp_path: Path) -> None:
    dead = FakeOpenAI()
    dead.close()

    async def go() -> dict[str, str | None]:
        async with LLMClient(cfg_for(srv.base_url, dead.base_url), tmp_path) as llm:
            return await llm.health()

    health = run(go())
    assert health[srv.base_url] is None and "Connect" in (health[dead.base_url] or "")


# -- structured output -------------------------------------------------------------------------------


class QA(BaseModel):
    question: str
    answer: str


def test_structured_output_repairs_once(tmp_path: Path) -> None:
    replies = iter(
        ['{"question": "Who built it?"}', '```json\n{"question": "Who built it?", "answer": "Eiffel"}\n```']
    )
    with FakeOpenAI(lambda body: next(replies)) as srv:

        async def go() -> Any:
            async with LLMClient(cfg_for(srv.base_url), tmp_path) as llm:
                return await llm.complete_json(user("make a QA pair"), QA)

        res = run(go())
        assert res.ok and res.repaired and res.value == QA(question="Who built it?", answer="Eiffel")
        first, repair = srv.chat_bodies()
        assert first["response_format"]["type"] == "json_schema"
        assert first["response_format"]["json_schema"]["schema"]["required"] == ["question", "answer"]
        assert "field 'answer': Field required" in repair["messages"][-1]["content"]
        again = run(go())  # both calls are cached: a re-run costs nothing
        assert again.ok and srv.count("POST") == 2


def test_structured_output_failure_carries_raw_reply_and_reason(tmp_path: Path) -> None:
    with FakeOpenAI(lambda body: "Sure! The answer is Paris.") as srv:

        async def go() -> Any:
            async with LLMClient(cfg_for(srv.base_url, json_schema=False), tmp_path) as llm:
                return await llm.complete_json(user("make a QA pair"), QA)

        res = run(go())
        assert not res.ok and res.value is None and res.raw == "Sure! The answer is Paris."
        assert res.error_reason.startswith("reply did not match QA after one repair: not valid JSON")
        body = srv.chat_bodies()[0]
        assert (
            "response_format" not in body and '"answer"' in body["messages"][0]["content"]
        )  # schema in prompt
        assert srv.count("POST") == 2  # one repair, no more
    tmp_path = tmp_path / "second"  # a fresh cache: the same request must reach the new server
    with FakeOpenAI(lambda body: Reply(400, error_body("content policy"))) as srv:
        res = run(go())
        assert (
            not res.ok
            and "request failed: HTTP 400" in res.error_reason
            and "content policy" in res.error_reason
        )


# -- images ------------------------------------------------------------------------------------------


def png(w: int, h: int, color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_images_are_resized_data_urls_keyed_by_content_hash(srv: FakeOpenAI, tmp_path: Path) -> None:
    big = png(2000, 1000)
    (tmp_path / "img.png").write_bytes(big)

    def msg(img: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, image_part(img)]}]

    async def go() -> tuple[Any, ...]:
        async with LLMClient(cfg_for(srv.base_url, image_max_side=256), tmp_path / "c") as llm:
            r1 = await llm.complete(msg(big))
            r2 = await llm.complete(msg(tmp_path / "img.png"))  # same bytes from a path: cache hit
            r3 = await llm.complete(msg(png(2000, 1000, "blue")))
            r4 = await llm.complete(msg(b"not an image"))
            return r1, r2, r3, r4

    r1, r2, r3, r4 = run(go())
    assert r1.ok and r2.cached and r2.key == r1.key and r3.key != r1.key
    assert not r4.ok and r4.error_class == "bad_image" and "cannot be decoded" in r4.error
    assert srv.count("POST") == 2  # the bad image never reached the endpoint
    url = srv.chat_bodies()[0]["messages"][0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as im:
        assert im.size == (256, 128)


# -- batch mode --------------------------------------------------------------------------------------


def test_batch_round_trip_fills_the_cache(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.responder = lambda body: (
        Reply(400, error_body("bad")) if "poison" in str(body) else "ok " + str(len(body))
    )
    reqs = {"a": user("one"), "b": user("two"), "dup": user("one"), "p": user("poison")}
    ledger = CostLedger()

    async def go() -> Any:
        async with LLMClient(
            cfg_for(srv.base_url, batch_poll_s=0.02), tmp_path, ledger=ledger, stage="tag"
        ) as llm:
            out = await BatchRunner(llm).run(reqs)
            single = await llm.complete(user("two"))
            return out, single

    out, single = run(go())
    assert out.pending == [] and len(out.batch_ids) == 1
    assert out.results["a"].ok and out.results["a"].text == out.results["dup"].text
    assert out.results["p"].error_class == "http_400"
    assert single.cached  # batch results serve ordinary calls too
    assert srv.count("POST", "/v1/batches") == 1 and srv.count("POST", "/v1/chat") == 0
    lines = [json.loads(x) for x in srv.files["file-000001"][1].decode().splitlines()]
    assert len(lines) == 3 and {x["custom_id"] for x in lines} == {
        out.results[k].key for k in ("a", "b", "p")
    }
    cost = ledger.stage("tag")
    assert cost.calls == 2 and cost.usd == pytest.approx(
        Price().usd(cost.prompt_tokens, cost.completion_tokens, batch=True)
    )


def test_batch_resumes_the_same_batch_after_sigkill(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.hold_batches = True
    child = spawn(srv, tmp_path, 6, "from fvqa.llm import BatchRunner; await BatchRunner(llm).run(reqs)")
    wait_for(lambda: srv.count("GET", "/v1/batches/") >= 3)  # polling a running batch
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    srv.hold_batches = False
    reqs = {f"r{i}": user(f"item {i}") for i in range(6)}

    async def resume() -> Any:
        async with LLMClient(cfg_for(srv.base_url), tmp_path) as llm:
            return await BatchRunner(llm).run(reqs, poll_s=0.02)

    out = run(resume())
    assert all(r.ok for r in out.results.values()) and len(out.results) == 6
    assert srv.count("POST", "/v1/batches") == 1 and srv.count("POST", "/v1/files") == 1
    assert out.batch_ids == list(srv.batches)
    assert {r.path for r in srv.requests if r.path.startswith("/v1/batches/")} == {
        f"/v1/batches/{out.batch_ids[0]}"
    }


def test_batch_created_but_id_lost_is_found_by_metadata(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.hold_batches = True
    reqs = {"a": user("one")}

    async def go(wait: bool) -> Any:
        async with LLMClient(cfg_for(srv.base_url), tmp_path) as llm:
            out = await BatchRunner(llm).run(reqs, wait=wait, poll_s=0.02)
            return out, llm.cache

    out, cache = run(go(False))
    assert out.pending == ["a"] and not out.results
    with sqlite3.connect(tmp_path / "llm.sqlite") as con:  # simulate a crash right after POST /batches
        con.execute("UPDATE batch_jobs SET batch_id = NULL, status = 'uploaded'")
    srv.hold_batches = False
    out, _ = run(go(True))
    assert out.results["a"].ok and srv.count("POST", "/v1/batches") == 1


def test_expired_batch_reports_and_resubmits(srv: FakeOpenAI, tmp_path: Path) -> None:
    srv.batch_final_status = "expired"
    srv.responder = lambda body: Reply(500, error_body("boom"))  # nothing succeeds inside the window

    async def go() -> Any:
        async with LLMClient(cfg_for(srv.base_url), tmp_path) as llm:
            return await BatchRunner(llm).run({"a": user("one")}, poll_s=0.02)

    out = run(go())
    assert (
        out.results["a"].error_class == "batch_expired"
        and "sent again on the next run" in out.results["a"].error
    )
    srv.batch_final_status = "completed"
    srv.responder = lambda body: "fine"
    out = run(go())
    assert out.results["a"].ok and srv.count("POST", "/v1/batches") == 2


# -- secrets -----------------------------------------------------------------------------------------


def test_api_key_only_from_env_and_never_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-test-Very5ecretKey-0123456789"
    monkeypatch.setenv("FVQA_TEST_LLM_KEY", secret)
    # the server echoes the key in an error message, as OpenAI does for a bad key
    with FakeOpenAI(
        lambda body: (
            Reply(400, error_body(f"bad request for key {secret}"))
            if "POISON" in str(body)
            else completion("hi")
        )
    ) as srv:
        cfg = LLMConfig(
            endpoints=[Endpoint(base_url=srv.base_url, api_key_env="FVQA_TEST_LLM_KEY")],
            backoff_base_s=0.01,
            batch_poll_s=0.02,
        )

        async def go() -> Any:
            async with LLMClient(cfg, tmp_path / "cache") as llm:
                ok = await llm.complete(user("hello"))
                bad = await llm.complete(user("POISON"))
                out = await BatchRunner(llm).run({"a": user("batched"), "b": user("POISON again")})
                return ok, bad, out

        ok, bad, out = run(go())
        assert ok.ok and not bad.ok and "***" in bad.error and secret not in bad.error
        assert out.results["a"].ok
        assert {r.header("Authorization") for r in srv.requests} == {f"Bearer {secret}"}
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.name.startswith("llm.sqlite") for p in files)
    for p in files:
        assert secret.encode() not in p.read_bytes(), p
    monkeypatch.delenv("FVQA_TEST_LLM_KEY")
    with pytest.raises(ConfigError, match="FVQA_TEST_LLM_KEY is not set"):
        LLMClient(cfg, tmp_path / "cache")


# -- config, ledger, estimate ------------------------------------------------------------------------


def test_config_forbids_unknown_keys_and_bad_urls() -> None:
    with pytest.raises(ValidationError, match="max_concurency"):
        LLMConfig.model_validate({"model": "m", "max_concurency": 4})
    with pytest.raises(ValidationError, match="http"):
        LLMConfig.model_validate({"endpoints": [{"base_url": "localhost:8000/v1"}]})
    cfg = LLMConfig.model_validate(
        {
            "endpoints": [{"base_url": "http://gpu1:8000/v1/", "api_key_env": None}],
            "price": {"input_per_1m": 1},
        }
    )
    assert cfg.endpoints[0].base_url == "http://gpu1:8000/v1" and cfg.price.output_per_1m == 10.0


def test_ledger_summary_and_estimate() -> None:
    price = Price(input_per_1m=2.5, output_per_1m=10.0)
    ledger = CostLedger()
    ledger.record("generate", usd=price.usd(1000, 100), prompt_tokens=1000, completion_tokens=100)
    ledger.record("generate", usd=price.usd(1000, 100), cached=True)
    ledger.record("probe", "search", usd=0.005)
    ledger.record("probe", failed=True, retries=3)
    summary = ledger.summary()
    assert summary["generate"]["llm"]["calls"] == 1 and summary["generate"]["llm"]["cache_hits"] == 1
    assert summary["generate"]["llm"]["usd"] == pytest.approx(0.0035)
    assert (
        summary["probe"]["search"]["usd"] == pytest.approx(0.005) and summary["probe"]["llm"]["failed"] == 1
    )
    assert ledger.total_usd() == pytest.approx(0.0085)
    est = estimate_cost(10_000, 1200, 80, price, cached=2_000)
    assert est.paid_calls == 8_000 and est.usd == pytest.approx(8_000 * (1200 * 2.5 + 80 * 10) / 1e6)
    assert estimate_cost(100, 1000, 100, price, batch=True).usd == pytest.approx(
        100 * price.usd(1000, 100) / 2
    )
