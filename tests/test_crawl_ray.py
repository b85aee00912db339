"""crawl with `executor: ray`: the same workspace tables as the local crawl, also across a resumed run.

A Ray worker scores each concept's candidates as one batch (before the driver's dedup drops any), so
a CLIP score may differ from the local one in its last digits: scores are compared within 1e-5, the
chosen image and everything else exactly.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from support.paths import write_demo_config

from fvqa.config import RunConfig, load_config
from fvqa.pipelines.crawl import CrawlStage
from fvqa.pipelines.runner import run_build
from fvqa.store import Workspace

TOL = 1e-5


def _build(root: Path, world: Path, executor: str) -> tuple[RunConfig, Any]:
    root.mkdir(exist_ok=True)
    config = load_config(write_demo_config(root, world), [f"executor={executor}"])
    run_build(config, only=["concepts"], console=Console(file=io.StringIO()))
    return config, run_build(config, only=["crawl"], console=Console(file=io.StringIO()))["crawl"]


def _tables(ws_path: Path) -> dict[str, list[tuple]]:
    """The crawl's tables, ordered; provenance without its timestamp."""
    with Workspace(ws_path, read_only=True) as ws:
        crawled = []
        for row in ws.execute("SELECT concept_id, image_sha256, image_url, page_url, page_title, page_text, "
                              "clip_score, provenance FROM crawled ORDER BY concept_id"):
            prov = json.loads(row[-1])
            del prov["crawl"]["time"]
            crawled.append((*row[:-1], prov))
        return dict(
            crawled=crawled,
            images=ws.execute("SELECT sha256, ext, width, height, n_bytes, phash, provenance FROM images "
                              "ORDER BY sha256"),
            rejects=ws.execute("SELECT key, reason, detail FROM rejects WHERE stage = 'crawl' ORDER BY key"),
            deferred=ws.execute("SELECT concept_id, reason, detail, runs FROM crawl_deferred ORDER BY concept_id"),
        )


def _assert_same(local: dict[str, list[tuple]], ray: dict[str, list[tuple]]) -> None:
    assert [r[:6] + r[7:] for r in ray["crawled"]] == [r[:6] + r[7:] for r in local["crawled"]]
    for a, b in zip(ray["crawled"], local["crawled"], strict=True):
        assert b[6] == pytest.approx(a[6], abs=TOL), a[0]
    for table in ("images", "rejects", "deferred"):
        assert ray[table] == local[table], table


def test_ray_crawl_interrupted_and_resumed_gives_the_local_tables(
        ray_cluster, demo_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One Ray crawl killed after a few chunks, then resumed: every row is a Ray worker's, and the
    tables are the local crawl's; a third run has nothing left to do."""
    local_config, local_stats = _build(tmp_path / "local", demo_world, "local")
    assert local_stats.n_in == 200 and local_stats.n_out > 150 and "ray_shards" not in local_stats.extra
    local = _tables(local_config.workspace)

    settle = CrawlStage._settle
    calls = [0]

    async def dies_after_three_chunks(self, ctx, source, batch):  # noqa: ANN001 - the stage's own signature
        calls[0] += 1
        if calls[0] > 3:
            raise RuntimeError("driver killed")
        await settle(self, ctx, source, batch)

    monkeypatch.setattr(CrawlStage, "_settle", dies_after_three_chunks)
    with pytest.raises(RuntimeError, match="driver killed"):
        _build(tmp_path / "ray", demo_world, "ray")
    monkeypatch.setattr(CrawlStage, "_settle", settle)
    with Workspace(tmp_path / "ray" / "ws", read_only=True) as ws:
        done = ws.count("crawled") + ws.execute("SELECT count(*) FROM rejects WHERE stage = 'crawl' "
                                                "AND key LIKE 'metaclip-%'")[0][0]
    assert 0 < done < 3 * 16  # the row batches committed before the kill stay; the rest is still to do

    config = load_config(tmp_path / "ray" / "demo.yaml", ["executor=ray"])
    stats = run_build(config, only=["crawl"], console=Console(file=io.StringIO()))["crawl"]
    assert stats.n_in == 200 - done and stats.extra["ray_shards"] == -(-(200 - done) // 16)  # chunks of 16
    assert stats.n_in == stats.n_out + stats.n_rejected
    resumed = _tables(config.workspace)
    _assert_same(local, resumed)

    again = run_build(config, only=["crawl"], console=Console(file=io.StringIO()))["crawl"]
    assert again.n_in == 0 and again.n_out == 0
    assert _tables(config.workspace) == resumed


def _url_crawl(root: Path, executor: str) -> dict[str, Any]:
    """test_crawl's loopback web of good, broken, duplicate, slow and flaky images, crawled afresh."""
    from support.web_server import LoopbackServer
    from test_crawl import CASES, ROUTES, _crawl_config, _seed_workspace

    from fvqa.pipelines.base import execute_stage

    with LoopbackServer(ROUTES) as srv:  # a server per run: some routes answer by hit number
        config = _crawl_config(root / executor).model_copy(update={"executor": executor})
        with Workspace(config.workspace) as ws:
            _seed_workspace(ws, srv, CASES)
            stats = execute_stage(CrawlStage(), ws, config, Console(file=io.StringIO()))
        tables = json.loads(json.dumps(_tables(config.workspace), default=str).replace(srv.url("/"), "http://srv/"))
    return dict(stats=stats, **tables)


def test_ray_crawl_of_urls_downloads_in_the_workers_and_gives_the_local_tables(ray_cluster, tmp_path: Path):
    local, ray = _url_crawl(tmp_path, "local"), _url_crawl(tmp_path, "ray")
    assert ray["stats"].extra["ray_shards"] == 1
    # every reason the downloader and the gate give (robots, SSRF-checked redirects, retries, size limits)
    # and the deferred concepts of transient failures come out as locally
    assert {r[1] for r in ray["rejects"]} >= {"robots_disallowed", "http_error", "too_large", "near_duplicate"}
    assert len(ray["deferred"]) == local["stats"].extra["deferred"] > 0
    _assert_same({k: [tuple(r) for r in v] for k, v in local.items() if k != "stats"},
                 {k: [tuple(r) for r in v] for k, v in ray.items() if k != "stats"})
