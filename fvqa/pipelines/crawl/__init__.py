"""crawl: concepts -> one verified image and its source page per concept (table `crawled`).

For each concept the source (local manifest, `match` URLs or an image-search API) gives candidates;
each is downloaded (fvqa.net.fetch), checked and normalised (fvqa.vision.imageproc), deduplicated
against everything kept so far (sha256 + perceptual hash) and scored with CLIP against prompts for
the concept. The best candidate (above `clip_threshold`, when one is set) is stored with its page
text; every other candidate lands in `rejects` keyed by its URL, and a concept without any usable
image is rejected under its concept id with the candidates' reasons in the detail.

A failure that may pass (timeout, dropped connection, 429/5xx: `FetchResult.retryable`) is not a
verdict: a concept left without a usable image while one of its candidates (or its image search)
failed that way is *deferred*, neither kept nor rejected, so the next run tries it again. It is
counted in the summary ("deferred (retried next run)") and listed in `crawl_deferred` with the
failures and how many runs deferred it.

The stage's unit is the concept: `n_in == n_out + n_rejected + deferred`, and `n_rejected` counts
concept rejects only. Candidate URLs rejected on the way (still rows in `rejects`, keyed by URL) are
counted apart, in the stats' `rejected_urls`.

With `executor: ray` the per-candidate work (download or read, gate and normalise, hash, CLIP score;
fvqa.pipelines.crawl.remote) runs on Ray workers, one shard per chunk of concepts, while the driver
keeps everything that depends on order and state exactly as the local path does: candidates (an
image search is a paid, cached call), the refused-URL filter, dedup, the threshold, keep / reject /
defer, page text and storing, through the same `_settle`. The tables come out the same, except that
a worker scores a concept's candidates as one batch before dedup drops some of them, and a batch of
another size may change a CLIP score in its last digits (only a tie within that noise could change
which image is chosen).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image

from fvqa.config import CrawlConfig
from fvqa.executor import map_shards, uses_ray
from fvqa.net.fetch import Downloader, FetchOptions, FetchResult
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.crawl.remote import (
    ConceptJob,
    CrawlShardWorker,
    Outcome,
    Prepared,
    Refused,
    ShardResult,
    build_scorer,
    prepare,
)
from fvqa.pipelines.crawl.sources import Candidate, Failure, Source, make_source
from fvqa.reasons import FETCH, IMAGE
from fvqa.store import Workspace, now
from fvqa.vision.dedup import DedupIndex
from fvqa.vision.gate import CheckedImage

STAGE = "crawl"
CHUNK = 16  # concepts per download wave; the next wave downloads while this one is checked
DEFERRED_DDL = """
CREATE TABLE IF NOT EXISTS crawl_deferred (
    concept_id VARCHAR PRIMARY KEY, reason VARCHAR, detail VARCHAR, runs BIGINT, time TIMESTAMP)
