"""Search-need labels: the rollout rule on hand-made rollout sets, the popularity prior, model probes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fvqa.config import ProbeConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.base import StageStats, execute_stage
from fvqa.pipelines.probe import ProbeStage
from fvqa.pipelines.probe_labels import RolloutOutcome, label_from_rollouts, prior_probabilities
from fvqa.schema import SearchLabel
from fvqa.store import Workspace

QUIET = Console(file=io.StringIO())


def R(correct: bool, image: bool = False, text: bool = False) -> RolloutOutcome:
    return RolloutOutcome(correct, image, text)


@pytest.mark.parametrize(
    ("rollouts", "label"),
    [
        ([R(False), R(False, image=True), R(False, image=True, text=True)], SearchLabel.unanswerable),
        ([], SearchLabel.unanswerable),
        ([R(True), R(False, image=True)], SearchLabel.search_free),
        # a search-enabled rollout that answered without calling a tool counts as search-free
        ([R(False), R(True, image=True), R(True)], SearchLabel.search_free),
        ([R(False), R(True, image=True), R(False, text=True)], SearchLabel.image_search_required),
        ([R(False), R(True, text=True), R(True, text=True)], SearchLabel.text_search_required),
        ([R(False), R(True, image=True, text=True)], SearchLabel.mixed_search_required),
        # correct rollouts that disagree (one image-only, one text-only) also need both tools
        ([R(True, image=True), R(True, text=True)], SearchLabel.mixed_search_required),
    ],
)
def test_label_from_rollouts(rollouts: list[RolloutOutcome], label: SearchLabel):
    assert label_from_rollouts(rollouts) is label


def _ws_with_items(root: Path, items: list[dict[str, Any]]) -> Workspace:
    ws = Workspace(root)
    base = dict(aliases=[], concept=None, concept_count=None, entity_text=None, image_sha256=None)
    ws.insert("items", [{**base, **it} for it in items])  # same keys in every row (arrow infers from row 1)
    return ws


def run_probe(ws: Workspace, **cfg: Any) -> StageStats:
    config = RunConfig(workspace=ws.root, probe=ProbeConfig(**cfg))
    return execute_stage(ProbeStage(), ws, config, QUIET)


def test_popularity_prior_labels_by_tier_and_question_kind(tmp_path: Path):
    counts = tmp_path / "entry_counts.json"
    counts.write_text(json.dumps({"Ixora finch": 50, "Zen lantern": 5_000}))
    items = [
        dict(item_id="mc-head", source="metaclip", question="What is this?", answer="Kalo tower", concept="Kalo tower",
             concept_count=90_000),
        dict(item_id="mc-tail", source="metaclip", question="What is this?", answer="Brimo tower",
             concept="Brimo tower", concept_count=12),
        dict(item_id="is-torso", source="infoseek", question="Which country?", answer="Peru", entity_text="Zen lantern"),
        dict(item_id="is-table", source="infoseek", question="Which year?", answer="1901", entity_text="Sol sonata"),
        dict(item_id="is-file-tail", source="infoseek", question="Weight?", answer="3", entity_text="Ixora Finch"),
        dict(item_id="is-unknown", source="infoseek", question="Who made it?", answer="Mo Ra", entity_text="Nobody"),
    ]
    with _ws_with_items(tmp_path / "ws", items) as ws:
        ws.insert("concepts", [dict(concept_id="c1", concept="Sol Sonata", count=30_000, tier="head")])
        stats = run_probe(ws, counts_path=counts)
        rows = {r[0]: r[1:] for r in ws.execute(
            "SELECT item_id, search_label, p_direct, p_search, probe_method, provenance FROM labels")}
        assert ws.count("probe_rollouts") == 0
    assert {k: v[0] for k, v in rows.items()} == {
        "mc-head": "search_free",
        "mc-tail": "image_search_required",
        "is-torso": "text_search_required",
        "is-table": "search_free",
        "is-file-tail": "mixed_search_required",
        "is-unknown": "mixed_search_required",
    }
    for label, p_direct, p_search, method, prov in rows.values():
        assert method == "popularity-prior" and json.loads(prov)["probe"]["method"] == "popularity-prior"
        assert (p_direct > 0.5) == (label == "search_free") and p_search >= p_direct
    assert json.loads(rows["is-table"][4])["probe"]["count_source"] == "concepts"
    assert json.loads(rows["is-unknown"][4])["probe"]["count"] is None
    assert any("POPULARITY PRIOR" in n for n in stats.notes)
    assert any("1 item(s) had no popularity count" in n for n in stats.notes)


def test_prior_probability_crosses_half_at_the_head_threshold():
    below, _ = prior_probabilities(19_000, 20_000, SearchLabel.text_search_required)
    above, _ = prior_probabilities(21_000, 20_000, SearchLabel.search_free)
    assert below < 0.5 < above


def test_labels_from_two_methods_are_never_mixed(tmp_path: Path):
    items = [dict(item_id=f"i{n}", source="infoseek", question="q?", answer="a") for n in range(2)]
    with _ws_with_items(tmp_path / "ws", items) as ws:
        ws.insert("labels", [dict(item_id="i0", search_label="search_free", probe_method="rollouts:openai:gpt-4o")])
        with pytest.raises(ConfigError, match="never mixed.*--force probe"):
            run_probe(ws)
        assert ws.count("labels") == 1
        ProbeStage().reset(ws)  # what `--force probe` does
        run_probe(ws)
        assert {m for (m,) in ws.execute("SELECT probe_method FROM labels")} == {"popularity-prior"}


def test_missing_counts_file_is_a_config_error(tmp_path: Path):
    with _ws_with_items(tmp_path / "ws", [dict(item_id="x", source="infoseek", question="q", answer="a")]) as ws:
        with pytest.raises(ConfigError, match="probe.counts_path not found"):
            run_probe(ws, counts_path=tmp_path / "nope.json")


# -- model probe over a loopback OpenAI-compatible server -------------------------------------------

class StubTools:
    """Search that always finds the entity's page (the probe, not retrieval, is under test)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def image_search(self, image: bytes, **_: Any) -> list:
        from fvqa.protocol import ImageHit

        self.calls.append("image")
        return [ImageHit(title="Kalo tower - Wikipedia", url="http://demo/kalo")]

    def text_search(self, query: str, question: str = "", **_: Any) -> list:
        from fvqa.protocol import TextHit

        self.calls.append("text")
        return [TextHit(url="http://demo/kalo", title="Kalo tower", summary="Kalo tower was built by Ur Sta.")]


