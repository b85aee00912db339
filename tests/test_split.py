"""Balancing and leakage-free splitting on small hand-built workspaces."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from support.images import picture

from fvqa.config import RunConfig, SplitConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.base import StageStats, execute_stage
from fvqa.pipelines.split import SplitStage
from fvqa.pipelines.split.balance import water_fill
from fvqa.store import Workspace

QUIET = Console(file=io.StringIO())


class Pool:
    """Items with tags and labels, inserted in one go (row-by-row DuckDB inserts are slow)."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.rows: dict[str, list[dict[str, Any]]] = {"items": [], "tags": [], "labels": []}

    def add(self, item_id: str, *, source: str = "infoseek", label: str | None = "text_search_required",
            ktype: str | None = "Arts", question: str | None = None, answer: str | None = None,
            entity: str | None = None, image: bytes | None = None) -> Pool:
        sha = self.ws.put_image(image).sha256 if image else None
        self.rows["items"].append(dict(
            item_id=item_id, source=source, question=question or f"What is special about thing {item_id}?",
            answer=answer or f"answer {item_id}", aliases=[], image_sha256=sha,
            entity_text=entity or f"entity {item_id}", concept=entity if source == "metaclip" else None))
        if ktype:
            self.rows["tags"].append(dict(item_id=item_id, knowledge_type=ktype))
        if label:
            self.rows["labels"].append(
                dict(item_id=item_id, search_label=label, probe_method="popularity-prior", probe_k=0))
        return self

    def flush(self) -> None:
        for table, rows in self.rows.items():
            self.ws.insert(table, rows)
            rows.clear()


def add_item(ws: Workspace, item_id: str, **kw: Any) -> None:
    Pool(ws).add(item_id, **kw).flush()


def run_split(ws: Workspace, **cfg: Any) -> StageStats:
    config = RunConfig(workspace=ws.root, split=SplitConfig(**cfg))
    return execute_stage(SplitStage(), ws, config, QUIET)


def splits(ws: Workspace) -> dict[str, str]:
    return dict(ws.execute("SELECT item_id, split FROM splits"))


def reason(ws: Workspace, item_id: str) -> str:
    (prov,), = ws.execute("SELECT provenance FROM splits WHERE item_id = ?", [item_id])
    return json.loads(prov)["split"].get("reason", "")


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    with Workspace(tmp_path / "ws") as w:
        yield w


# -- water filling -------------------------------------------------------------------------------

