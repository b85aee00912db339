"""crawl: a loopback web server with good and bad images; what is stored and every reject reason."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from support.paths import FVQA, REPO
from support.web_server import LoopbackServer, Reply, bomb_png, jpeg_bytes

from fvqa.config import CrawlConfig, RunConfig
from fvqa.net.fetch import Downloader, FetchOptions
from fvqa.net.retry import parse_retry_after
from fvqa.net.ssrf import BadURL, BlockedAddress, check_url
from fvqa.pipelines.base import execute_stage
from fvqa.pipelines.crawl import CrawlStage
from fvqa.store import Workspace
from fvqa.vision.clip_score import ClipScorer
from fvqa.vision.imageproc import ImageReject, process_image

PAGE = (b"<html><head><title>Blue Ridge tower</title></head><body><nav>Home | About</nav><article>"
        b"<h1>Blue Ridge tower</h1><p>The Blue Ridge tower is a steel tower built in 1931 in a small town."
        b"</p><p>It is 212 metres tall and was designed by the engineer Ada Weller for radio.</p></article>"
        b"<footer>site footer</footer></body></html>")


def _jpeg(seed: int, size: tuple[int, int] = (160, 120)) -> Reply:
    return Reply(body=jpeg_bytes(seed, size), content_type="image/jpeg")


def _rotated_exif_jpeg() -> bytes:
    img = Image.open(io.BytesIO(jpeg_bytes(40, (200, 100))))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _near_copy(seed: int) -> bytes:
    """The same picture as jpeg_bytes(seed), re-encoded smaller: different bytes, same perceptual hash."""
    img = Image.open(io.BytesIO(jpeg_bytes(seed))).resize((150, 112))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def _busy_then_ok(n: int) -> Reply:
    return Reply(429, b"slow down", "text/plain", headers={"Retry-After": "1"}) if n == 1 else _jpeg(5)


ROUTES = {
    "/robots.txt": Reply(body=b"User-agent: *\nDisallow: /private/\n", content_type="text/plain"),
    "/good1.jpg": _jpeg(1),
    "/two-a.jpg": _jpeg(2),
    "/two-b.png": Reply(body=jpeg_bytes(3, fmt="PNG"), content_type="image/png"),
    "/redirect": Reply(302, headers={"Location": "/moved/good4.jpg"}),
    "/moved/good4.jpg": _jpeg(4),
    "/busy.jpg": _busy_then_ok,
    "/broken.jpg": Reply(500, b"oops", "text/plain"),
    "/truncated.jpg": Reply(body=jpeg_bytes(6)[:400], content_type="image/jpeg"),
    "/cut-transfer.jpg": Reply(body=jpeg_bytes(7), content_type="image/jpeg", truncate_at=300),
    "/html.jpg": Reply(body=b"<!doctype html><html><body>Not found</body></html>", content_type="image/jpeg"),
    "/bomb.png": Reply(body=bomb_png(), content_type="image/png"),
    "/slow.jpg": Reply(body=jpeg_bytes(8), content_type="image/jpeg", delay_s=3.0),
    "/trickle.jpg": Reply(body=jpeg_bytes(9, (400, 300)), content_type="image/jpeg", chunk=200, trickle_s=0.3),
    "/tiny.png": Reply(body=jpeg_bytes(10, (8, 8), fmt="PNG"), content_type="image/png"),
    "/huge.jpg": Reply(body=b"\xff\xd8\xff" + b"0" * 300_000, content_type="image/jpeg"),
    "/huge-stream.jpg": Reply(body=b"\xff\xd8\xff" + b"0" * 300_000, content_type="image/jpeg", no_length=True),
    "/private/secret.jpg": _jpeg(11),
    "/copy-of-good1.jpg": _jpeg(1),
    "/near-good1.jpg": Reply(body=_near_copy(1), content_type="image/jpeg"),
    "/rotated.jpg": Reply(body=_rotated_exif_jpeg(), content_type="image/jpeg"),
    "/page.html": Reply(body=PAGE, content_type="text/html; charset=utf-8"),
}

# concept id -> (concept, [(image path, page path)]); ids sort in processing order
CASES = {
    "c01-good": ("Blue Ridge tower", [("/good1.jpg", "/page.html")]),
    "c02-two": ("twin lanterns", [("/two-a.jpg", "/nopage.html"), ("/two-b.png", "/nopage.html")]),
    "c03-redirect": ("moved finch", [("/redirect", None)]),
    "c04-busy": ("busy festival", [("/busy.jpg", None)]),
    "c05-broken": ("broken sonata", [("/broken.jpg", None)]),
    "c06-truncated": ("cut crystal", [("/truncated.jpg", None), ("/cut-transfer.jpg", None)]),
    "c07-html": ("html locomotive", [("/html.jpg", None)]),
    "c08-bomb": ("bomb sculptor", [("/bomb.png", None)]),
    "c09-slow": ("slow tower", [("/slow.jpg", None), ("/trickle.jpg", None)]),
    "c10-tiny": ("tiny finch", [("/tiny.png", None)]),
    "c11-huge": ("huge crystal", [("/huge.jpg", None), ("/huge-stream.jpg", None)]),
    "c12-missing": ("missing lantern", [("/missing.jpg", None)]),
    "c13-robots": ("private festival", [("/private/secret.jpg", None)]),
    "c14-dups": ("copied tower", [("/copy-of-good1.jpg", None), ("/near-good1.jpg", None)]),
    "c15-rotated": ("rotated sonata", [("/rotated.jpg", None)]),
    "c16-none": ("nothing at all", []),
}


def _crawl_config(ws: Path, **over: object) -> RunConfig:
    crawl = dict(source="urls", allow_private=True, timeout_s=1.0, retries=2, backoff_s=0.05,
                 max_retry_after_s=5, max_bytes=200_000, max_pixels=20_000_000, min_side=32,
                 clip_model="fvqa-tiny", clip_pretrained=None, per_host_concurrency=8)
    crawl.update(over)
    return RunConfig(workspace=ws, crawl=CrawlConfig(**crawl))


def _seed_workspace(ws: Workspace, srv: LoopbackServer, cases: dict) -> None:
    ws.insert("concepts", [dict(concept_id=cid, entry_id=i, concept=c, count=10, tier="tail")
                           for i, (cid, (c, _)) in enumerate(cases.items())])
    ws.execute("CREATE TABLE IF NOT EXISTS match_candidates (concept_id VARCHAR, url VARCHAR, page_url VARCHAR)")
    rows = [dict(concept_id=cid, url=srv.url(img), page_url=srv.url(page) if page else None)
            for cid, (_, cands) in cases.items() for img, page in cands]
    ws.insert("match_candidates", rows)


def _run(ws: Workspace, config: RunConfig) -> tuple[object, float]:
    from rich.console import Console

    t0 = time.perf_counter()
    stats = execute_stage(CrawlStage(), ws, config, Console(stderr=True, quiet=True))
    return stats, time.perf_counter() - t0


@pytest.fixture(scope="module")
def crawl_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("crawl")
    with LoopbackServer(ROUTES) as srv:
        config = _crawl_config(root / "ws")
        with Workspace(config.workspace) as ws:
            _seed_workspace(ws, srv, CASES)
            stats, seconds = _run(ws, config)
            crawled = {r[0]: dict(zip(("image_url", "sha", "score", "title", "text", "prov", "page_url"), r[1:],
                                      strict=True))
                       for r in ws.execute("SELECT concept_id, image_url, image_sha256, clip_score, page_title, "
                                           "page_text, provenance, page_url FROM crawled")}
            rejects = {r[0]: (r[1], r[2]) for r in ws.execute("SELECT key, reason, detail FROM rejects")}
            images = {r[0]: r[1:] for r in ws.execute("SELECT sha256, ext, width, height, phash FROM images")}
            deferred = {r[0]: r[1:] for r in ws.execute("SELECT concept_id, reason, detail, runs FROM crawl_deferred")}
            paths = {sha: ws.find_image(sha) for sha in images}
        yield dict(srv=srv, url=srv.url, stats=stats, seconds=seconds, crawled=crawled, rejects=rejects, deferred=deferred,
                   images=images, paths=paths, hits=dict(srv.hits), root=root, config=config)


def test_good_images_are_stored_with_page_text(crawl_run):
    crawled, url = crawl_run["crawled"], crawl_run["url"]
    assert set(crawled) == {"c01-good", "c02-two", "c03-redirect", "c04-busy", "c15-rotated"}
    good = crawled["c01-good"]
    assert good["image_url"] == url("/good1.jpg") and good["page_url"] == url("/page.html")
    assert good["title"] == "Blue Ridge tower"
    assert "212 metres tall" in good["text"] and "site footer" not in good["text"]
    ext, width, height, phash = crawl_run["images"][good["sha"]]
    assert (ext, width, height) == ("jpg", 160, 120) and len(phash) == 16
    assert crawl_run["paths"][good["sha"]].is_file()
    # the redirect is followed; the row keeps the URL the candidate came with
    assert crawled["c03-redirect"]["image_url"] == url("/redirect")
    assert crawl_run["hits"]["/moved/good4.jpg"] == 1
    # EXIF orientation applied before storing: 200x100 rotated becomes 100x200
    assert crawl_run["images"][crawled["c15-rotated"]["sha"]][1:3] == (100, 200)


def test_429_is_retried_after_retry_after_and_5xx_gives_up(crawl_run):
    assert crawl_run["hits"]["/busy.jpg"] == 2 and "c04-busy" in crawl_run["crawled"]
    assert crawl_run["seconds"] >= 1.0  # waited the Retry-After second
    # a 5xx that outlasts the retries may still pass: the concept is deferred, not rejected
    assert crawl_run["url"]("/broken.jpg") not in crawl_run["rejects"] and "c05-broken" not in crawl_run["rejects"]
    reason, detail, runs = crawl_run["deferred"]["c05-broken"]
    assert reason == "http_error" and "HTTP 500" in detail and "gave up after 3 attempts" in detail and runs == 1
    assert crawl_run["hits"]["/broken.jpg"] == 3  # first try + retries=2
    assert crawl_run["rejects"][crawl_run["url"]("/missing.jpg")][0] == "http_error"
    assert crawl_run["hits"]["/missing.jpg"] == 1  # a 404 is not retried


def test_every_bad_candidate_has_its_reason(crawl_run):
    url, rejects = crawl_run["url"], crawl_run["rejects"]
    expected = {
        "/truncated.jpg": "image_undecodable",
        "/html.jpg": "image_format_unknown",
        "/bomb.png": "image_too_large",
        "/tiny.png": "image_too_small",
        "/huge.jpg": "too_large",
        "/huge-stream.jpg": "too_large",
        "/private/secret.jpg": "robots_disallowed",
        "/copy-of-good1.jpg": "exact_duplicate",
        "/near-good1.jpg": "near_duplicate",
        "/nopage.html": "page_fetch_failed",
    }
    got = {path: rejects.get(url(path), ("(none)", ""))[0] for path in expected}
    assert got == expected
    assert "looks like HTML" in rejects[url("/html.jpg")][1]
    assert "c01-good" in rejects[url("/near-good1.jpg")][1]  # says which image it duplicates
    assert "stopped reading" in rejects[url("/huge-stream.jpg")][1]
    assert crawl_run["hits"].get("/private/secret.jpg", 0) == 0
    # concepts without any usable image are rejected with the candidates' reasons
    assert rejects["c08-bomb"] == ("no_usable_image", "'bomb sculptor': image_too_large: 1")
    assert rejects["c16-none"][0] == "no_candidates"
    for cid in ("c07-html", "c10-tiny", "c11-huge", "c12-missing", "c13-robots", "c14-dups"):
        assert rejects[cid][0] == "no_usable_image", cid
    # transient failures (timeouts, a cut transfer, a 5xx) defer their concept: no reject, URL or concept
    for path in ("/slow.jpg", "/trickle.jpg", "/cut-transfer.jpg", "/broken.jpg"):
        assert url(path) not in rejects, path
    assert set(crawl_run["deferred"]) == {"c05-broken", "c06-truncated", "c09-slow"}
    assert not set(crawl_run["deferred"]) & set(rejects)
    assert crawl_run["deferred"]["c09-slow"][0] == "timeout"
    # c06's other candidate is permanently bad: that URL reject stands
    assert "connection_error" in crawl_run["deferred"]["c06-truncated"][1]


def test_summary_counts_every_failure_mode(crawl_run):
    stats = crawl_run["stats"]
    # the stage's unit is the concept: every one is kept, rejected or deferred, and counted once
    assert stats.n_in == len(CASES) and stats.n_out == 5 and stats.extra["deferred"] == 3
    assert stats.n_in == stats.n_out + stats.n_rejected + stats.extra["deferred"]
    assert dict(stats.rejected) == {"no_usable_image": 7, "no_candidates": 1}
    urls = stats.extra["rejected_urls"]  # candidate URLs, counted apart
    for reason in ("http_error", "image_undecodable", "image_format_unknown", "image_too_large",
                   "image_too_small", "too_large", "near_duplicate", "exact_duplicate", "robots_disallowed",
                   "not_chosen", "page_fetch_failed"):
        assert urls[reason] >= 1, reason
    assert "timeout" not in urls and "connection_error" not in urls  # transient: their concepts were deferred
    assert any("random weights" in n for n in stats.notes)
    assert any(n.startswith("3 concept(s) deferred (retried next run)") for n in stats.notes)
    assert any("candidate URL(s) rejected (not counted as concepts)" in n for n in stats.notes)


def test_clip_scores_are_recorded_and_random_weights_flagged(crawl_run):
    crawled, rejects = crawl_run["crawled"], crawl_run["rejects"]
    two = crawled["c02-two"]
    loser = "/two-b.png" if two["image_url"].endswith("two-a.jpg") else "/two-a.jpg"
    reason, detail = rejects[crawl_run["url"](loser)]
    assert reason == "not_chosen" and f"{two['score']:.4f}" in detail
    prov = json.loads(two["prov"])["crawl"]
    assert prov["clip"]["pretrained"] is None and "random weights" in prov["clip"]["warning"]
    assert prov["clip"]["threshold"] is None and prov["source"] == "urls" and prov["candidates"] == 2
    assert all(-1.0 <= row["score"] <= 1.0 for row in crawled.values())


def test_clip_threshold_keeps_only_candidates_above_it(tmp_path: Path):
    a, b = Image.open(io.BytesIO(jpeg_bytes(21))), Image.open(io.BytesIO(jpeg_bytes(22)))
    scorer = ClipScorer("fvqa-tiny", None, CrawlConfig().clip_prompts)
    s_a, s_b = scorer.score("striped kite", [a, b])
    assert s_a != s_b
    hi, lo = ("/a.jpg", "/b.jpg") if s_a > s_b else ("/b.jpg", "/a.jpg")
    threshold = (s_a + s_b) / 2
    cases = {"k1-kite": ("striped kite", [("/a.jpg", None), ("/b.jpg", None)]),
             "k2-kite": ("striped kite", [(lo.replace(".jpg", "-lo.jpg"), None)])}
    routes = {"/a.jpg": _jpeg(21), "/b.jpg": _jpeg(22), lo.replace(".jpg", "-lo.jpg"): _jpeg(21 if lo == "/a.jpg" else 22)}
    with LoopbackServer(routes) as srv:
        config = _crawl_config(tmp_path / "ws", clip_threshold=threshold, phash_distance=-1, respect_robots=False)
        with Workspace(config.workspace) as ws:
            _seed_workspace(ws, srv, cases)
            stats, _ = _run(ws, config)
            kept = ws.execute("SELECT concept_id, image_url, clip_score, provenance FROM crawled")
            rejects = {r[0]: r[1:] for r in ws.execute("SELECT key, reason, detail FROM rejects")}
    assert [(r[0], r[1]) for r in kept] == [("k1-kite", srv.url(hi))]
    assert kept[0][2] == pytest.approx(max(s_a, s_b), abs=1e-5)
    assert json.loads(kept[0][3])["crawl"]["clip"]["threshold"] == pytest.approx(threshold)
    assert rejects[srv.url(lo)][0] == "low_clip_score"
    assert rejects["k2-kite"][0] == "no_usable_image" and "low_clip_score" in rejects["k2-kite"][1]
    assert stats.extra["rejected_urls"]["low_clip_score"] == 2 and dict(stats.rejected) == {"no_usable_image": 1}


def test_rerun_does_nothing_and_repeats_no_request(crawl_run):
    srv_hits = crawl_run["hits"]
    with LoopbackServer(ROUTES) as srv2:  # a fresh server would see any repeated request
        config = crawl_run["config"]
        with Workspace(config.workspace) as ws:
            stats, _ = _run(ws, config)
            assert ws.count("crawled") == 5
            runs = dict(ws.execute("SELECT concept_id, runs FROM crawl_deferred"))
        # only the deferred concepts are tried again (their old server is gone: deferred once more)
        assert stats.n_in == 3 and stats.n_out == 0 and stats.n_rejected == 0 and stats.extra["deferred"] == 3
        assert runs == {"c05-broken": 2, "c06-truncated": 2, "c09-slow": 2}
        retried = {"/broken.jpg", "/truncated.jpg", "/cut-transfer.jpg", "/slow.jpg", "/trickle.jpg"}
        assert sum(n for path, n in srv2.hits.items() if path not in retried) == 0
    assert srv_hits["/good1.jpg"] == 1


def test_private_addresses_are_refused_unless_allowed():
    async def check(url: str, allow: bool) -> str:
        try:
            await check_url(url, allow_private=allow)
        except BlockedAddress:
            return "blocked"
        except BadURL:
            return "bad"
        return "ok"

    async def go() -> dict[str, str]:
        urls = ["http://127.0.0.1:9/x", "http://localhost/x", "http://169.254.169.254/latest/meta-data",
                "http://10.1.2.3/", "http://[::1]/", "http://192.168.0.1/", "http://8.8.8.8/x.jpg",
                "ftp://example.org/x", "http:///nohost"]
        return {u: await check(u, False) for u in urls} | {"allowed": await check("http://127.0.0.1/", True)}

    got = asyncio.run(go())
    assert got == {
        "http://127.0.0.1:9/x": "blocked", "http://localhost/x": "blocked",
        "http://169.254.169.254/latest/meta-data": "blocked", "http://10.1.2.3/": "blocked",
        "http://[::1]/": "blocked", "http://192.168.0.1/": "blocked", "http://8.8.8.8/x.jpg": "ok",
        "ftp://example.org/x": "bad", "http:///nohost": "bad", "allowed": "ok",
    }


def test_redirect_into_a_private_network_is_refused():
    """A public-looking first hop cannot bounce the crawler to loopback: every hop is checked."""
    with LoopbackServer({"/r": Reply(302, headers={"Location": "http://127.0.0.1:1/admin"})}) as srv:
        async def go():
            opts = FetchOptions(allow_private=False, respect_robots=False, retries=0)
            async with Downloader(opts) as d:
                return await d.fetch(srv.url("/r"))

        res = asyncio.run(go())
    assert not res.ok and res.reason == "private_address" and sum(srv.hits.values()) == 0


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(future) <= 31


def test_image_checks_without_network():
    ok = process_image(jpeg_bytes(1, (2000, 1000)), max_side=500, min_side=32, max_pixels=10**8)
    assert ok.image.size == (500, 250) and ok.data[:3] == b"\xff\xd8\xff" and ok.orig_size == (2000, 1000)
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    flat = process_image(buf.getvalue(), max_side=500, min_side=32, max_pixels=10**8)
    assert flat.image.mode == "RGB" and flat.image.getpixel((0, 0)) == (255, 255, 255)  # transparency -> white
    for data, reason in ((b"", "image_format_unknown"), (b'{"a": 1}', "image_format_unknown"),
                         (bomb_png(3000), "image_too_large")):
        with pytest.raises(ImageReject) as exc:
            process_image(data, max_side=500, min_side=32, max_pixels=1_000_000)
        assert exc.value.reason == reason


@pytest.mark.slow
def test_demo_build_crawls_one_image_per_concept(demo_config: Path, tmp_path: Path):
    res = subprocess.run([*FVQA, "build", "--config", str(demo_config), "--stages", "concepts,crawl"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    with Workspace(tmp_path / "ws", read_only=True) as ws:
        n_concepts, n_crawled = ws.count("concepts"), ws.count("crawled")
        per_concept = ws.execute("SELECT max(n) FROM (SELECT concept_id, count(*) n FROM crawled GROUP BY 1)")
        reasons = {r[0]: r[1] for r in ws.execute(
            "SELECT reason, count(*) FROM rejects WHERE stage = 'crawl' GROUP BY 1")}
        bad = {r[0].rsplit("/", 1)[1]: r[1] for r in ws.execute(
            "SELECT key, reason FROM rejects WHERE stage = 'crawl' AND key LIKE 'http%' "
            "AND reason <> 'not_chosen'")}
        texts = ws.execute("SELECT count(*) FROM crawled WHERE length(page_text) > 50")[0][0]
        orphans = ws.execute("SELECT count(*) FROM crawled k LEFT JOIN images i ON i.sha256 = k.image_sha256 "
                             "WHERE i.sha256 IS NULL")[0][0]
    assert n_concepts == 200 and per_concept == [(1,)]
    # every concept is either crawled or rejected with a reason; the demo's planted files are caught
    assert n_crawled + reasons.get("no_candidates", 0) + reasons.get("no_usable_image", 0) == n_concepts
    assert bad == {"corrupt.jpg": "image_undecodable", "not_an_image.jpg": "image_format_unknown",
                   "tiny.png": "image_too_small"}
    assert texts == n_crawled and orphans == 0


def test_web_search_source_caches_answers_and_never_stores_the_key(tmp_path: Path, monkeypatch):
    key = "sk-test-secret-123"
    monkeypatch.setenv("FVQA_TEST_SEARCH_KEY", key)

    with LoopbackServer({"/s1.jpg": _jpeg(31), "/s2.jpg": _jpeg(32), "/p.html": Reply(body=PAGE,
                         content_type="text/html")}) as srv:
        results = {"images_results": [
            {"original": srv.url("/s1.jpg"), "link": srv.url("/p.html"), "title": "Blue Ridge tower - photo"},
            {"original": srv.url("/s2.jpg"), "link": srv.url("/p.html"), "title": "another"}]}
        srv.add("/search.json", lambda n: Reply(body=json.dumps(results).encode(), content_type="application/json"))
        srv.add("/denied/search.json", Reply(401, b'{"error": "Invalid API key"}', "application/json"))
        cases = {"w1-tower": ("Blue Ridge tower", [])}
        for name, url in (("ok", srv.url("/search.json")), ("denied", srv.url("/denied/search.json"))):
            config = _crawl_config(tmp_path / "ws", source="web_search", search_url=url,
                                   search_api_key_env="FVQA_TEST_SEARCH_KEY")
            with Workspace(config.workspace) as ws:
                if name == "ok":
                    _seed_workspace(ws, srv, cases)
                for _ in range(2):  # second pass after a reset: answered from the cache
                    CrawlStage().reset(ws)
                    stats, _ = _run(ws, config)
                crawled = ws.execute("SELECT image_url, page_title, page_text FROM crawled")
                rejects = ws.execute("SELECT key, reason, detail FROM rejects")
            if name == "ok":
                assert [r[0] for r in crawled] in ([srv.url("/s1.jpg")], [srv.url("/s2.jpg")])
                assert "212 metres" in crawled[0][2]
                assert srv.hits["/search.json"] == 1 and stats.cache_hits == 1
                assert any("q=Blue+Ridge+tower" in q and f"api_key={key}" in q for q in srv.queries)
            else:
                assert crawled == [] and rejects[-1][:2] == ("w1-tower", "image_search_failed") and "HTTP 401" in rejects[-1][2]
                assert srv.hits["/denied/search.json"] == 1  # a 401 is not paid for twice
    stored = [p.read_text() for p in (tmp_path / "ws" / "cache").rglob("*.json")]
    assert len(stored) == 2 and not any(key in s for s in stored)
    with Workspace(tmp_path / "ws") as ws:
        dump = json.dumps(ws.execute("SELECT * FROM rejects") + ws.execute("SELECT * FROM crawled"), default=str)
    assert key not in dump
    monkeypatch.delenv("FVQA_TEST_SEARCH_KEY")
    with pytest.raises(Exception, match="FVQA_TEST_SEARCH_KEY is not set"):
        with Workspace(tmp_path / "ws") as ws:
            CrawlStage().reset(ws)
            _run(ws, config)
