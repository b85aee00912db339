"""crawl: a failure that may pass (503, timeout) defers its concept instead of rejecting it; the next
run tries it again. The stage counts concepts: in == out + rejected + deferred."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from support.web_server import LoopbackServer, Reply, jpeg_bytes

from fvqa.config import CrawlConfig, RunConfig
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.crawl import CrawlStage
from fvqa.store import Workspace


def _config(ws: Path, **over: object) -> RunConfig:
    crawl = dict(source="urls", allow_private=True, respect_robots=False, fetch_pages=False, timeout_s=2.0,
                 retries=1, backoff_s=0.01, min_side=32, clip_model="fvqa-tiny", clip_pretrained=None)
    crawl.update(over)
    return RunConfig(workspace=ws, crawl=CrawlConfig(**crawl))


def _jpeg(seed: int) -> Reply:
    return Reply(body=jpeg_bytes(seed, (160, 120)), content_type="image/jpeg")


def _unavailable_for(hits: int, seed: int):
    """503 for the first `hits` requests, then a good image."""
    return lambda n: Reply(503, b"try later", "text/plain") if n <= hits else _jpeg(seed)


def _seed(ws: Workspace, srv: LoopbackServer, cases: dict[str, list[str]]) -> None:
    ws.insert("concepts", [dict(concept_id=cid, entry_id=i, concept=cid, count=1, tier="tail")
                           for i, cid in enumerate(cases)])
    ws.execute("CREATE TABLE IF NOT EXISTS match_candidates (concept_id VARCHAR, url VARCHAR, page_url VARCHAR)")
    ws.insert("match_candidates", [dict(concept_id=cid, url=srv.url(path)) for cid, paths in cases.items()
                                   for path in paths])


def _crawl(ws: Workspace, config: RunConfig):
    stats = execute_stage(CrawlStage(), ws, config, Console(stderr=True, quiet=True))
    assert stats.n_in == stats.n_out + stats.n_rejected + stats.extra.get("deferred", 0)
    return stats


def _state(ws: Workspace) -> tuple[set[str], dict[str, str], dict[str, tuple]]:
    crawled = {r[0] for r in ws.execute("SELECT concept_id FROM crawled")}
    rejects = dict(ws.execute("SELECT key, reason FROM rejects WHERE stage = 'crawl'"))
    deferred = {r[0]: r[1:] for r in ws.execute("SELECT concept_id, reason, detail, runs FROM crawl_deferred")}
    return crawled, rejects, deferred


def test_503_defers_and_the_next_run_keeps_it(tmp_path: Path):
    routes = {"/flaky.jpg": _unavailable_for(2, 1), "/good.jpg": _jpeg(2), "/gone.jpg": Reply(404, b"", "text/plain")}
    cases = {"a-flaky": ["/flaky.jpg"], "b-good": ["/good.jpg"], "c-gone": ["/gone.jpg"]}
    with LoopbackServer(routes) as srv, Workspace(tmp_path / "ws") as ws:
        config = _config(ws.root)
        _seed(ws, srv, cases)
        first = _crawl(ws, config)
        crawled, rejects, deferred = _state(ws)
        assert crawled == {"b-good"}
        assert rejects == {"c-gone": "no_usable_image", srv.url("/gone.jpg"): "http_error"}  # permanent: rejected
        assert set(deferred) == {"a-flaky"} and deferred["a-flaky"][0] == "http_error"
        assert "gave up after 2 attempts" in deferred["a-flaky"][1] and deferred["a-flaky"][2] == 1
        assert srv.hits["/flaky.jpg"] == 2  # first try + retries=1, both 503
        assert (first.n_in, first.n_out, first.n_rejected, first.extra["deferred"]) == (3, 1, 1, 1)
        assert any(n.startswith("1 concept(s) deferred (retried next run)") and "http_error: 1" in n
                   for n in first.notes)
        assert first.extra["rejected_urls"] == {"http_error": 1}  # counted apart from the concepts
        row = ws.execute("SELECT n_in, n_out, n_rejected, stats FROM runs WHERE stage = 'crawl'")[0]
        assert row[:3] == (3, 1, 1) and json.loads(row[3])["deferred"] == 1

        second = _crawl(ws, config)  # the server answers now
        crawled, rejects, deferred = _state(ws)
        assert (second.n_in, second.n_out, second.n_rejected) == (1, 1, 0) and "deferred" not in second.extra
        assert crawled == {"a-flaky", "b-good"} and deferred == {}
        assert srv.url("/flaky.jpg") not in rejects and "a-flaky" not in rejects
        assert srv.hits["/flaky.jpg"] == 3 and srv.hits["/gone.jpg"] == 1  # the rejected one is not retried

        third = _crawl(ws, config)  # everything settled: nothing to do
        assert third.n_in == 0 and sum(srv.hits.values()) == 5


def test_one_transient_candidate_is_enough_to_defer(tmp_path: Path):
    """A 404 next to a 503: the 404 is a final URL reject, but the 503 may still give the concept its
    image, so the concept waits for the next run rather than being rejected."""
    routes = {"/gone.jpg": Reply(404, b"", "text/plain"), "/flaky.jpg": _unavailable_for(2, 3)}
    with LoopbackServer(routes) as srv, Workspace(tmp_path / "ws") as ws:
        config = _config(ws.root)
        _seed(ws, srv, {"m-mixed": ["/gone.jpg", "/flaky.jpg"]})
        first = _crawl(ws, config)
        crawled, rejects, deferred = _state(ws)
        assert crawled == set() and rejects == {srv.url("/gone.jpg"): "http_error"}
        assert "http_error: 2" in deferred["m-mixed"][1] and "HTTP 503" in deferred["m-mixed"][1]
        assert first.n_rejected == 0 and first.extra["deferred"] == 1
        second = _crawl(ws, config)
        crawled, rejects, deferred = _state(ws)
        assert crawled == {"m-mixed"} and deferred == {} and second.n_out == 1
        assert ws.execute("SELECT count(*) FROM rejects")[0][0] == 1  # the 404 is not stored twice
        assert srv.hits["/gone.jpg"] == 1  # refused for good in run 1: not downloaded again
        assert second.extra["rejected_urls"] == {"http_error": 1}  # but still counted as this concept's


def test_a_concept_kept_despite_a_timeout_rejects_that_url(tmp_path: Path):
    """Once a concept has its image, a transient failure of another candidate is final for that URL."""
    routes = {"/slow.jpg": Reply(body=jpeg_bytes(4), content_type="image/jpeg", delay_s=1.5), "/ok.jpg": _jpeg(5)}
    with LoopbackServer(routes) as srv, Workspace(tmp_path / "ws") as ws:
        config = _config(ws.root, timeout_s=0.5, retries=0)
        _seed(ws, srv, {"k-kept": ["/slow.jpg", "/ok.jpg"]})
        stats = _crawl(ws, config)
        crawled, rejects, deferred = _state(ws)
    assert crawled == {"k-kept"} and deferred == {}
    assert rejects == {srv.url("/slow.jpg"): "timeout"}
    assert (stats.n_out, stats.n_rejected, stats.extra["rejected_urls"]) == (1, 0, {"timeout": 1})


def test_image_search_outage_defers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FVQA_TEST_SEARCH_KEY", "k")
    with LoopbackServer({"/s.jpg": _jpeg(6)}) as srv:
        answer = json.dumps({"images_results": [{"original": srv.url("/s.jpg"), "title": "t"}]}).encode()
        srv.add("/search.json", lambda n: Reply(503, b"down", "text/plain") if n <= 2
                else Reply(body=answer, content_type="application/json"))
        with Workspace(tmp_path / "ws") as ws:
            config = _config(ws.root, source="web_search", search_url=srv.url("/search.json"),
                             search_api_key_env="FVQA_TEST_SEARCH_KEY")
            ws.insert("concepts", [dict(concept_id="s-tower", entry_id=0, concept="tower", count=1, tier="tail")])
            first = _crawl(ws, config)
            crawled, rejects, deferred = _state(ws)
            assert crawled == set() and rejects == {} and deferred["s-tower"][0] == "image_search_failed"
            assert first.extra["deferred"] == 1 and first.n_rejected == 0
            second = _crawl(ws, config)
            crawled, rejects, deferred = _state(ws)
            assert crawled == {"s-tower"} and deferred == {} and second.n_out == 1


def test_force_forgets_deferrals(tmp_path: Path):
    with LoopbackServer({"/flaky.jpg": Reply(503, b"", "text/plain")}) as srv, Workspace(tmp_path / "ws") as ws:
        config = _config(ws.root)
        _seed(ws, srv, {"a-flaky": ["/flaky.jpg"]})
        _crawl(ws, config)
        assert ws.count("crawl_deferred") == 1
        CrawlStage().reset(ws)
        assert ws.count("crawl_deferred") == 0


def test_status_lists_deferred_concepts(tmp_path: Path):
    from typer.testing import CliRunner

    from fvqa.cli import app

    routes = {"/flaky.jpg": _unavailable_for(99, 1), "/good.jpg": _jpeg(2)}
    with LoopbackServer(routes) as srv:
        with Workspace(tmp_path / "ws") as ws:
            _seed(ws, srv, {"a-flaky": ["/flaky.jpg"], "b-good": ["/good.jpg"]})
            _crawl(ws, _config(ws.root))
    res = CliRunner().invoke(app, ["status", "-w", str(tmp_path / "ws")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "deferred (retried by the next build)" in res.output
    line = next(x for x in res.output.splitlines() if "http_error" in x)
    assert "crawl" in line and " 1 " in line