def probe_model(body: dict[str, Any]) -> str:
    """A scripted VLM: knows 'known' items directly; finds 'image' items by image search, 'text' ones by
    text search; never answers 'hopeless' ones."""
    from support.fake_openai import last_user_text

    first = body["messages"][0]["content"]
    first_text = " ".join(p.get("text", "") for p in first if p.get("type") == "text")
    direct = "from your own knowledge" in first_text
    n_turns = sum(m["role"] == "assistant" for m in body["messages"])
    kind = first_text.rsplit("#", 1)[-1].strip()
    if kind == "known":
        return "<reason>I know this.</reason><answer>Ur Sta</answer>"
    if direct or kind == "hopeless":
        return "<reason>Guess.</reason><answer>Someone</answer>"
    if n_turns == 0:
        return ("<reason>Unknown.</reason><search><img>" if kind == "image"
                else "<reason>Look up.</reason><text_search>Kalo tower builder")  # stop strings cut
    if kind == "image":
        assert "Kalo tower - Wikipedia" in last_user_text(body)
    return "<reason>Found it.</reason><answer>ur sta</answer>"


def test_model_probe_labels_from_rollouts_and_keeps_every_rollout(tmp_path: Path, monkeypatch):
    from support.fake_openai import FakeOpenAI
    from support.images import picture

    import fvqa.search.tools

    stub = StubTools()
    monkeypatch.setattr(fvqa.search.tools, "make_search_tools", lambda *a, **kw: stub)
    kinds = ["known", "image", "text", "hopeless"]
    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(probe_model) as srv:
        shas = [ws.put_image(picture(n)).sha256 for n in range(len(kinds))]
        ws.insert("items", [dict(item_id=f"it-{k}", source="infoseek", question=f"Who built this? #{k}",
                                 answer="Ur Sta", aliases=["Ur Sta"], image_sha256=sha, concept=None,
                                 concept_count=None, entity_text=None) for k, sha in zip(kinds, shas, strict=True)])
        llm = {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "fake-model",
               "max_retries": 0}
        stats = run_probe(ws, backend="openai", k=2, llm=llm)
        labels = {r[0]: r[1:] for r in ws.execute(
            "SELECT item_id, search_label, p_direct, p_search, probe_k, probe_method FROM labels")}
        rollouts = ws.execute("SELECT item_id, mode, rollout, correct, used_image_search, used_text_search, "
                              "trajectory FROM probe_rollouts ORDER BY ALL")
        calls = srv.count("POST", "/v1/chat/completions")
        tool_calls = list(stub.calls)
        # a re-run does nothing; a forced re-run is served entirely from the cache (no repeated paid call)
        run_probe(ws, backend="openai", k=2, llm=llm)
        ProbeStage().reset(ws)
        again = run_probe(ws, backend="openai", k=2, llm=llm)
        assert srv.count("POST", "/v1/chat/completions") == calls
        assert again.cache_hits == calls and ws.count("probe_rollouts") == len(rollouts)
    assert {k: v[0] for k, v in labels.items()} == {
        "it-known": "search_free", "it-image": "image_search_required",
        "it-text": "text_search_required", "it-hopeless": "unanswerable"}
    assert labels["it-known"][1:4] == (1.0, 1.0, 2) and labels["it-image"][1:3] == (0.0, 1.0)
    assert {v[4] for v in labels.values()} == {"rollouts:openai:fake-model"}
    assert len(rollouts) == 4 * 2 * 2
    img = [r for r in rollouts if r[0] == "it-image" and r[1] == "search"]
    assert all(r[3] and r[4] and not r[5] for r in img)
    traj = json.loads(img[0][6])
    assert [t["kind"] for t in traj["turns"]] == ["image_search", "answer"] and traj["answer"] == "ur sta"
    assert traj["seed"] != json.loads(img[1][6])["seed"]  # k distinct sampled rollouts
    assert tool_calls.count("image") == 2 and tool_calls.count("text") == 2
    assert any("unanswerable" in n for n in stats.notes)