"""


@dataclass
class Checked:
    """A candidate that decoded, passed the size checks and is not a duplicate."""

    cand: Candidate
    prep: Prepared

    @property
    def score(self) -> float | None:
        return self.prep.score


class CrawlStage(Stage):
    """concepts -> crawled (+ images, + rejects by reason)."""

    name = STAGE
    inputs = ("concepts",)
    outputs = ("crawled",)
    description = "download, dedup and CLIP-verify one image (and page) per concept"

    def prepare(self, ws: Workspace) -> None:
        ws.ensure_table(DEFERRED_DDL)

    def reset(self, ws: Workspace) -> None:
        ws.ensure_table(DEFERRED_DDL)  # a reset may come before the stage ever ran here
        with ws.transaction():
            super().reset(ws)
            ws.execute("DELETE FROM crawl_deferred")

    def run(self, ctx: StageContext) -> None:
        rows = ctx.ws.execute("SELECT concept_id, concept FROM concepts ORDER BY concept_id")
        todo = set(ctx.todo([r[0] for r in rows], column="concept_id"))
        concepts = [(cid, concept) for cid, concept in rows if cid in todo]
        ctx.stats.n_in = len(concepts)
        self.deferred: Counter[str] = Counter()  # deferred concepts by their first transient reason
        self.url_rejects: Counter[str] = Counter()
        try:
            if concepts:
                asyncio.run(self._run_ray(ctx, concepts) if uses_ray(ctx.config) else self._run(ctx, concepts))
        finally:
            _record_counts(ctx, self.deferred, self.url_rejects)
        ctx.commit()
        _forget_settled_deferrals(ctx.ws)

    def _begin(self, ctx: StageContext) -> None:
        """A run's starting state: what earlier runs kept and refused, no scorer yet."""
        self.dedup = _load_dedup(ctx, ctx.cfg.phash_distance)
        self.refused = _refused_urls(ctx.ws)
        self.scorer: Any = None
        self.clip: dict[str, Any] | None = None  # what scored the candidates (provenance)

    async def _run(self, ctx: StageContext, concepts: list[tuple[str, str]]) -> None:
        cfg: CrawlConfig = ctx.cfg
        self._begin(ctx)
        # importing open_clip takes seconds: start it now, overlapping the first downloads
        self._scorer_task = asyncio.create_task(asyncio.to_thread(_load_scorer, cfg, ctx))
        async with Downloader(FetchOptions.from_config(cfg)) as downloader:
            source = make_source(cfg, ctx.config, ctx.ws, downloader)
            chunks = [concepts[i: i + CHUNK] for i in range(0, len(concepts), CHUNK)]
            prefetch = asyncio.create_task(self._gather(source, chunks[0]))
            for i, _ in enumerate(ctx.progress(chunks, total=len(chunks), description="crawl")):
                batch = await prefetch
                if i + 1 < len(chunks):
                    prefetch = asyncio.create_task(self._gather(source, chunks[i + 1]))
                with ctx.ws.transaction():  # one commit per chunk instead of one per stored image
                    await self._settle(ctx, source, batch)
        if self.scorer is None:  # surface a load error (e.g. unknown model) even if nothing needed scoring
            await self._scorer_task
        _record_source_stats(ctx, source)

    async def _run_ray(self, ctx: StageContext, concepts: list[tuple[str, str]]) -> None:
        """`_run` with the per-candidate work on Ray workers (see the module docstring)."""
        cfg: CrawlConfig = ctx.cfg
        self._begin(ctx)
        async with Downloader(FetchOptions.from_config(cfg)) as downloader:  # image search and pages
            source = make_source(cfg, ctx.config, ctx.ws, downloader)
            chunks = [concepts[i: i + CHUNK] for i in range(0, len(concepts), CHUNK)]
            asked = [await source.candidates(chunk) for chunk in chunks]  # the shards are built up front
            shards = [[ConceptJob(cid, concept, [c for c in cands.get(cid, []) if c.url not in self.refused])
                       for cid, concept in chunk] for chunk, (cands, _) in zip(chunks, asked, strict=True)]
            results = map_shards(ctx.config, CrawlShardWorker, {"cfg": cfg, "config": ctx.config}, shards, name=STAGE)
            try:
                work = zip(chunks, asked, results, strict=True)
                for chunk, (cands, failures), result in ctx.progress(work, total=len(chunks),
                                                                     description="crawl on Ray"):
                    self._note_worker_clip(ctx, result)
                    batch = []
                    for (cid, concept), got in zip(chunk, result.outcomes, strict=True):
                        fetched = iter(got)
                        outcomes = [self.refused[c.url] if c.url in self.refused else next(fetched)
                                    for c in cands.get(cid, [])]
                        batch.append((cid, concept, cands.get(cid, []), outcomes, failures.get(cid)))
                    with ctx.ws.transaction():  # one commit per chunk, as locally
                        await self._settle(ctx, source, batch)
            finally:  # a failed run stops the Ray pipeline now, not whenever the generator is collected
                close = getattr(results, "close", None)
                if close is not None:
                    close()
        ctx.stats.extra["ray_shards"] = len(shards)
        if self.clip is None:  # no worker scored: surface a load error (e.g. unknown model) as locally
            await asyncio.to_thread(_load_scorer, cfg, ctx)
        _record_source_stats(ctx, source)

    def _note_worker_clip(self, ctx: StageContext, result: ShardResult) -> None:
        """The first worker scorer's description (provenance) and the slowest worker's CLIP load time."""
        if result.clip is not None and self.clip is None:
            self.clip = result.clip
            _note_random_weights(ctx, ctx.cfg)
        if result.clip_load_seconds is not None:
            seconds = ctx.stats.extra.get("clip_load_seconds", 0.0)
            ctx.stats.extra["clip_load_seconds"] = max(seconds, result.clip_load_seconds)

    async def _gather(
        self, source: Source, chunk: list[tuple[str, str]]
    ) -> list[tuple[str, str, list[Candidate], list[FetchResult], tuple[str, str] | None]]:
        """Candidates and their bytes for a chunk of concepts (the network part)."""
        cands, failures = await source.candidates(chunk)
        flat = [c for cid, _ in chunk for c in cands.get(cid, [])]
        fetched = iter(await source.fetch([c for c in flat if c.url not in self.refused]))
        results = iter([self.refused[c.url] if c.url in self.refused else next(fetched) for c in flat])
        return [(cid, concept, cands.get(cid, []), [next(results) for _ in cands.get(cid, [])],
                 failures.get(cid)) for cid, concept in chunk]

    async def _settle(self, ctx: StageContext, source: Source, batch: list[Any]) -> None:
        """Check, dedup, score and keep or reject every candidate of a chunk (the CPU part).

        `batch` holds per concept its candidates' outcomes: downloads (local path: prepared and
        scored here) or outcomes a Ray worker prepared and scored already."""
        cfg: CrawlConfig = ctx.cfg
        for cid, concept, cands, results, failure in batch:
            why: Counter[str] = Counter()
            transient: list[tuple[str, str, str]] = []  # (url, reason, detail): may work next run
            if failure is not None:
                why[failure.reason] += 1
            checked = await asyncio.to_thread(self._check, ctx, cid, cands, results, why, transient)
            if checked:
                if any(c.prep.score is None for c in checked):  # local path (a Ray worker scored its own)
                    if self.scorer is None:
                        self.scorer = await self._scorer_task
                        self.clip = self.scorer.describe()
                    images = [c.prep.image for c in checked]
                    scores = await asyncio.to_thread(self.scorer.score, concept, images)
                    for c, s in zip(checked, scores, strict=True):
                        c.prep.score = s
                checked = self._apply_threshold(ctx, cid, checked, cfg.clip_threshold, why)
            if not checked and (transient or (failure is not None and failure.retryable)):
                self._defer(ctx, cid, concept, why, transient, failure)
                continue
            for url, reason, detail in transient:  # the concept is settled: these URLs are not retried
                self._reject_url(ctx, url, reason, detail)
            if not checked:
                if not cands and failure is not None:  # e.g. the image search itself failed
                    ctx.reject(cid, failure.reason, f"{concept!r}: {failure.detail}")
                elif not cands:
                    ctx.reject(cid, "no_candidates", f"{concept!r}: the {source.name} source has no image for it")
                else:
                    detail = ", ".join(f"{r}: {n}" for r, n in why.items())
                    ctx.reject(cid, "no_usable_image", f"{concept!r}: {detail}")
                continue
            best = max(checked, key=lambda c: c.score if c.score is not None else float("-inf"))
            for other in checked:
                if other is not best:
                    self._reject_url(ctx, other.cand.url, "not_chosen",
                                     f"{cid}: {other.score:.4f} < {best.score:.4f} ({best.cand.url})")
            await self._keep(ctx, source, cid, best, len(cands))

    def _defer(self, ctx: StageContext, cid: str, concept: str, why: Counter[str],
               transient: list[tuple[str, str, str]], failure: Failure | None) -> None:
        """Neither keep nor reject `cid`: record why in `crawl_deferred` (runs + 1) and count it."""
        first = transient[0][1] if transient else failure.reason if failure is not None else "transient failure"
        self.deferred[first] += 1
        failures = "; ".join(f"{url}: {detail}" for url, _, detail in transient)
        if failure is not None and failure.retryable:
            failures = "; ".join(x for x in (f"{failure.reason}: {failure.detail}", failures) if x)
        detail = f"{concept!r}: " + ", ".join(f"{r}: {n}" for r, n in why.items()) + f" ({failures})"
        ctx.ws.execute(
            "INSERT INTO crawl_deferred VALUES (?, ?, ?, 1, ?) ON CONFLICT (concept_id) DO UPDATE SET "
            "reason = excluded.reason, detail = excluded.detail, runs = crawl_deferred.runs + 1, time = excluded.time",
            [cid, first, detail[:4000], now()])
        ctx.stats.extra["deferred"] = self.deferred.total()

    def _reject_url(self, ctx: StageContext, url: str, reason: str, detail: str) -> None:
        """A candidate URL's reject: a `rejects` row like any other, counted apart from the concepts."""
        ctx.reject(url, reason, detail, counted=False)  # n_rejected counts concepts, the stage's unit
        self.url_rejects[reason] += 1
        ctx.stats.extra["rejected_urls"] = dict(self.url_rejects)

    def _check(
        self, ctx: StageContext, cid: str, cands: list[Candidate], outcomes: list[Outcome], why: Counter[str],
        transient: list[tuple[str, str, str]],
    ) -> list[Checked]:
        """The candidates that downloaded, decode, pass the gate and are no duplicates; the others
        are rejected by URL, except transient download failures, which go to `transient` (their
        fate depends on whether the concept is settled). A download is prepared here (local path)."""
        cfg: CrawlConfig = ctx.cfg
        local = DedupIndex(cfg.phash_distance)
        out = []
        for cand, got in zip(cands, outcomes, strict=True):
            res = prepare(cfg, got) if isinstance(got, FetchResult) else got
            if isinstance(res, FetchResult):
                why[res.reason] += 1
                if res.retryable:
                    transient.append((cand.url, res.reason, f"{cid}: {res.detail}".strip()))
                else:
                    self._reject_url(ctx, cand.url, res.reason, f"{cid}: {res.detail}".strip())
                continue
            if isinstance(res, Refused):
                why[res.reason] += 1
                self._reject_url(ctx, cand.url, res.reason, f"{cid}: {res.detail}")
                continue
            sha, ph = res.sha256, res.phash
            dup = self.dedup.check(sha, ph) or local.check(sha, ph)
            if dup is not None:
                kind = "exact_duplicate" if dup[0] == "exact duplicate" else "near_duplicate"
                why[kind] += 1
                self._reject_url(ctx, cand.url, kind, f"{cid}: {dup[0]} of {dup[1]}")
                continue
            local.add(sha, ph, f"{cid} candidate {cand.url}")
            out.append(Checked(cand, res))
        return out

    def _apply_threshold(
        self, ctx: StageContext, cid: str, checked: list[Checked], threshold: float | None, why: Counter[str]
    ) -> list[Checked]:
        if threshold is None:
            return checked
        keep = []
        for c in checked:
            if c.score is not None and c.score >= threshold:
                keep.append(c)
            else:
                why["low_clip_score"] += 1
                self._reject_url(ctx, c.cand.url, "low_clip_score",
                                 f"{cid}: {c.score:.4f} < clip_threshold {threshold:g}")
        return keep

    async def _keep(self, ctx: StageContext, source: Source, cid: str, best: Checked, n_cands: int) -> None:
        cfg: CrawlConfig = ctx.cfg
        page, page_failure = await source.page(best.cand)
        if page_failure is not None:  # the image is kept; the generator falls back to the title
            self._reject_url(ctx, page.url or f"{cid} page", page_failure[0], f"{cid}: {page_failure[1]}")
        prep = best.prep
        # we encoded it ourselves; from a Ray worker the picture is opened lazily (header only)
        picture = prep.image if prep.image is not None else Image.open(io.BytesIO(prep.data))
        jpeg = CheckedImage("jpeg", "jpg", *prep.size, picture)
        ref, image_row = ctx.ws.store_image(prep.data, provenance={"stage": STAGE, "url": best.cand.url},
                                            checked=jpeg)
        image_row["phash"] = prep.phash
        # an image row some other stage stored earlier gets its phash too (the new row below is ignored)
        ctx.ws.execute("UPDATE images SET phash = ? WHERE sha256 = ? AND phash IS NULL", [prep.phash, ref.sha256])
        self.dedup.add(ref.sha256, prep.phash, f"{cid} ({best.cand.url})")
        clip = dict(self.clip or {})
        clip["threshold"] = cfg.clip_threshold
        ctx.emit_together(("images", image_row), ("crawled", dict(
            concept_id=cid, image_sha256=ref.sha256, image_url=best.cand.url, page_url=page.url,
            page_title=page.title, page_text=page.text, clip_score=best.score,
            provenance=json.dumps({STAGE: {
                "source": source.name, "candidates": n_cands, "original_format": prep.kind,
                "original_size": list(prep.orig_size), "phash": prep.phash, "clip": clip,
                "time": now().isoformat()}}),
        )))


