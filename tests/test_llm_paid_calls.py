"""Issue 20 items 3, 7, 11: a wrong key or model stops the stage and rejects nothing; identical
requests in flight make one call; self-hosted endpoints are free unless priced."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image
from rich.console import Console
from support.fake_openai import FakeOpenAI, Reply, error_body, last_user_text
from support.paths import FVQA, REPO

from fvqa.config import GenerateConfig, RunConfig, TagConfig
from fvqa.errors import ConfigError
from fvqa.generators.base import Request, Sampling
from fvqa.generators.openai_chat import OpenAIChatGenerator
from fvqa.llm.client import LLMClient, LLMConfigError
from fvqa.llm.config import Endpoint, LLMConfig, Price
from fvqa.llm.ledger import CostLedger
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.generate import GenerateStage
from fvqa.pipelines.tag import TagStage
from fvqa.store import Workspace

CONCEPTS = [("c1", "Eiffel Tower", "Place"), ("c2", "Golden Retriever", "Nature"), ("c3", "Tour de France", "Events")]
KEY = "sk-wrong-key-do-not-print-42"


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (40 * i, 90, 200 - 30 * i)).save(buf, format="JPEG")
    return buf.getvalue()


def _crawled(root: Path, n: int = len(CONCEPTS)) -> Path:
    with Workspace(root) as ws:
        for i in range(n):
            cid, concept, category = CONCEPTS[i % len(CONCEPTS)]
            cid, concept = (cid, concept) if i < len(CONCEPTS) else (f"c{i + 1}", f"{concept} {i}")
            ref = ws.put_image(_jpeg(i))
            ws.insert("concepts", [dict(concept_id=cid, entry_id=i, concept=concept, count=10 ** (i % 5 + 1),
                                        tier="head", category=category)])
            ws.insert("crawled", [dict(concept_id=cid, image_sha256=ref.sha256, image_url=f"http://x/{cid}.jpg",
                                       page_url=f"http://x/{cid}", page_title=f"{concept} - Wiki",
                                       page_text=f"{concept} is famous.", clip_score=0.3)])
    return root


def _qa(body: dict[str, Any]) -> str:
    concept = re.search(r"shows this visual concept: (.+)", last_user_text(body)).group(1).strip()
    return json.dumps({"question": "What is shown in this photo?", "answer": concept, "aliases": []})


def _rows(root: Path, sql: str) -> list[tuple]:
    with Workspace(root) as ws:
        return ws.execute(sql)


def _llm(srv: FakeOpenAI, **kw: Any) -> LLMConfig:
    base: dict[str, Any] = {"model": "fake-model", "max_retries": 2, "backoff_base_s": 0.0}
    return LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=kw.pop("env", None))], **{**base, **kw})


def _unauthorized(n: int = 200) -> list[Reply]:
    return [Reply(401, error_body(f"Incorrect API key provided: {KEY[:6]}***", "invalid_request_error"))] * n


def _unknown_model(n: int = 200) -> list[Reply]:
    return [Reply(404, error_body("The model `gpt-nope` does not exist", "invalid_request_error"))] * n


# -- item 3: 401 / 404 stop the stage -------------------------------------------------------------

def test_generate_with_a_wrong_key_exits_2_with_one_line_and_rejects_nothing(tmp_path: Path):
    root = _crawled(tmp_path / "ws")
    with FakeOpenAI(_qa) as srv:
        cfg = {"workspace": str(root),
               "generate": {"backend": "llm", "llm": {"endpoints": [{"base_url": srv.base_url,
                                                                      "api_key_env": "FVQA_T_KEY"}],
                                                       "model": "fake-model", "max_retries": 3}}}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = [*FVQA, "build", "--config", str(path), "--stages", "generate"]
        srv.inject(*_unauthorized())
        env = {"PATH": "/usr/bin:/bin", "FVQA_T_KEY": KEY, "HOME": str(tmp_path)}
        bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert "build finished" not in bad.stdout
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        error = [ln for ln in lines if ln.startswith("error:")]
        assert len(error) == 1 and "Traceback" not in bad.stderr, bad.stderr
        assert srv.base_url in error[0] and "generate.llm.endpoints[].api_key_env" in error[0]
        assert "FVQA_T_KEY" in error[0] and "HTTP 401" in error[0]
        assert KEY not in bad.stderr + bad.stdout  # the endpoint is named, never the key
        assert srv.count("POST", "/v1/chat/completions") == 1  # the first request was the only one
        assert _rows(root, "SELECT count(*) FROM rejects")[0][0] == 0
        assert _rows(root, "SELECT count(*) FROM items")[0][0] == 0

        srv.clear_faults()  # the key is fixed: the same command does everything, no --force
        good = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
        assert good.returncode == 0, good.stderr
        assert "build finished" in good.stdout
    assert _rows(root, "SELECT count(*) FROM items")[0][0] == len(CONCEPTS)
    assert _rows(root, "SELECT count(*) FROM rejects")[0][0] == 0


def test_generate_with_an_unknown_model_stops_at_one_request_of_many(tmp_path: Path):
    root = _crawled(tmp_path / "ws", n=40)
    with FakeOpenAI(_qa) as srv:
        srv.inject(*_unknown_model())
        llm = _llm(srv, model="gpt-nope", max_concurrency=16)
        cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm))
        with Workspace(root) as ws, pytest.raises(LLMConfigError) as err:
            execute_stage(GenerateStage(), ws, cfg, Console(quiet=True))
        msg = str(err.value)
        assert "HTTP 404" in msg and "gpt-nope" in msg and "generate.llm.model" in msg and srv.base_url in msg
        assert "\n" not in msg
        assert 1 <= srv.count("POST", "/v1/chat/completions") <= 2  # not max_concurrency of them
        assert _rows(root, "SELECT count(*) FROM rejects")[0][0] == 0
        assert _rows(root, "SELECT status FROM runs") == [("failed",)]  # the stage did not finish
        srv.clear_faults()
        fixed = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=_llm(srv)))
        with Workspace(root) as ws:
            stats = execute_stage(GenerateStage(), ws, fixed, Console(quiet=True))
        assert stats.n_out == 40 and stats.n_rejected == 0


def test_tag_with_a_wrong_key_rejects_nothing_then_completes(tmp_path: Path):
    root = tmp_path / "ws"
    with Workspace(root) as ws:
        ws.insert("items", [dict(item_id=f"i{i}", source="manual", question=f"What is {i}?", answer=f"a{i}")
                            for i in range(6)])
    with FakeOpenAI(lambda b: json.dumps({"knowledge_type": "Place", "confidence": 0.9})) as srv:
        srv.inject(*_unauthorized())
        cfg = RunConfig(workspace=root, tag=TagConfig(backend="llm", llm=_llm(srv)))
        with Workspace(root) as ws, pytest.raises(ConfigError, match=r"refused no API key .*tag\.llm"):
            execute_stage(TagStage(), ws, cfg, Console(quiet=True))
        assert srv.count("POST", "/v1/chat/completions") == 1
        assert _rows(root, "SELECT count(*) FROM rejects")[0][0] == 0
        srv.clear_faults()
        with Workspace(root) as ws:
            stats = execute_stage(TagStage(), ws, cfg, Console(quiet=True))
        assert stats.n_out == 6 and stats.n_rejected == 0


def test_a_404_is_never_cached_and_an_old_cached_404_is_not_replayed(tmp_path: Path):
    with FakeOpenAI(lambda b: "ok") as srv:
        llm = _llm(srv)
        msgs = [{"role": "user", "content": "hi"}]

        async def go() -> Any:
            async with LLMClient(llm, tmp_path / "cache") as client:
                return await client.complete(msgs)

        srv.inject(*_unknown_model(1))
        with pytest.raises(LLMConfigError):
            asyncio.run(go())
        client = LLMClient(llm, tmp_path / "cache")
        key = client.key_for(msgs)
        assert client.cache.get(key) is None  # nothing cached for a configuration error
        client.cache.put_error(key, "http_404", "HTTP 404 from an older run", llm.model)  # as fvqa < 0.x did
        client.cache.close()
        res = asyncio.run(go())
        assert res.ok and res.text == "ok" and not res.cached
        assert srv.count("POST", "/v1/chat/completions") == 2


def test_probe_generator_stops_on_401_instead_of_an_error_rollout(tmp_path: Path):
    with FakeOpenAI(lambda b: "<answer>x</answer>") as srv:
        srv.inject(*_unauthorized())
        gen = OpenAIChatGenerator(_llm(srv), tmp_path / "cache")
        reqs = [Request(messages=[{"role": "user", "content": f"q{i}"}], sampling=Sampling(seed=i))
                for i in range(8)]
        with pytest.raises(LLMConfigError, match=r"probe\.llm\.endpoints\[\]\.api_key_env"):
            gen.generate(reqs)
        assert srv.count("POST", "/v1/chat/completions") == 1
        with pytest.raises(LLMConfigError):  # the client stays stopped: nothing more is sent
            gen.generate(reqs)
        assert srv.count("POST", "/v1/chat/completions") == 1
        srv.clear_faults()  # fixed: the next run (a new generator) rolls out normally
        assert all(g.error is None for g in OpenAIChatGenerator(_llm(srv), tmp_path / "cache").generate(reqs))


# -- item 7: identical requests in flight share one call ------------------------------------------

def test_concurrent_identical_requests_make_one_call_and_count_cache_hits(tmp_path: Path):
    with FakeOpenAI(lambda b: f"answer to {last_user_text(b)}", latency=0.3) as srv:
        ledger = CostLedger()
        llm = _llm(srv, price={})

        async def go() -> list[Any]:
            async with LLMClient(llm, tmp_path / "cache", ledger=ledger, stage="judge") as client:
                same = [client.complete([{"role": "user", "content": "q"}]) for _ in range(5)]
                other = client.complete([{"role": "user", "content": "other"}])
                return list(await asyncio.gather(*same, other))

        *results, other = asyncio.run(go())
        assert srv.count("POST", "/v1/chat/completions") == 2  # one for the five, one for the other
        assert {r.text for r in results} == {"answer to q"} and other.text == "answer to other"
        assert sum(r.shared for r in results) == 4 and not other.shared
        cost = ledger.stage("judge")
        assert cost.calls == 2 and cost.cache_hits == 4 and cost.failed == 0
        assert cost.usd == pytest.approx(sum(Price().usd(r.prompt_tokens, r.completion_tokens)
                                             for r in (results[0], other)))  # the four shared ones are free


def test_a_cancelled_caller_does_not_cancel_the_shared_request(tmp_path: Path):
    with FakeOpenAI(lambda b: "shared", latency=0.3) as srv:
        llm = _llm(srv)

        async def go() -> Any:
            async with LLMClient(llm, tmp_path / "cache") as client:
                msgs = [{"role": "user", "content": "q"}]
                first = asyncio.ensure_future(client.complete(msgs))
                second = asyncio.ensure_future(client.complete(msgs))
                await asyncio.sleep(0.05)
                first.cancel()
                return await second

        res = asyncio.run(go())
        assert res.ok and res.text == "shared" and srv.count("POST", "/v1/chat/completions") == 1


# -- item 11: prices per endpoint; self-hosted is free unless priced ------------------------------

@pytest.mark.parametrize(("url", "local"), [
    ("http://127.0.0.1:8000/v1", True), ("http://localhost:8000/v1", True), ("http://10.1.2.3/v1", True),
    ("http://192.168.0.7:8000/v1", True), ("http://172.20.0.2/v1", True), ("http://[::1]:8000/v1", True),
    ("http://vllm:8000/v1", True), ("https://api.openai.com/v1", False), ("https://8.8.8.8/v1", False),
    ("https://my-vllm.example.com/v1", False),
])
def test_self_hosted_endpoints_are_recognised_from_the_url(url: str, local: bool):
    assert Endpoint(base_url=url, api_key_env=None).self_hosted is local


def test_price_per_endpoint_with_config_default_and_free_self_hosted():
    local = Endpoint(base_url="http://127.0.0.1:8000/v1", api_key_env=None)
    public = Endpoint(base_url="https://api.openai.com/v1")
    own = Endpoint(base_url="http://10.0.0.5/v1", api_key_env=None, price=Price(input_per_1m=0.1, output_per_1m=0.2))
    cfg = LLMConfig(endpoints=[local, public, own])
    assert cfg.price_for(local).usd(1_000_000, 1_000_000) == 0.0
    assert cfg.price_for(public) == Price()
    assert cfg.price_for(own).usd(1_000_000, 0) == pytest.approx(0.1)
    assert cfg.free_endpoints() == ["http://127.0.0.1:8000/v1"]
    set_price = LLMConfig(endpoints=[local, own], price=Price(input_per_1m=1.0))  # an explicit default applies
    assert set_price.price_for(local).input_per_1m == 1.0 and set_price.free_endpoints() == []
    from_yaml = LLMConfig.model_validate({"endpoints": [{"base_url": "http://127.0.0.1/v1",
                                                         "price": {"input_per_1m": 3}}]})
    assert from_yaml.price_at("http://127.0.0.1/v1").input_per_1m == 3


def test_a_self_hosted_stage_is_billed_zero_and_says_so(tmp_path: Path):
    root = _crawled(tmp_path / "ws")
    with FakeOpenAI(_qa) as srv:
        cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=_llm(srv)))
        with Workspace(root) as ws:
            stats = execute_stage(GenerateStage(), ws, cfg, Console(quiet=True))
    assert stats.paid_calls == 3 and stats.cost_usd == 0.0
    assert f"endpoint {srv.base_url} priced at $0 (self-hosted); set its price to bill it" in stats.notes


def test_readme_llm_settings_example_is_a_valid_config():
    text = (REPO / "README.md").read_text()
    block = text.split("### LLM settings", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = RunConfig.model_validate({**yaml.safe_load(block), "workspace": "/tmp/unused"})
    assert cfg.tag.llm is not None and cfg.tag.llm.batch
    assert cfg.probe.llm.free_endpoints() == ["http://127.0.0.1:8000/v1"]