def test_model_probe_rejects_items_whose_calls_fail(tmp_path: Path, monkeypatch):
    from support.fake_openai import FakeOpenAI, Reply, error_body
    from support.images import picture

    import fvqa.search.tools

    monkeypatch.setattr(fvqa.search.tools, "make_search_tools", lambda *a, **kw: StubTools())
    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(lambda b: Reply(400, error_body("model not found"))) as srv:
        sha = ws.put_image(picture(1)).sha256
        ws.insert("items", [dict(item_id="a", source="infoseek", question="q", answer="x", aliases=[],
                                 image_sha256=sha, concept=None, concept_count=None, entity_text=None),
                            dict(item_id="b", source="infoseek", question="q", answer="x", aliases=[],
                                 image_sha256=None, concept=None, concept_count=None, entity_text=None)])
        llm = {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "m", "max_retries": 0}
        stats = run_probe(ws, backend="openai", k=1, llm=llm)
        rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'probe'"))
    assert rejects == {"a": "model_call_failed", "b": "image_missing"}
    assert stats.n_out == 0


def test_transient_failures_defer_items_and_the_next_run_makes_only_missing_rollouts(tmp_path: Path, monkeypatch):
    """30% of first attempts fail with a 503 (no client retries): the run keeps every successful rollout,
    labels only complete items, rejects nothing; the next run — with the response cache deleted, so only
    the kept rollouts can prevent repeats — starts exactly the missing rollouts, and its labels equal
    those of a run that never saw a fault."""
    import hashlib
    import shutil

    from support.fake_openai import FakeOpenAI, Reply, error_body
    from support.images import picture

    import fvqa.search.tools

    monkeypatch.setattr(fvqa.search.tools, "make_search_tools", lambda *a, **kw: StubTools())
    faults = {"on": True}

    def flaky(body: dict[str, Any]) -> Any:
        key = json.dumps(body, sort_keys=True)
        if faults["on"] and hashlib.sha256(key.encode()).digest()[0] < 77:  # ~30% of distinct requests
            return Reply(503, error_body("overloaded", "server_error"))
        return probe_model(body)

    def first_turns(bodies: list[dict[str, Any]]) -> int:
        return sum(1 for b in bodies if not any(m["role"] == "assistant" for m in b["messages"]))

    kinds = ["known", "image", "text", "hopeless"] * 3
    items = [dict(item_id=f"it{n}-{k}", source="infoseek", question=f"Who built this? #{k}", answer="Ur Sta",
                  aliases=[], concept=None, concept_count=None, entity_text=None) for n, k in enumerate(kinds)]

    def fill(ws: Workspace) -> None:
        shas = [ws.put_image(picture(n)).sha256 for n in range(len(items))]
        ws.insert("items", [dict(it, image_sha256=sha) for it, sha in zip(items, shas, strict=True)])

    def labels_of(ws: Workspace) -> dict[str, str]:
        return dict(ws.execute("SELECT item_id, search_label FROM labels"))

    with Workspace(tmp_path / "clean") as ws, FakeOpenAI(probe_model) as srv:
        fill(ws)
        llm = {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "fake-model",
               "max_retries": 0}
        run_probe(ws, backend="openai", k=2, llm=llm)
        expected = labels_of(ws)
    with Workspace(tmp_path / "ws") as ws, FakeOpenAI(flaky) as srv:
        fill(ws)
        llm = {"endpoints": [{"base_url": srv.base_url, "api_key_env": None}], "model": "fake-model",
               "max_retries": 0}
        first = run_probe(ws, backend="openai", k=2, llm=llm)
        failed = srv.count("POST", "/v1/chat/completions", status=503)
        kept = ws.count("probe_rollouts")
        n_labelled = ws.count("labels")
        assert failed > 0 and 0 < n_labelled < len(items) and ws.count("rejects") == 0
        assert kept > 0 and any("deferred" in n for n in first.notes)
        shutil.rmtree(ws.cache_dir / "llm")
        faults["on"] = False
        srv.reset_records()
        second = run_probe(ws, backend="openai", k=2, llm=llm)
        assert first_turns(srv.chat_bodies()) == len(items) * 2 * 2 - kept  # only the missing rollouts
        assert any("resumed" in n for n in second.notes)
        assert labels_of(ws) == expected and ws.count("rejects") == 0
        assert ws.count("probe_rollouts") == len(items) * 2 * 2
        assert second.n_in == len(items) - n_labelled


def test_model_backend_config_errors_are_clear(tmp_path: Path):
    with _ws_with_items(tmp_path / "ws", [dict(item_id="x", source="infoseek", question="q", answer="a")]) as ws:
        with pytest.raises(ConfigError, match="needs a probe.llm section"):
            run_probe(ws, backend="openai")
        with pytest.raises(ConfigError, match="needs probe.model_path"):
            run_probe(ws, backend="transformers")