def _refused_urls(ws: Workspace) -> dict[str, FetchResult]:
    """Candidate URLs an earlier run refused for good (a download failure that would repeat, or
    bytes the image gate refused): a deferred concept's next run does not download them again."""
    permanent = sorted({*FETCH, *IMAGE} - {"timeout", "connection_error", "network_error", "image_missing"})
    marks = ", ".join("?" * len(permanent))
    rows = ws.execute(f"SELECT key, reason, detail FROM rejects WHERE stage = ? AND reason IN ({marks})",
                      [STAGE, *permanent])
    return {url: FetchResult(url, False, reason=code, detail=f"refused in an earlier run: {detail}")
            for url, code, detail in rows}


def _load_scorer(cfg: CrawlConfig, ctx: StageContext) -> Any:
    """Build the CLIP model once per run (only when some candidate needs scoring)."""
    t0 = time.perf_counter()
    scorer = build_scorer(cfg)
    _note_random_weights(ctx, cfg)
    ctx.stats.extra["clip_load_seconds"] = round(time.perf_counter() - t0, 2)
    return scorer


def _note_random_weights(ctx: StageContext, cfg: CrawlConfig) -> None:
    if cfg.clip_pretrained is None:
        ctx.stats.notes.append(f"CLIP {cfg.clip_model} has random weights (clip_pretrained: null): "
                               "scores are recorded but not semantic")


