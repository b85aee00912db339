"""tag: the offline MiniLM tagger picks the right type for clear items; the llm tagger over loopback HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support.fake_openai import FakeOpenAI

from fvqa.config import RunConfig, TagConfig
from fvqa.llm.config import Endpoint, LLMConfig
from fvqa.pipelines.base import Estimate, StageContext, execute_stage
from fvqa.pipelines.tag import TagStage
from fvqa.store import Workspace
from fvqa.tagging.minilm import item_text, shared_tagger
from fvqa.tagging.taxonomy import build_taxonomy

CLEAR = [
    ("What landmark is shown in this photo?", "the Eiffel Tower in Paris", "Place"),
    ("What is the title of this piece?", "a sonata composed by Beethoven for piano", "Arts"),
    ("Who is the person in this photo?", "Serena Williams, the tennis player", "People"),
    ("What is the name of this vehicle?", "a steam locomotive built by Stephenson", "Industry"),
    ("What mineral is shown?", "quartz, a crystal of silicon dioxide", "Science"),
    ("What species is this?", "the European robin, a small songbird", "Nature"),
    ("What object is this?", "a paper lantern for the table", "Entities"),
    ("What event is pictured?", "the Rio carnival festival parade", "Events"),
]


@pytest.fixture(scope="module")
def tagger() -> Any:
    return shared_tagger(build_taxonomy(None, None))


@pytest.mark.parametrize(("question", "answer", "expected"), CLEAR)
def test_minilm_tags_clear_examples(tagger: Any, question: str, answer: str, expected: str):
    (tag,) = tagger.tag([item_text({"question": question, "answer": answer})])
    assert tag.knowledge_type == expected
    assert 0.0 < tag.confidence <= 1.0


def test_minilm_level_two_subtypes(tmp_path: Path):
    taxonomy = build_taxonomy({"Place": "places, buildings and landmarks", "Nature": "animals and plants"},
                              {"Nature": {"Birds": "birds such as robins, finches and eagles",
                                          "Trees": "trees such as oaks, pines and maples"}})
    tags = shared_tagger(taxonomy).tag(["What bird is this? a robin", "What tree is this? an old oak",
                                        "What bridge is this? the Golden Gate Bridge"])
    assert [(t.knowledge_type, t.knowledge_subtype) for t in tags] == [
        ("Nature", "Birds"), ("Nature", "Trees"), ("Place", None)]


def _items(root: Path) -> Path:
    with Workspace(root) as ws:
        ws.insert("items", [
            dict(item_id=f"i{i}", source="manual", question=q, answer=a, concept=None, entity_text=None)
            for i, (q, a, _) in enumerate(CLEAR)])
    return root


def _estimate(cfg: RunConfig) -> Estimate:
    """What `fvqa build --estimate` prints for this stage."""
    with Workspace(cfg.workspace) as ws:
        stage = TagStage()
        est = stage.estimate(StageContext(ws, cfg, stage, console=Console(quiet=True)))
    assert est is not None
    return est


def _build(cfg: RunConfig) -> Any:
    with Workspace(cfg.workspace) as ws:
        return execute_stage(TagStage(), ws, cfg, Console(quiet=True))


def _query(root: Path, sql: str) -> list[tuple]:
    with Workspace(root) as ws:
        return ws.execute(sql)


def test_minilm_stage_writes_tags_and_resumes(tmp_path: Path, tagger: Any):
    root = _items(tmp_path / "ws")
    cfg = RunConfig(workspace=root, tag=TagConfig(backend="minilm"))
    stats = _build(cfg)
    assert stats.n_in == 8 and stats.n_out == 8
    rows = {r[0]: r[1:] for r in _query(root, "SELECT item_id, knowledge_type, confidence, provenance FROM tags")}
    assert [rows[f"i{i}"][0] for i in range(8)] == [e for _, _, e in CLEAR]
    assert json.loads(rows["i0"][2])["tag"]["backend"] == "minilm"
    assert _build(cfg).n_out == 0
    assert _query(root, "SELECT count(*) FROM dataset WHERE knowledge_type IS NOT NULL")[0][0] == 8


def _tag_reply(body: dict[str, Any]) -> str:
    prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")  # the item, also on repair
    text = prompt.split("The pair:", 1)[1]  # not the taxonomy's definitions
    if "Eiffel" in text:
        return '{"knowledge_type": "Place", "confidence": 0.97}'
    if "sonata" in text:
        return '{"knowledge_type": "Music", "confidence": 0.9}'  # not in the taxonomy, twice
    if "Serena" in text:
        return "I think this is about People."
    return '{"knowledge_type": "Entities", "confidence": 0.5}'


def test_llm_tagger_rejects_unknown_types_and_never_repays(tmp_path: Path):
    root = _items(tmp_path / "ws")
    with FakeOpenAI(_tag_reply) as srv:
        llm = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="fake-model",
                        max_retries=0, price={})  # list prices although on loopback (else $0)
        cfg = RunConfig(workspace=root, tag=TagConfig(backend="llm", llm=llm))
        est = _estimate(cfg)
        assert est.paid_calls == 8 and est.cached == 0 and est.tokens > 0
        stats = _build(cfg)
        calls = srv.count("POST", "/v1/chat/completions")
        assert calls == 10  # 8 items + a repair for each of the 2 bad replies
        schema = srv.chat_bodies()[0]["response_format"]["json_schema"]["schema"]
        assert "Events" in json.dumps(schema)  # the allowed types travel in the schema
        assert stats.n_out == 6 and stats.paid_calls == 10 and stats.cost_usd > 0
        tags = dict(_query(root, "SELECT item_id, knowledge_type FROM tags"))
        assert tags["i0"] == "Place" and tags["i3"] == "Entities"
        rejects = {k: (r, d) for k, r, d in _query(root, "SELECT key, reason, detail FROM rejects")}
        assert rejects["i1"][0] == "unparseable_reply" and "Music" in rejects["i1"][1]
        assert rejects["i2"][0] == "unparseable_reply" and "I think this is about People" in rejects["i2"][1]
        assert _build(cfg).paid_calls == 0 and srv.count("POST", "/v1/chat/completions") == calls
        est = _estimate(cfg)
        assert est.paid_calls == 0 and est.usd == 0


def test_llm_subtype_must_belong_to_the_type(tmp_path: Path):
    root = _items(tmp_path / "ws")
    replies = iter(['{"knowledge_type": "Nature", "knowledge_subtype": "Bridges", "confidence": 0.8}'] +
                   ['{"knowledge_type": "Place", "knowledge_subtype": "Bridges", "confidence": 0.8}'] * 20)
    with FakeOpenAI(lambda body: next(replies)) as srv:
        llm = LLMConfig(endpoints=[Endpoint(base_url=srv.base_url, api_key_env=None)], model="m",
                        max_concurrency=1)
        cfg = RunConfig(workspace=root, tag=TagConfig(
            backend="llm", llm=llm, taxonomy={"Place": "places", "Nature": "animals and plants"},
            subtypes={"Place": {"Bridges": "bridges"}, "Nature": {"Birds": "birds"}}))
        stats = _build(cfg)
    assert stats.n_out == 7 and stats.rejected == {"subtype_mismatch": 1}
    assert set(_query(root, "SELECT DISTINCT knowledge_subtype FROM tags")) == {("Bridges",)}


def test_bad_taxonomy_is_a_config_error(tmp_path: Path):
    from fvqa.errors import ConfigError

    root = _items(tmp_path / "ws")
    cfg = RunConfig(workspace=root, tag=TagConfig(taxonomy={"Place": "places"}, subtypes={"Music": {"x": "y"}}))
    with pytest.raises(ConfigError, match="unknown knowledge types: Music"):
        _build(cfg)
