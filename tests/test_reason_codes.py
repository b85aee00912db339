"""Reject reasons are codes from one registry (`fvqa.reasons`): checked on write, migrated from the
free text older versions wrote, named by `--retry-rejects`, grouped with their meaning by `status`."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from fvqa.cli import app
from fvqa.config import RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines import STAGES
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.runner import parse_retry_rejects
from fvqa.reasons import STAGE_CODES, UnknownReasonCode, codes_of, legacy_code
from fvqa.store import Workspace


def test_every_stage_has_a_vocabulary_of_snake_case_codes_with_a_meaning() -> None:
    for stage in [*STAGES, "import", "annotate", "train_prepare", "eval:fvqa_test"]:
        codes = codes_of(stage)
        assert codes, stage
        for code, means in codes.items():
            assert re.fullmatch(r"[a-z][a-z0-9_]*", code), (stage, code)
            assert means and not means.endswith("."), (stage, code)


def test_an_unregistered_code_is_refused_when_written(tmp_path: Path) -> None:
    with Workspace(tmp_path / "ws") as ws:
        with pytest.raises(UnknownReasonCode, match="'image missing' is not a registered reject code"):
            ws.add_rejects([("infoseek", "k", "image missing", "")])
        with pytest.raises(UnknownReasonCode, match="no registered reject codes"):
            ws.reject("no-such-stage", "k", "image_missing")
        ctx = StageContext(ws, RunConfig(), type("S", (Stage,), {"name": "probe"})())
        with pytest.raises(UnknownReasonCode):  # raised where it is emitted, not at commit
            ctx.reject("item-1", "missing image")
        ctx.reject("item-1", "image_missing", "gone")
        ctx.commit()
        assert ws.execute("SELECT stage, key, reason, detail FROM rejects") == [
            ("probe", "item-1", "image_missing", "gone")]


# (stage, reason as fvqa <= schema v2 wrote it, detail) -> (code, detail after the migration)
V2_REJECTS = {
    ("infoseek", "missing image", "x.jpg not found"): ("image_missing", "x.jpg not found"),
    ("probe", "image missing", "sha gone"): ("image_missing", "sha gone"),
    ("generate", "image file missing", ""): ("image_missing", ""),
    ("crawl", "HTTP 404", "Not Found"): ("http_error", "HTTP 404: Not Found"),
    ("crawl", "page HTTP 500", ""): ("page_fetch_failed", "page HTTP 500"),
    ("crawl", "image search HTTP 401", "bad key"): ("image_search_failed", "image search HTTP 401: bad key"),
    ("crawl", "lower CLIP score than chosen image", "0.1 < 0.3"): ("not_chosen", "0.1 < 0.3"),
    ("generate", "rule violated: answer names the concept", "raw"): (
        "rule_violated", "rule violated: answer names the concept: raw"),
    ("concepts", "no letters (number or punctuation)", "entry 3"): ("no_letters", "entry 3"),
    ("annotate", "task id is not an integer", "'x'"): ("wrong_type", "task id is not an integer: 'x'"),
    ("annotate", "unknown verdict value", "['maybe']"): ("unknown_value", "unknown verdict value: ['maybe']"),
    ("eval:fvqa_test", "missing or empty answer", "line 3"): ("field_missing", "missing or empty answer: line 3"),
    ("split", "made-up reason", "x"): ("legacy", "made-up reason: x"),
    ("tag", "unparseable_reply", "already a code"): ("unparseable_reply", "already a code"),
}


def test_v2_workspace_reasons_become_codes_and_keep_their_text(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    with Workspace(root) as ws:
        pass
    con = duckdb.connect(str(root / "fvqa.duckdb"))  # what fvqa <= v2 left behind
    con.executemany("INSERT INTO rejects VALUES (?, ?, ?, ?, now())",
                    [[stage, f"k{i}", reason, detail] for i, (stage, reason, detail) in enumerate(V2_REJECTS)])
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with Workspace(root) as ws:
        assert ws.schema_version == 3
        got = {r[0]: (r[1], r[2]) for r in ws.execute("SELECT key, reason, detail FROM rejects")}
    assert got == {f"k{i}": want for i, want in enumerate(V2_REJECTS.values())}


def test_every_code_the_registry_knows_survives_the_migration_unchanged() -> None:
    for stage, codes in STAGE_CODES.items():
        for code in codes:
            assert legacy_code(stage, code) == (code, False)


def test_retry_rejects_names_codes_and_points_an_old_phrase_at_its_code() -> None:
    assert parse_retry_rejects(["crawl:http_error", "probe"], ["crawl", "probe"]) == {
        "crawl": ["http_error"], "probe": [None]}
    with pytest.raises(ConfigError, match=r"'missing image' is not a reject code of stage infoseek "
                                          r"\(did you mean infoseek:image_missing\?\)"):
        parse_retry_rejects(["infoseek:missing image"], ["infoseek"])
    with pytest.raises(ConfigError, match="its codes: .*image_missing"):
        parse_retry_rejects(["infoseek:nonsense"], ["infoseek"])


def test_status_groups_rejects_by_code_with_what_it_means(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    with Workspace(root) as ws:
        ws.add_rejects([("crawl", f"u{i}", "http_error", f"HTTP 40{i}") for i in range(3)]
                       + [("crawl", "c1", "no_candidates", "")])
    res = CliRunner().invoke(app, ["status", "--workspace", str(root)], terminal_width=200)
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "http_error" in x)
    assert "3" in line and "error status" in line
    assert any("no_candidates" in x and "no candidate image" in x for x in res.output.splitlines())
