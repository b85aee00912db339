"""concepts: tiers, seeded head/tail sampling, filters with reasons, list and dict counts, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from fvqa.config import ConceptsConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.concepts import ConceptsStage
from fvqa.store import Workspace

ENTRIES = ["golden gate bridge", "tabby cat", "red panda", "42", "...", "ox", "Tabby Cat", "eiffel tower",
           "quokka", "axolotl", "fennec fox", "narwhal", "dodo bird", "okapi", 7, "x" * 150, "spam word"]
COUNTS = [90_000, 50_000, 20_000, 80_000, 70_000, 60_000, 40_000, 30_000,
          19_999, 500, 12, 1, 0, 0, 5, 3, 25_000]


def _run(tmp_path: Path, counts: object, ws_name: str = "ws", **cfg: object) -> tuple[Workspace, object]:
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(ENTRIES))
    counts_path = tmp_path / "counts.json"
    counts_path.write_text(json.dumps(counts))
    config = RunConfig(workspace=tmp_path / ws_name, concepts=ConceptsConfig(
        metadata_path=meta, counts_path=counts_path, **cfg))
    ws = Workspace(config.workspace)
    stats = execute_stage(ConceptsStage(), ws, config, Console(quiet=True))
    return ws, stats


def _rows(ws: Workspace) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in ws.execute("SELECT concept, entry_id, count, tier, concept_id FROM concepts")}


def test_tiers_filters_and_reasons_with_list_counts(tmp_path: Path):
    deny = tmp_path / "deny.txt"
    deny.write_text("Spam Word\n")
    ws, stats = _run(tmp_path, COUNTS, n=100, head_fraction=0.5, zero_fraction=0.5, deny_list=deny)
    with ws:
        rows = _rows(ws)
        rejects = {r[0]: (r[1], r[2]) for r in ws.execute("SELECT key, reason, detail FROM rejects")}
    # head = count >= 20,000 (t), tail = 0 < count < t, zero = never matched
    assert rows["golden gate bridge"][1:3] == (90_000, "head")
    assert rows["red panda"][1:3] == (20_000, "head")
    assert rows["quokka"][1:3] == (19_999, "tail")
    assert rows["narwhal"][1:3] == (1, "tail")
    assert rows["okapi"][1:3] == (0, "zero")
    assert rows["tabby cat"][3] == "metaclip-000001" and rows["tabby cat"][0] == 1
    assert rejects == {
        "entry-3": ("no_letters", "entry 3: '42'"),
        "entry-4": ("no_letters", "entry 4: '...'"),
        "entry-5": ("too_short", "entry 5: 'ox'"),
        "entry-6": ("duplicate_entry", "entry 6 'Tabby Cat' repeats entry 1"),
        "entry-14": ("wrong_type", "entry 14: '7'"),
        "entry-15": ("too_long", f"entry 15: {'x' * 150!r}"),
        "entry-16": ("on_deny_list", "entry 16: 'spam word'"),
    }
    assert stats.rejected["no_letters"] == 2 and stats.n_in == len(ENTRIES)
    assert stats.extra["population"] == {"head": 4, "tail": 4, "zero": 2}
    assert stats.n_out == 10  # asked for 100: everything usable, with a note saying so
    assert any("asked 50, only 4" in n for n in stats.notes)


def test_sampling_is_seeded_and_proportional_with_dict_counts(tmp_path: Path):
    entries = [f"concept number {chr(97 + i % 26)}{i}" for i in range(400)]
    counts = {e: (100_000 - i if i < 100 else (i if i < 380 else 0)) for i, e in enumerate(entries)}
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps(entries))

    def sample(seed: int, name: str) -> dict:
        path = tmp_path / "c.json"
        path.write_text(json.dumps(counts))
        config = RunConfig(workspace=tmp_path / name, concepts=ConceptsConfig(
            metadata_path=meta, counts_path=path, n=40, head_fraction=0.25, seed=seed))
        with Workspace(config.workspace) as ws:
            execute_stage(ConceptsStage(), ws, config, Console(quiet=True))
            return {r[0]: r[1] for r in ws.execute("SELECT concept, tier FROM concepts")}

    a, b, c = sample(0, "a"), sample(0, "b"), sample(1, "c")
    assert a == b and a != c
    assert sorted(a.values()).count("head") == 10 and sorted(a.values()).count("tail") == 30
    assert "zero" not in a.values()
    assert all(counts[k] >= 20_000 for k, t in a.items() if t == "head")


def test_allow_list_and_resume_adds_only_missing(tmp_path: Path):
    allow = tmp_path / "allow.txt"
    allow.write_text("quokka\nAxolotl\nokapi\n")
    ws, stats = _run(tmp_path, dict(zip([e for e in ENTRIES if isinstance(e, str)], COUNTS, strict=False)),
                     n=10, head_fraction=0.0, zero_fraction=0.5, allow_list=allow)
    with ws:
        assert set(_rows(ws)) == {"quokka", "axolotl", "okapi"}
        assert stats.rejected["not_on_allow_list"] == 9
        ws.execute("DELETE FROM concepts WHERE concept = 'okapi'")  # as if killed before this row committed
        config = RunConfig(workspace=ws.root, concepts=ConceptsConfig(
            metadata_path=tmp_path / "metadata.json", counts_path=tmp_path / "counts.json", n=10,
            head_fraction=0.0, zero_fraction=0.5, allow_list=allow))
        again = execute_stage(ConceptsStage(), ws, config, Console(quiet=True))
        assert again.n_out == 1 and set(_rows(ws)) == {"quokka", "axolotl", "okapi"}
        assert ws.count("rejects") == 14  # 9 not on the allow list + 5 other filters; none stored twice


def test_bad_inputs_are_clear_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="must align"):
        _run(tmp_path, [1, 2, 3])
    with pytest.raises(ConfigError, match="list aligned with the entries or a dict"):
        _run(tmp_path, "nope", ws_name="ws2")
    with pytest.raises(ConfigError, match="no `entry_counts` table"):
        meta = tmp_path / "metadata.json"
        config = RunConfig(workspace=tmp_path / "ws3", concepts=ConceptsConfig(metadata_path=meta,
                                                                                use_match_counts=True))
        with Workspace(config.workspace) as ws:
            execute_stage(ConceptsStage(), ws, config, Console(quiet=True))


def test_counts_from_the_match_stage_table(tmp_path: Path):
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps(ENTRIES))
    config = RunConfig(workspace=tmp_path / "ws", concepts=ConceptsConfig(
        metadata_path=meta, use_match_counts=True, n=3, head_fraction=1.0))
    with Workspace(config.workspace) as ws:
        ws.execute("CREATE TABLE entry_counts (entry_id BIGINT, count BIGINT)")
        ws.execute("INSERT INTO entry_counts VALUES (9, 25000), (10, 30000), (11, 5)")
        execute_stage(ConceptsStage(), ws, config, Console(quiet=True))
        rows = _rows(ws)
        prov = json.loads(ws.execute("SELECT provenance FROM concepts LIMIT 1")[0][0])
    assert {k: v[1] for k, v in rows.items() if v[2] == "head"} == {"axolotl": 25000, "fennec fox": 30000}
    assert prov["concepts"]["counts"] == "match:entry_counts"


def test_demo_world_categories(tmp_path: Path, demo_world: Path):
    config = RunConfig(workspace=tmp_path / "ws", world={"path": demo_world},
                       concepts=ConceptsConfig(n=50))
    with Workspace(config.workspace) as ws:
        stats = execute_stage(ConceptsStage(), ws, config, Console(quiet=True))
        cats = ws.execute("SELECT count(*), count(category) FROM concepts WHERE concept LIKE '% tower'")[0]
    assert stats.n_out == 50 and cats[0] > 0 and cats[0] == cats[1]