def test_water_fill_exact_when_supply_allows_and_moves_deficit_to_other_cells():
    assert water_fill(12, {"a": 10, "b": 10, "c": 10}) == {"a": 4, "b": 4, "c": 4}
    assert water_fill(12, {"a": 1, "b": 10, "c": 10}) == {"a": 1, "b": 5, "c": 6}
    assert water_fill(12, {"a": 1, "b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}  # short: supply 6
    assert water_fill(0, {"a": 3}) == {"a": 0} and water_fill(5, {}) == {}


@given(st.integers(0, 300), st.dictionaries(st.text(min_size=1, max_size=3), st.integers(0, 80), max_size=8))
def test_water_fill_properties(quota: int, supply: dict[str, int]):
    alloc = water_fill(quota, supply)
    assert sum(alloc.values()) == min(quota, sum(supply.values()))
    assert all(0 <= alloc[c] <= supply[c] for c in supply)
    open_cells = [alloc[c] for c in supply if alloc[c] < supply[c]]
    if open_cells:  # max-min fair: cells with spare differ by at most one, and no capped cell gets more
        assert max(open_cells) - min(open_cells) <= 1
        assert all(alloc[c] <= min(open_cells) + 1 for c in supply)


# -- balancing -----------------------------------------------------------------------------------

def _pool(ws: Workspace, n_free: int, n_req: int) -> None:
    labels = ["image_search_required", "text_search_required", "mixed_search_required"]
    pool, i = Pool(ws), 0
    for kt in ("Arts", "Place"):
        for src in ("infoseek", "metaclip"):
            for _ in range(n_free):
                pool.add(f"{src}-{kt}-free-{i}", source=src, ktype=kt, label="search_free")
                i += 1
            for j in range(n_req):
                pool.add(f"{src}-{kt}-req-{i}", source=src, ktype=kt, label=labels[j % 3])
                i += 1
    pool.flush()


def test_balance_hits_exact_targets_evenly_per_cell(ws: Workspace):
    _pool(ws, n_free=8, n_req=12)  # 4 cells x 20
    stats = run_split(ws, train_size=40, train_search_required=28, train_search_free=12,
                      test_per_source={"infoseek": 6, "metaclip": 6})
    rows = {r[0]: r[1:] for r in ws.execute(
        "SELECT item_id, split, search_label, knowledge_type, source FROM dataset")}
    train = [v for v in rows.values() if v[0] == "train"]
    test = [v for v in rows.values() if v[0] == "test"]
    assert Counter(v[1] == "search_free" for v in train) == {True: 12, False: 28}
    assert Counter(v[3] for v in test) == {"infoseek": 6, "metaclip": 6}
    free_cells = Counter((v[2], v[3]) for v in train if v[1] == "search_free")
    assert sorted(free_cells.values()) == [3, 3, 3, 3]  # stratified by knowledge type x source
    req_cells = Counter((v[2], v[3]) for v in train if v[1] != "search_free")
    assert sorted(req_cells.values()) == [7, 7, 7, 7]
    assert len({v[1] for v in train if v[1] != "search_free"}) == 3  # fine labels mixed within cells
    assert "train/search_free: 12/12" in stats.notes and not any("SHORT" in n for n in stats.notes)
    # every considered item has a row; the rest say why they were left out
    assert Counter(s for s, *_ in rows.values()) == {"train": 40, "test": 12, "unassigned": 28}
    left = [i for i, v in rows.items() if v[0] == "unassigned"]
    assert all("reached its quota" in reason(ws, i) for i in left)


def test_balance_reports_short_cells_and_takes_what_exists(ws: Workspace):
    _pool(ws, n_free=2, n_req=12)
    add_item(ws, "manual-1", source="manual", label="search_free")
    stats = run_split(ws, train_size=40, train_search_required=28, train_search_free=12,
                      test_per_source={"metaclip": 2, "manual": 5})
    text = "\n".join(stats.notes)
    assert "test/manual: 1/5 (SHORT by 4" in text
    free_in_test = ws.execute("SELECT count(*) FROM dataset WHERE split = 'test' AND search_label = 'search_free' "
                              "AND source <> 'manual'")[0][0]
    free_left = 8 - free_in_test
    assert f"train/search_free: {free_left}/12 (SHORT by {12 - free_left}" in text
    assert "cells below even share" in text and "search_free/Arts/infoseek 2/3.0" in text
    assert stats.extra["cells"]["train/search_required"][0]["target"] == 7.0
    assert Counter(splits(ws).values())["train"] == 28 + free_left


def test_seeded_and_rerun_keeps_assignments(ws: Workspace, tmp_path: Path):
    _pool(ws, n_free=6, n_req=6)
    cfg = dict(train_size=20, train_search_required=12, train_search_free=8, test_per_source={"infoseek": 4})
    run_split(ws, **cfg)
    first = splits(ws)
    stats = run_split(ws, **cfg)
    assert splits(ws) == first and stats.n_in == 0
    with Workspace(tmp_path / "other") as other:
        _pool(other, n_free=6, n_req=6)
        run_split(other, **cfg)
        assert splits(other) == first  # same data + seed -> same split


# -- exclusions ----------------------------------------------------------------------------------

def test_unanswerable_and_contaminated_items_are_rejected_unlabelled_wait(ws: Workspace, tmp_path: Path):
    add_item(ws, "a-1", label="unanswerable")
    add_item(ws, "a-2", label=None)
    add_item(ws, "a-3", question="Which river flows past this tower?", answer="Seine")
    add_item(ws, "a-4")
    bench = tmp_path / "bench.jsonl"
    bench.write_text(json.dumps({"question": "which river flows past this TOWER", "answer": "the Seine"}) + "\n")
    stats = run_split(ws, train_size=3, train_search_required=3, train_search_free=0, test_per_source={},
                      contamination_files=[bench])
    rejects = {k: (r, d) for k, r, d in ws.execute("SELECT key, reason, detail FROM rejects WHERE stage='split'")}
    assert rejects["a-1"][0] == "unanswerable"
    assert "a-2" not in rejects  # no label yet: it waits (see the waiting tests below), it is not rejected
    assert any("1 item(s) waiting for label" in n for n in stats.notes)
    assert rejects["a-3"][0] == "benchmark_contamination" and "bench.jsonl" in rejects["a-3"][1]
    assert splits(ws) == {"a-4": "train"} and stats.n_rejected == 2


def test_unreadable_contamination_file_is_a_config_error(ws: Workspace, tmp_path: Path):
    add_item(ws, "a-1")
    bad = tmp_path / "bench.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match="cannot read"):
        run_split(ws, train_size=1, train_search_required=1, train_search_free=0, contamination_files=[bad])
    with pytest.raises(ConfigError, match="not found"):
        run_split(ws, train_size=1, train_search_required=1, train_search_free=0,
                  contamination_files=[tmp_path / "missing.parquet"])


def test_config_requires_train_parts_to_add_up():
    with pytest.raises(ValueError, match="must equal train_size"):
        SplitConfig(train_size=10, train_search_required=5, train_search_free=4)


# -- leakage guards ------------------------------------------------------------------------------

def test_planted_leaks_never_cross_the_split(ws: Workspace):
    """Every metaclip item has an infoseek twin linked by entity, near-duplicate image or question;
    test takes metaclip items only, so each twin must be held out of train with the reason."""
    pool = Pool(ws)
    for i in range(12):
        kind = ("entity", "image", "question")[i % 3]
        pool.add(f"mc-{i}", source="metaclip", entity=f"Kalo tower {i}", image=picture(500 + i, quality=95),
                 question=f"Who built this tower number {i}?", answer=f"Builder {i}", label="search_free")
        pool.add(f"is-{i}", source="infoseek",
                 entity=f"Kalo Tower {i}" if kind == "entity" else f"other {i}",
                 image=picture(500 + i, quality=40) if kind == "image" else picture(900 + i),
                 question=f"who built this tower number {i}" if kind == "question" else f"Where is place {i}?",
                 answer=f"builder {i}" if kind == "question" else f"somewhere {i}", label="search_free")
    for i in range(6):  # unlinked filler so train has something to take
        pool.add(f"fill-{i}", label="search_free", image=picture(100 + i))
    pool.flush()
    stats = run_split(ws, train_size=30, train_search_required=0, train_search_free=30,
                      test_per_source={"metaclip": 12})
    got = splits(ws)
    assert all(got[f"mc-{i}"] == "test" for i in range(12))
    assert all(got[f"is-{i}"] == "unassigned" for i in range(12))
    assert all(got[f"fill-{i}"] == "train" for i in range(6))
    assert stats.extra["leaks"] == 0 and stats.extra["near_duplicate_pairs"] >= 4
    assert "shares entity/concept 'kalo tower 0'" in reason(ws, "is-0")
    assert "near-duplicate image" in reason(ws, "is-1") and "test item mc-1" in reason(ws, "is-1")
    assert "same normalised question" in reason(ws, "is-2")


def test_new_items_respect_sides_of_existing_assignments(ws: Workspace):
    add_item(ws, "old-1", source="import", entity="Zen lantern")
    ws.insert("splits", [dict(item_id="old-1", split="test", provenance="{}")])
    add_item(ws, "new-1", entity="zen lantern")  # same entity as an existing test item
    add_item(ws, "new-2")
    run_split(ws, train_size=2, train_search_required=2, train_search_free=0, test_per_source={})
    got = splits(ws)
    assert got == {"old-1": "test", "new-1": "unassigned", "new-2": "train"}
    assert "test item old-1" in reason(ws, "new-1")


def test_near_duplicate_threshold_is_configurable(ws: Workspace):
    add_item(ws, "mc-1", source="metaclip", image=picture(7, quality=95), entity="one")
    add_item(ws, "is-1", source="infoseek", image=picture(7, quality=40), entity="two")
    run_split(ws, train_size=1, train_search_required=1, train_search_free=0,
              test_per_source={"metaclip": 1}, phash_distance=-1)
    assert splits(ws) == {"mc-1": "test", "is-1": "train"}  # guard off: the pair crosses (documented)


# -- waiting for tags and labels -----------------------------------------------------------------

def _leaks(ws: Workspace) -> list[tuple[str, str]]:
    """(train, test) pairs sharing an entity: the planted links of the waiting tests below."""
    rows = ws.execute("SELECT d.item_id, d.split, lower(i.entity_text) FROM dataset d JOIN items i USING (item_id)")
    by_entity: dict[str, dict[str, list[str]]] = {}
    for iid, split, ent in rows:
        by_entity.setdefault(ent, {}).setdefault(split, []).append(iid)
    return [(a, b) for sides in by_entity.values() for a in sides.get("train", []) for b in sides.get("test", [])]


def test_untagged_items_wait_and_a_rerun_after_tagging_assigns_them_balanced(ws: Workspace):
    cfg = dict(train_size=32, train_search_required=16, train_search_free=16, test_per_source={"infoseek": 8})
    pool, tags_later = Pool(ws), []
    for kt in ("Arts", "Place"):
        for j in range(32):
            iid, pair = f"{kt}-{j}", j // 2
            untagged = j % 2 == 1  # half of every cell has no tag yet
            # every untagged item shares its entity with a tagged one (a leakage link across the wait)
            label = "search_free" if pair % 2 == 0 else ("text_search_required", "image_search_required")[pair % 4 // 2]
            pool.add(iid, ktype=None if untagged else kt, entity=f"entity {kt} {pair}", label=label)
            if untagged:
                tags_later.append(dict(item_id=iid, knowledge_type=kt))
    pool.flush()
    first = run_split(ws, **cfg)
    got = splits(ws)
    waiting = {t["item_id"] for t in tags_later}
    assert not waiting & set(got) and len(got) == 32  # untagged: no row (and no reject) yet
    assert first.extra["waiting"] == {"label": 0, "tag": 32} and first.n_rejected == 0
    assert any("32 item(s) waiting for tag" in n for n in first.notes)
    assert "untagged" not in json.dumps(first.extra["cells"])
    assert any("SHORT" in n for n in first.notes)  # the tagged half alone cannot fill train

    ws.insert("tags", tags_later)  # the tag stage catches up
    second = run_split(ws, **cfg)
    got = splits(ws)
    assert set(got) == {f"{kt}-{j}" for kt in ("Arts", "Place") for j in range(32)}
    assert second.n_in == 32 and second.extra["waiting"] == {"label": 0, "tag": 0}
    assert "untagged" not in json.dumps(second.extra["cells"])
    rows = ws.execute("SELECT split, search_label, knowledge_type FROM dataset")
    # quotas reached over both runs, each knowledge type evenly, and no link crosses the split
    test = [r for r in rows if r[0] == "test"]
    train = [r for r in rows if r[0] == "train"]
    assert len(test) == 8 and Counter(r[2] for r in test) == {"Arts": 4, "Place": 4}
    assert Counter(r[1] == "search_free" for r in train) == {True: 16, False: 16}
    assert Counter(r[2] for r in train) == {"Arts": 16, "Place": 16}
    assert second.extra["assigned"]["train"] > 0 and not any("SHORT" in n for n in second.notes)
    assert _leaks(ws) == [] and second.extra["leaks"] == 0
    assert run_split(ws, **cfg).n_in == 0  # done: nothing waits any more


def test_without_a_tag_stage_untagged_items_are_split_at_once(ws: Workspace):
    for i in range(4):
        add_item(ws, f"u-{i}", ktype=None)
    config = RunConfig(workspace=ws.root, split=SplitConfig(train_size=4, train_search_required=4,
                                                            train_search_free=0, test_per_source={}),
                       tag={"enabled": False})
    stats = execute_stage(SplitStage(), ws, config, QUIET)
    assert Counter(splits(ws).values()) == {"train": 4} and stats.extra["waiting"]["tag"] == 0
    # ... and so are items the tag stage rejected (they will never get a tag)
    add_item(ws, "r-1", ktype=None)
    ws.reject("tag", "r-1", "no_text")
    stats = run_split(ws, train_size=5, train_search_required=5, train_search_free=0, test_per_source={})
    assert splits(ws)["r-1"] == "train" and stats.extra["waiting"]["tag"] == 0


def test_unlabelled_items_wait_for_the_probe(ws: Workspace):
    add_item(ws, "l-1", label=None)
    add_item(ws, "l-2")
    cfg = dict(train_size=2, train_search_required=2, train_search_free=0, test_per_source={})
    stats = run_split(ws, **cfg)
    assert splits(ws) == {"l-2": "train"} and stats.extra["waiting"]["label"] == 1
    assert ws.rejected_keys("split") == set()
    ws.insert("labels", [dict(item_id="l-1", search_label="text_search_required", probe_method="popularity-prior")])
    run_split(ws, **cfg)
    assert splits(ws) == {"l-1": "train", "l-2": "train"}
