"""generate: App. D.1 rules enforced in code; template backend offline; llm backend over loopback HTTP."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console
from support.fake_openai import FakeOpenAI

from fvqa.config import GenerateConfig, RunConfig
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.pipelines.base import Estimate, StageContext, execute_stage
from fvqa.pipelines.generate import GenerateStage
from fvqa.store import Workspace
from fvqa.textgen import qa
from fvqa.textgen.rules import question_type, rule_violations

CONCEPTS = [  # concept_id, concept, category
    ("c1", "Eiffel Tower", "Place"),
    ("c2", "Moonlight Sonata", "Arts"),
    ("c3", "Golden Retriever", "Nature"),
    ("c4", "Tour de France", "Events"),
    ("c5", "Zürich Opernhaus", "Place"),
]


@pytest.mark.parametrize(
    ("question", "answer", "concept", "broken"),
    [
        ("What landmark is shown in this photo?", "the Eiffel Tower", "Eiffel Tower", []),
        ("Where was this photo taken?", "at the Eiffel Tower in Paris", "eiffel tower", []),
        ("Who composed this piece?", "Ludwig van Beethoven", "Moonlight Sonata",
         ["answer must contain the concept"]),
        ("Which tower is this?", "Eiffel Tower", "Eiffel Tower", ["question must start with Who, What or Where"]),
        ("What is the height of the Eiffel Tower?", "Eiffel Tower", "Eiffel Tower",
         ["question must not contain the concept"]),
        ("What building is this?", "ZÜRICH OPERNHAUS", "Zürich Opernhaus", []),  # unicode, case
        ("What is this?", "", "Eiffel Tower", ["answer is empty"]),
        ("What is this?", "Eiffel Tower " + "and more " * 10, "Eiffel Tower", ["answer must be at most 12 words"]),
        ("What is the Eiffel Tower's height?", "Eiffel Tower", "Eiffel Tower",
         ["question must not contain the concept"]),  # possessive still names it
        ("What tower?", "Eiffel Towers", "Eiffel Tower", ["answer must contain the concept"]),  # whole words
    ],
)
def test_rules_on_crafted_pairs(question: str, answer: str, concept: str, broken: list[str]):
    assert rule_violations(question, answer, concept) == broken


def test_question_type_reads_first_word():
    assert question_type("  \"Who painted this?") == "Who"
    assert question_type("WHERE is it?") == "Where"
    assert question_type("Whose hat is this?") is None
    assert question_type("Which one?") is None


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 80), color).save(buf, format="JPEG")
    return buf.getvalue()


def _workspace(root: Path) -> Path:
    """Concepts and crawled rows as the concepts and crawl stages leave them."""
    with Workspace(root) as ws:
        for i, (cid, concept, category) in enumerate(CONCEPTS):
            ref = ws.put_image(_jpeg((40 * i, 90, 200 - 30 * i)))
            ws.insert("concepts", [dict(concept_id=cid, entry_id=i, concept=concept, count=10 ** (i + 1),
                                        tier="head" if i < 2 else "tail", category=category)])
            ws.insert("crawled", [dict(concept_id=cid, image_sha256=ref.sha256, image_url=f"http://x/{cid}.jpg",
                                       page_url=f"http://x/{cid}", page_title=f"{concept} - Wiki",
                                       page_text=f"{concept} is famous. It has many facts.", clip_score=0.3)])
    return root


def _estimate(cfg: RunConfig) -> Estimate:
    """What `fvqa build --estimate` prints for this stage."""
    with Workspace(cfg.workspace) as ws:
        stage = GenerateStage()
        est = stage.estimate(StageContext(ws, cfg, stage, console=Console(quiet=True)))
    assert est is not None
    return est


def _build(cfg: RunConfig) -> Any:
    with Workspace(cfg.workspace) as ws:
        return execute_stage(GenerateStage(), ws, cfg, Console(quiet=True))


def _rows(root: Path, sql: str) -> list[tuple]:
    with Workspace(root) as ws:
        return ws.execute(sql)


def test_template_backend_answers_with_the_concept_and_resumes(tmp_path: Path):
    root = _workspace(tmp_path / "ws")
    cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="template"))
    stats = _build(cfg)
    assert stats.n_in == 5 and stats.n_out == 5 and stats.cost_usd == 0
    rows = _rows(root, "SELECT item_id, source, question, answer, aliases, question_type, concept, concept_tier, "
                       "image_sha256, provenance FROM items ORDER BY item_id")
    assert [r[0] for r in rows] == [f"metaclip-c{i}" for i in range(1, 6)]
    for _, source, question, answer, aliases, qtype, concept, tier, sha, prov in rows:
        assert source == "metaclip" and answer == concept and aliases == [concept]
        assert qtype in ("Who", "What", "Where") and concept.lower() not in question.lower()
        assert tier in ("head", "tail") and len(sha) == 64
        assert json.loads(prov)["generate"]["backend"] == "template"
    assert "landmark" in rows[0][2] or "place" in rows[0][2]  # the Place templates
    again = _build(cfg)
    assert again.n_out == 0 and _rows(root, "SELECT count(*) FROM items")[0][0] == 5


def _reply_for(concept: str) -> str:
    if concept == "Eiffel Tower":
        return json.dumps({"question": "What landmark is shown in this photo?", "answer": "the Eiffel Tower",
                           "aliases": ["Tour Eiffel", "La dame de fer"]})
    if concept == "Moonlight Sonata":  # names the concept in the question
        return json.dumps({"question": "What is the Moonlight Sonata's key?", "answer": "Moonlight Sonata"})
    if concept == "Golden Retriever":  # not JSON, and the repair is not JSON either
        return "Sure! Here is a great question about the dog: what breed is it?"
    if concept == "Tour de France":  # fenced JSON is fine; starts with Which -> rule
        return '```json\n{"question": "Which race is this?", "answer": "Tour de France"}\n```'
    return json.dumps({"question": "Where would you hear an opera in this city?",
                       "answer": "Zürich Opernhaus", "aliases": []})


def _responder(body: dict[str, Any]) -> str:
    first_user = next(m for m in body["messages"] if m["role"] == "user")
    text = " ".join(p.get("text", "") for p in first_user["content"] if p.get("type") == "text")
    concept = re.search(r"shows this visual concept: (.+)", text).group(1).strip()
    return _reply_for(concept)


def test_llm_backend_enforces_rules_rejects_with_reasons_and_never_repays(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FVQA_TEST_KEY", "sk-secret-test-key-123")
    root = _workspace(tmp_path / "ws")
    with FakeOpenAI(_responder) as srv:
        llm = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env="FVQA_TEST_KEY")],
                        model="fake-model", max_retries=0, backoff_base_s=0.0, price={})  # billed though on loopback
        cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm))
        est = _estimate(cfg)
        assert est is not None and est.paid_calls == 5 and est.cached == 0 and est.usd > 0
        assert srv.count("POST", "/v1/chat/completions") == 0, "an estimate spends nothing"

        stats = _build(cfg)
        first_calls = srv.count("POST", "/v1/chat/completions")
        assert first_calls == 6  # 5 concepts + one repair for the non-JSON reply
        assert stats.paid_calls == 6 and stats.cost_usd > 0 and stats.cache_hits == 0
        body = srv.chat_bodies()[0]
        parts = body["messages"][0]["content"]
        assert any(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/") for p in parts)
        assert srv.requests[0].headers.get("Authorization") == "Bearer sk-secret-test-key-123"

        items = {r[0]: r[1:] for r in _rows(root, "SELECT item_id, answer, aliases, question_type, provenance "
                                                  "FROM items")}
        assert set(items) == {"metaclip-c1", "metaclip-c5"}
        assert items["metaclip-c1"][1] == ["the Eiffel Tower", "Tour Eiffel", "La dame de fer"]
        prov = json.loads(items["metaclip-c1"][3])["generate"]
        assert prov["backend"] == "llm" and prov["model"] == "fake-model"
        assert prov["prompt"] == qa.prompt_hash(qa.DEFAULT_PROMPT)
        assert items["metaclip-c5"][2] == "Where"
        rejects = {r[0]: (r[1], r[2]) for r in _rows(root, "SELECT key, reason, detail FROM rejects "
                                                           "WHERE stage = 'generate'")}
        assert rejects["metaclip-c2"][0] == "rule_violated"
        assert rejects["metaclip-c2"][1].startswith("question must not contain the concept\n")
        assert "Moonlight Sonata's key" in rejects["metaclip-c2"][1]  # the raw reply is kept
        assert rejects["metaclip-c3"][0] == "unparseable_reply"
        assert "Here is a great question" in rejects["metaclip-c3"][1]
        assert rejects["metaclip-c4"][0] == "rule_violated"
        assert rejects["metaclip-c4"][1].startswith("question must start with Who, What or Where\n")

        again = _build(cfg)  # everything is done or rejected: no request at all
        assert srv.count("POST", "/v1/chat/completions") == first_calls
        assert again.paid_calls == 0 and again.n_out == 0

        # forgetting the stage's outputs re-runs it entirely from the response cache
        with Workspace(root) as ws:
            GenerateStage().reset(ws)
        est = _estimate(cfg)
        assert est.paid_calls == 0 and est.cached == 5 and est.usd == 0
        redo = _build(cfg)
        assert srv.count("POST", "/v1/chat/completions") == first_calls
        assert redo.n_out == 2 and redo.paid_calls == 0 and redo.cache_hits == 6
    for path in root.rglob("*"):  # the key is never written anywhere in the workspace
        if path.is_file():
            assert b"sk-secret-test-key-123" not in path.read_bytes(), path


def test_llm_backend_without_key_is_a_clear_config_error(tmp_path: Path, monkeypatch):
    from fvqa.errors import ConfigError

    monkeypatch.delenv("FVQA_UNSET_KEY", raising=False)
    root = _workspace(tmp_path / "ws")
    llm = LLMConfig(endpoints=[Endpoint(base_url="http://127.0.0.1:9/v1", api_key_env="FVQA_UNSET_KEY")])
    cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm))
    with pytest.raises(ConfigError, match="FVQA_UNSET_KEY is not set"):
        _build(cfg)
    # the estimate needs no key: it only reads the cache
    est = _estimate(cfg)
    assert est.paid_calls == 5


def test_custom_prompt_file_is_used_and_checked(tmp_path: Path):
    from fvqa.errors import ConfigError

    good = tmp_path / "p.txt"
    good.write_text("Ask about {concept} seen on {page_title}. JSON like {{\"question\": ...}}")
    assert qa.load_prompt(good).startswith("Ask about")
    msgs = qa.build_messages(qa.load_prompt(good), "Eiffel Tower", "Paris", None, None)
    assert msgs[0]["content"][0]["text"] == 'Ask about Eiffel Tower seen on Paris. JSON like {"question": ...}'
    bad = tmp_path / "bad.txt"
    bad.write_text("Ask about {concept} in {city}")
    with pytest.raises(ConfigError, match="unknown placeholder"):
        qa.load_prompt(bad)
    good.write_text("no placeholder here")
    with pytest.raises(ConfigError, match="must contain the placeholder"):
        qa.load_prompt(good)
    with pytest.raises(ConfigError, match="cannot read"):
        qa.load_prompt(tmp_path / "missing.txt")


def test_llm_batch_mode_collects_later_and_never_submits_twice(tmp_path: Path):
    root = _workspace(tmp_path / "ws")
    with FakeOpenAI(_responder, batch_polls=1) as srv:
        srv.hold_batches = True  # the batch keeps running: the first build stops waiting
        llm = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model",
                        batch=True, batch_poll_s=0.05, max_retries=0, price={})
        cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm, batch_wait_s=0.2))
        first = _build(cfg)
        assert first.n_out == 0 and first.n_rejected == 0
        assert any("5 requests still in a running batch" in n for n in first.notes)
        assert srv.count("POST", "/v1/batches") == 1 and srv.count("POST", "/v1/chat/completions") == 0

        srv.hold_batches = False
        second = _build(cfg)  # polls the same batch, merges it, pays online only for the one repair
        assert srv.count("POST", "/v1/batches") == 1 and srv.count("POST", "/v1/files") == 1
        assert srv.count("POST", "/v1/chat/completions") == 1
        assert second.n_out == 2 and second.n_rejected == 3
        assert second.paid_calls == 6 and second.cache_hits == 0
        assert second.cost_usd > 0
        assert {r[0] for r in _rows(root, "SELECT item_id FROM items")} == {"metaclip-c1", "metaclip-c5"}


KILL_SCRIPT = """
import sys
from pathlib import Path
from rich.console import Console
from fvqa.config import GenerateConfig, RunConfig
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.generate import GenerateStage
from fvqa.store import Workspace

