"""`fvqa build --estimate` (issue 20, items 6 and 13): every paid stage priced from the upstream
stages' expected counts, the real prompt templates and the cache, as a range; the paper-scale
config stays within its budget; on a demo-shaped build the estimate made before anything exists
is close to what the ledger shows afterwards."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from rich.console import Console
from support.fake_openai import FakeOpenAI, completion
from support.paths import REPO, write_demo_config
from typer.testing import CliRunner

from fvqa.config import load_config
from fvqa.pipelines.expected import image_tokens
from fvqa.pipelines.runner import estimate_build, run_build

PAPER = REPO / "configs" / "paper.yaml"
PAID = ("generate", "tag", "probe")
PRICE = {"input_per_1m": 2.5, "output_per_1m": 10.0}


def test_image_tokens_follow_openai_tiles():
    assert image_tokens(256, 256) == 85 + 170
    assert image_tokens(768, 768) == 85 + 4 * 170
    assert image_tokens(768, 512) == 85 + 2 * 170
    assert image_tokens(4000, 3000, 768) == 85 + 4 * 170  # sent at 768 x 576
    assert image_tokens(2048, 4096) == 85 + 6 * 170  # fit 2048, shorter side 768: 768 x 1536


def test_paper_config_estimate_prints_every_paid_stage_with_a_range_within_budget(tmp_path: Path):
    from fvqa.cli import app

    ws = tmp_path / "ws"
    res = CliRunner().invoke(app, ["build", "-c", str(PAPER), "--estimate", "--set", f"workspace={ws}"],
                             env={"COLUMNS": "240"})
    assert res.exit_code == 0, res.output
    for stage in PAID:
        row = next(line for line in res.output.splitlines() if line.startswith(f"│ {stage} "))
        assert re.search(r"\d \([\d,]+-[\d,]+\)", row), row  # mid (low-high)
    m = re.search(r"total API spend: \$([\d,.]+) \(range \$([\d,.]+)-\$([\d,.]+)\)", res.output)
    assert m, res.output
    mid, low, high = (float(x.replace(",", "")) for x in m.groups())
    assert 0 < low < mid < high <= 250
    assert "assumes:" in res.output and "self-hosted and priced $0" in res.output
    assert not ws.exists(), "an estimate needs no workspace and writes none"

    cfg = load_config(PAPER, [f"workspace={ws}"])
    ests = estimate_build(cfg, console=Console(quiet=True))
    for stage in PAID:
        est = ests[stage]
        assert est is not None and est.paid_calls_low < est.paid_calls < est.paid_calls_high, stage
        assert est.tokens_low <= est.tokens <= est.tokens_high and est.assumptions, stage
    assert ests["generate"].paid_calls == round(10_000 * 0.95)  # concepts.n x expected crawl keep rate
    assert ests["probe"].usd_high == 0 and ests["probe"].paid_calls > 200_000  # self-hosted: calls, no dollars
    assert "batch price" in ests["generate"].note and "batch price" in ests["tag"].note
    # the naive build: probe on GPT-4o, no batch
    naive = load_config(PAPER, [f"workspace={ws}", "generate.llm.batch=false", "tag.llm.batch=false",
                                "probe.llm.endpoints.0.base_url=https://api.openai.com/v1",
                                "probe.llm.model=gpt-4o"])
    total = sum(e.usd for e in estimate_build(naive, console=Console(quiet=True)).values() if e is not None)
    assert total > 1_300


# -- the demo-shaped run -----------------------------------------------------------------------------
def _usage(body: dict[str, Any]) -> int:
    """Prompt tokens as OpenAI counts them, roughly: ~4 characters of text a token (the schema of a
    structured request included), each image by the high-detail tile rule on its real size."""
    chars, images = 0, 0
    for msg in body["messages"]:
        content = msg.get("content")
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content:
            if part.get("type") == "text":
                chars += len(part["text"])
            elif part.get("type") == "image_url":
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                with Image.open(io.BytesIO(data)) as im:
                    images += image_tokens(*im.size)
    if body.get("response_format"):
        chars += len(json.dumps(body["response_format"]))
    return max(1, chars // 4) + images


def _draw(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n


def _reason(key: str) -> str:
    """A reasoning of 200-600 characters (the probe estimate assumes ~100 tokens a turn)."""
    return "<reason>" + ("The image shows a thing I should look at closely. " * 12)[:200 + _draw(key, 400)] + "</reason>"


def _responder(body: dict[str, Any]) -> dict[str, Any]:
    """One fake endpoint for the three paid stages: question writer, tagger and the probe's VLM, which
    answers at once, after an image search, or after an image and a text search (a third each)."""
    first = body["messages"][0]["content"]
    text = first if isinstance(first, str) else " ".join(p.get("text", "") for p in first if p.get("type") == "text")
    if "shows this visual concept:" in text:
        concept = re.search(r"shows this visual concept: (.+)", text).group(1).strip()
        reply = json.dumps({"question": "What is shown in this photo?", "answer": concept, "aliases": []})
    elif "Classify a visual question-answer pair" in text:
        reply = '{"knowledge_type": "Place", "confidence": 0.8}'
    else:
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        key = f"{text}|{body.get('seed')}|{turn}"
        direct = "from your own knowledge" in text
        turns = 1 if direct else 1 + _draw(f"{text}|{body.get('seed')}", 3)
        if turn + 1 >= turns:
            reply = _reason(key) + "<answer>Someone</answer>"
        elif turn == 0:
            reply = _reason(key) + "<search><img>"
        else:
            reply = _reason(key) + "<text_search>who made it"
    out = completion(reply, model=body.get("model", "fake-model"), prompt_tokens=_usage(body))
    return out


def _demo_config(tmp_path: Path, world: Path, base_url: str) -> Path:
    path = write_demo_config(tmp_path, world)
    data = yaml.safe_load(path.read_text())
    llm = {"endpoints": [{"base_url": base_url, "api_key_env": None}], "model": "fake-model", "max_retries": 0,
           "price": PRICE, "max_concurrency": 32}
    data["generate"] = {**data["generate"], "backend": "llm", "llm": llm}
    data["tag"] = {"backend": "llm", "llm": llm}
    data["probe"] = {**data["probe"], "backend": "openai", "llm": llm, "k": 2}  # k=2 keeps the test short
    data["split"]["enabled"] = False
    data["export"] = {"enabled": False}
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_estimate_before_the_build_is_within_30_percent_of_the_ledger(tmp_path: Path, demo_world: Path):
    with FakeOpenAI(_responder) as srv:
        cfg = load_config(_demo_config(tmp_path, demo_world, srv.base_url))
        before = estimate_build(cfg, console=Console(quiet=True))
        assert srv.count("POST", "/v1/chat/completions") == 0, "an estimate spends nothing"
        stats = run_build(cfg, console=Console(quiet=True))
        after = estimate_build(cfg, console=Console(quiet=True))
    spent = {s: stats[s].cost_usd for s in PAID}
    calls = {s: stats[s].paid_calls for s in PAID}
    est = sum(before[s].usd for s in PAID)
    low, high = sum(before[s].usd_low for s in PAID), sum(before[s].usd_high for s in PAID)
    ledger = sum(spent.values())
    ratio = est / ledger
    report = {s: (round(before[s].usd, 4), round(spent[s], 4), before[s].paid_calls, calls[s]) for s in PAID}
    print(f"estimate/ledger = {ratio:.3f}; per stage (est $, ledger $, est calls, paid calls): {report}")
    assert 0.7 <= ratio <= 1.3, report
    assert low <= ledger <= high, (low, ledger, high)
    for s in PAID:
        assert before[s].paid_calls_low <= calls[s] <= before[s].paid_calls_high, (s, report)
    # afterwards everything is done: nothing left to pay for
    assert all(after[s].usd == 0 for s in PAID), after


# -- the probe on real items -------------------------------------------------------------------------
class _Tools:
    """Search that always finds something (the estimate, not retrieval, is under test)."""

    def image_search(self, image: bytes, **_: Any) -> list:
        from fvqa.protocol import ImageHit

        return [ImageHit(title="Kalo tower - Wikipedia", url="http://demo/kalo")]

    def text_search(self, query: str, question: str = "", **_: Any) -> list:
        from fvqa.protocol import TextHit

        return [TextHit(url="http://demo/kalo", title="Kalo tower", summary="Kalo tower was built by Ur Sta.")]


def test_probe_estimate_prices_real_items_skips_cached_rollouts_and_free_self_hosted(tmp_path: Path, monkeypatch):
    from support.images import picture

    import fvqa.search.tools
    from fvqa.config import ProbeConfig, RunConfig
    from fvqa.pipelines.base import StageContext, execute_stage
    from fvqa.pipelines.probe import ProbeStage
    from fvqa.store import Workspace

    monkeypatch.setattr(fvqa.search.tools, "make_search_tools", lambda *a, **kw: _Tools())
    quiet = Console(quiet=True)

    def estimate(ws: Workspace, config: RunConfig) -> Any:
        stage = ProbeStage()
        stage.prepare(ws)
        return stage.estimate(StageContext(ws, config, stage, console=quiet))

    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(_responder) as srv:
        shas = [ws.put_image(picture(n)).sha256 for n in range(3)]
        ws.insert("items", [dict(item_id=f"it{n}", source="infoseek", question="Who built this?", answer="Ur Sta",
                                 aliases=[], image_sha256=sha, concept=None, concept_count=None, entity_text=None)
                            for n, sha in enumerate(shas)]
                  + [dict(item_id="no-image", source="infoseek", question="q", answer="a", aliases=[],
                          image_sha256=None, concept=None, concept_count=None, entity_text=None)])
        llm = {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "fake-model",
               "max_retries": 0}
        free = RunConfig(workspace=ws.root, probe=ProbeConfig(backend="openai", k=2, llm=llm))
        paid = RunConfig(workspace=ws.root, probe=ProbeConfig(backend="openai", k=2, llm={**llm, "price": PRICE}))
        est = estimate(ws, paid)
        # 3 items with an image (the 4th is rejected without a call) x (2 direct + 2 search of 1..3 calls)
        assert (est.paid_calls_low, est.paid_calls, est.paid_calls_high) == (3 * 4, 3 * 6, 3 * 8)
        assert 0 < est.usd_low < est.usd < est.usd_high and est.cached == 0
        self_hosted = estimate(ws, free)
        assert self_hosted.paid_calls == est.paid_calls and self_hosted.usd_high == 0
        assert any("self-hosted and priced $0" in a for a in self_hosted.assumptions)

        stats = execute_stage(ProbeStage(), ws, paid, quiet)
        assert est.usd_low <= stats.cost_usd <= est.usd_high
        assert est.paid_calls_low <= srv.count("POST", "/v1/chat/completions") <= est.paid_calls_high
        assert estimate(ws, paid).paid_calls == 0  # every item labelled
        ProbeStage().reset(ws)  # forget the labels: each rollout's first request is in the cache
        again = estimate(ws, paid)
        assert again.paid_calls == 0 and again.usd == 0 and again.cached > 0
        assert srv.count("POST", "/v1/chat/completions") == stats.paid_calls
