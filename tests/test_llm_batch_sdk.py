"""The Batch API control calls go through the openai SDK, with fvqa's retry policy and no SDK retries.

Against the loopback fake: every control request carries the SDK's user agent, a keyless endpoint
sends no Authorization header (a keyed one sends its key), the SDK never retries on its own (a 500
on POST /batches is one POST, then a listing), and a refused connection is a create that may be
tried again.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from support.fake_openai import FakeOpenAI, Reply, not_json, server_error

from fvqa.llm import BatchRunner, LLMClient
from fvqa.llm.batch import BatchError, _Refused
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.llm.ledger import CostLedger

CONTROL = ("/v1/files", "/v1/batches")


def _cfg(url: str, **kw: Any) -> LLMConfig:
    base = {"model": "fake-model", "backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0,
            "max_retries": 2, "batch_poll_s": 0.02, "price": {}}
    endpoint = Endpoint(base_url=url, api_key_env=kw.pop("api_key_env", None))
    return LLMConfig(endpoints=[endpoint], **{**base, **kw})


def _run(cfg: LLMConfig, cache: Path, requests: dict[str, Any]) -> Any:
    async def go() -> Any:
        async with LLMClient(cfg, cache, ledger=CostLedger(), stage="tag") as llm:
            try:
                return await BatchRunner(llm).run(requests)
            finally:
                llm.cache.close()

    return asyncio.run(go())


def _control(srv: FakeOpenAI) -> list[Any]:
    return [r for r in srv.requests if r.path.startswith(CONTROL)]


def test_control_calls_use_the_sdk_and_a_keyless_endpoint_sends_no_key(tmp_path: Path) -> None:
    with FakeOpenAI(lambda body: "ok") as srv:
        out = _run(_cfg(srv.base_url), tmp_path, {"a": [{"role": "user", "content": "one"}]})
        assert out.results["a"].ok and out.results["a"].text == "ok"
        calls = _control(srv)
        assert {(r.method, r.path.split("/")[2]) for r in calls} >= {("POST", "files"), ("POST", "batches"),
                                                                    ("GET", "batches"), ("GET", "files")}
        assert all((r.header("User-Agent") or "").startswith("AsyncOpenAI/Python") for r in calls)
        assert all(r.header("Authorization") is None for r in calls)
        upload = next(r for r in calls if r.method == "POST" and r.path == "/v1/files")
        assert (upload.header("Content-Type") or "").startswith("multipart/form-data")


def test_a_keyed_endpoint_sends_its_key_on_control_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FVQA_TEST_BATCH_KEY", "sk-batch-test-1")
    with FakeOpenAI(lambda body: "ok") as srv:
        out = _run(_cfg(srv.base_url, api_key_env="FVQA_TEST_BATCH_KEY"), tmp_path,
                   {"a": [{"role": "user", "content": "one"}]})
        assert out.results["a"].ok
        assert {r.header("Authorization") for r in _control(srv)} == {"Bearer sk-batch-test-1"}


def test_the_sdk_never_retries_by_itself(tmp_path: Path) -> None:
    """A status GET failing every time is tried max_retries + 1 times in all: fvqa's policy, not the SDK's."""
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.hold_batches = True
        srv.inject_route("GET", "/v1/batches/", *[server_error(500)] * 10)
        with pytest.raises(BatchError, match=r"GET /batches/.* failed: HTTP 500"):
            _run(_cfg(srv.base_url, max_retries=2), tmp_path, {"a": [{"role": "user", "content": "one"}]})
        assert srv.count("GET", "/v1/batches/") == 3 and srv.count("POST", "/v1/batches") == 1
        assert all(r.header("x-stainless-retry-count") == "0" for r in _control(srv))


def test_a_refused_connection_is_a_create_that_created_nothing(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go() -> None:
        async with LLMClient(_cfg(f"http://127.0.0.1:{port}/v1"), tmp_path, stage="tag") as llm:
            runner = BatchRunner(llm)
            runner._sdk = runner._new_sdk()  # what run() opens
            try:
                with pytest.raises(_Refused):
                    await runner._create("job-1", "file-1")
            finally:
                await runner._sdk.close()
                llm.cache.close()

    asyncio.run(go())


def test_a_non_json_200_on_a_status_poll_is_retried(tmp_path: Path) -> None:
    """HTML (the SDK hands back a str) and a JSON-typed body that does not parse (the SDK raises
    ValueError) are both one failed attempt of the call, not a crash and not a result."""
    garbled = Reply(200, "not json", content_type="application/json")
    with FakeOpenAI(lambda body: "ok") as srv:
        srv.inject_route("GET", "/v1/batches/", not_json(), garbled, not_json())  # all three attempts
        with pytest.raises(BatchError, match=r"GET /batches/.* failed: non-JSON reply"):
            _run(_cfg(srv.base_url, max_retries=2), tmp_path / "a", {"a": [{"role": "user", "content": "one"}]})
        srv.inject_route("GET", "/v1/batches/", garbled, not_json())
        out = _run(_cfg(srv.base_url, max_retries=2), tmp_path / "a", {"a": [{"role": "user", "content": "one"}]})
        assert out.results["a"].ok  # the same job, polled again: two bad replies, then the real one
        assert srv.count("POST", "/v1/batches") == 1