llm = LLMConfig(endpoints=[Endpoint(base_url=sys.argv[2], api_key_env=None)], model="fake-model", max_concurrency=1)
cfg = RunConfig(workspace=Path(sys.argv[1]), batch_size=1, generate=GenerateConfig(backend="llm", llm=llm))
with Workspace(cfg.workspace) as ws:
    execute_stage(GenerateStage(), ws, cfg, Console(quiet=True))
"""


@pytest.mark.slow
def test_sigkill_mid_llm_stage_then_rerun_repeats_no_successful_request(tmp_path: Path):
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    root = _workspace(tmp_path / "ws")
    with FakeOpenAI(_responder, latency=0.4) as srv:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(root), srv.base_url],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cache = root / "cache" / "llm.sqlite"

        def stored() -> int:  # replies the running build has written to its cache so far
            try:
                with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=0.1) as con:
                    return con.execute("SELECT count(*) FROM responses WHERE ok = 1").fetchone()[0]
            except sqlite3.Error:  # not created yet, or busy
                return 0

        # Kill once two replies are stored (a 200 the server sent may not have reached the client's
        # cache yet: waiting on the server's count raced with the client's write).
        deadline = time.time() + 120
        while stored() < 2 and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert srv.count("POST", "/v1/chat/completions", status=200) < 6, "the kill should land mid-stage"

        with sqlite3.connect(cache) as con:  # replies the killed run received
            received = con.execute("SELECT count(*) FROM responses WHERE ok = 1").fetchone()[0]
        assert received >= 2
        llm = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model")
        before = srv.count("POST", "/v1/chat/completions")
        redo = _build(RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm)))
        # every reply the killed run received is reused (from the cache or its committed row), never re-paid;
        # only requests it never got an answer for are sent again
        assert redo.paid_calls == srv.count("POST", "/v1/chat/completions") - before == 6 - received
    assert {r[0] for r in _rows(root, "SELECT item_id FROM items")} == {"metaclip-c1", "metaclip-c5"}
    assert _rows(root, "SELECT count(*) FROM rejects")[0][0] == 3


def test_missing_image_file_is_a_reject_not_an_item(tmp_path: Path):
    root = _workspace(tmp_path / "ws")
    with Workspace(root) as ws:
        sha = ws.execute("SELECT image_sha256 FROM crawled WHERE concept_id = 'c2'")[0][0]
        ws.find_image(sha).unlink()
    stats = _build(RunConfig(workspace=root, generate=GenerateConfig(backend="template")))
    assert stats.n_out == 4 and stats.rejected == {"image_missing": 1}
    detail = _rows(root, "SELECT key, detail FROM rejects")
    assert detail[0][0] == "metaclip-c2" and sha in detail[0][1]


def test_transient_failure_is_retried_on_the_next_run_not_rejected(tmp_path: Path):
    from support.fake_openai import server_error

    root = _workspace(tmp_path / "ws")
    with FakeOpenAI(_responder) as srv:
        srv.inject(server_error(503))
        llm = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model",
                        max_retries=0, max_concurrency=1)
        cfg = RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm))
        first = _build(cfg)
        assert first.n_out + first.n_rejected == 4  # one concept neither emitted nor rejected...
        assert any("1 concepts not done" in n and "HTTP 503" in n for n in first.notes)  # ...but reported
        second = _build(cfg)
        assert second.n_out + second.n_rejected == 1 and second.paid_calls >= 1
    assert _rows(root, "SELECT count(*) FROM items")[0][0] + _rows(root, "SELECT count(*) FROM rejects")[0][0] == 5


def test_finished_llm_stage_needs_no_api_key(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FVQA_UNSET_KEY", raising=False)
    root = _workspace(tmp_path / "ws")
    _build(RunConfig(workspace=root, generate=GenerateConfig(backend="template")))
    llm = LLMConfig(endpoints=[Endpoint(base_url="http://127.0.0.1:9/v1", api_key_env="FVQA_UNSET_KEY")])
    again = _build(RunConfig(workspace=root, generate=GenerateConfig(backend="llm", llm=llm)))
    assert again.n_in == 5 and again.n_out == 0 and again.paid_calls == 0
