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