def _load_dedup(ctx: StageContext, distance: int) -> DedupIndex:
    """Images kept by earlier runs, so a resumed crawl deduplicates against them too."""
    index = DedupIndex(distance)
    for cid, sha, ph, url in ctx.ws.execute(
            "SELECT k.concept_id, k.image_sha256, im.phash, k.image_url FROM crawled k "
            "LEFT JOIN images im ON im.sha256 = k.image_sha256 ORDER BY k.concept_id"):
        index.add(sha, ph, f"{cid} ({url})")
    return index


def _record_counts(ctx: StageContext, deferred: Counter[str], url_rejects: Counter[str]) -> None:
    """Deferred concepts and rejected candidate URLs: counts in the stats, a line each in the summary."""
    if deferred:
        ctx.stats.extra["deferred"] = deferred.total()
        ctx.stats.notes.append(f"{deferred.total()} concept(s) deferred (retried next run) after transient "
                               f"failures: {', '.join(f'{r}: {n}' for r, n in deferred.most_common())}")
    if url_rejects:
        ctx.stats.extra["rejected_urls"] = dict(url_rejects)
        ctx.stats.notes.append(f"{url_rejects.total()} candidate URL(s) rejected (not counted as concepts): "
                               f"{', '.join(f'{r}: {n}' for r, n in url_rejects.most_common())}")


def _forget_settled_deferrals(ws: Workspace) -> None:
    """A deferred concept that has since been crawled or rejected is no longer deferred."""
    ws.execute("DELETE FROM crawl_deferred WHERE concept_id IN (SELECT concept_id FROM crawled) "
               "OR concept_id IN (SELECT key FROM rejects WHERE stage = ?)", [STAGE])


def _record_source_stats(ctx: StageContext, source: Source) -> None:
    ctx.stats.cache_hits += getattr(source, "cache_hits", 0)
    ctx.stats.paid_calls += getattr(source, "paid_calls", 0)
