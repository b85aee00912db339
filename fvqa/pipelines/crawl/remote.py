"""crawl's per-candidate work (bytes -> checked JPEG, hashes, CLIP score), in the stage or on a Ray worker.

`prepare` is the one home of what a candidate's bytes become; the local path calls it from the stage,
and `CrawlShardWorker` calls it on Ray for a chunk of concepts at a time. Everything that depends on
what was kept before (dedup against the workspace and the other candidates, the CLIP threshold,
keep / reject / defer, page text, storing) stays on the driver, which is why a worker's result is
plain data per candidate and never a decision.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from fvqa.config import CrawlConfig, RunConfig
from fvqa.net.fetch import Downloader, FetchOptions, FetchResult
from fvqa.pipelines.crawl.sources import Candidate, LocalSource, Source
from fvqa.vision.dedup import phash_hex, sha256_hex
from fvqa.vision.imageproc import ImageReject, process_image


@dataclass
class Prepared:
    """A candidate's bytes after the gate: the normalised JPEG, its size and hashes, and its CLIP score
    once scored. `image` is the decoded picture for CLIP; a Ray worker drops it before returning."""

    data: bytes
    size: tuple[int, int]
    kind: str  # format sniffed from the original bytes
    orig_size: tuple[int, int]
    sha256: str
    phash: str
    score: float | None = None
    image: Image.Image | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Refused:
    """The image gate's verdict on a candidate's bytes (an `ImageReject`, which does not pickle)."""

    reason: str
    detail: str


#: What became of one candidate: its failed download, the gate's refusal, or the prepared image.
Outcome = FetchResult | Refused | Prepared


def prepare(cfg: CrawlConfig, res: FetchResult) -> Outcome:
    """Check and normalise a downloaded candidate and hash it; a failed download passes through."""
    if not res.ok:
        return res
    try:
        img = process_image(res.data, max_side=cfg.max_side, min_side=cfg.min_side,
                            max_pixels=cfg.max_pixels, quality=cfg.jpeg_quality)
    except ImageReject as exc:
        return Refused(exc.reason, exc.detail)
    return Prepared(img.data, img.image.size, img.kind, img.orig_size, sha256_hex(img.data),
                    phash_hex(img.image), image=img.image)


def build_scorer(cfg: CrawlConfig) -> Any:
    """The stage's CLIP scorer (importing open_clip takes seconds: call it only when something needs scoring)."""
    from fvqa.vision.clip_score import ClipScorer

    return ClipScorer(cfg.clip_model, cfg.clip_pretrained, cfg.clip_prompts, threads=cfg.clip_threads)


@dataclass(frozen=True)
class ConceptJob:
    """One concept of a shard: its name (for CLIP) and the candidates still to download."""

    concept_id: str
    concept: str
    cands: list[Candidate]


@dataclass
class ShardResult:
    """Per concept, per candidate (in the job's order) what became of it; what scored them."""

    outcomes: list[list[Outcome]]
    clip: dict[str, Any] | None = None  # ClipScorer.describe() of the worker's scorer, if it scored
    clip_load_seconds: float | None = None  # set by the shard that built the worker's scorer


def _portable(outcome: Outcome) -> Outcome:
    """An outcome as it travels back to the driver: without the decoded picture or failed bytes."""
    if isinstance(outcome, Prepared):
        return replace(outcome, image=None)
    if isinstance(outcome, FetchResult):
        return replace(outcome, data=b"")
    return outcome


class CrawlShardWorker:
    """Ray worker of `crawl`: downloads (or reads) a chunk of concepts' candidates, prepares them with
    `prepare` and scores each concept's prepared candidates with its own CLIP (built on first need).

    Local files are read by `LocalSource` (so on a cluster the world must be on shared storage); URLs
    go through a `Downloader` with the stage's fetch options (SSRF guard, robots, limits), kept open
    on one event loop for the worker's life so connections and robots answers are reused."""

    def __init__(self, cfg: CrawlConfig, config: RunConfig) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.downloader: Downloader | None = None
        if cfg.source == "local":
            self.source: Source = LocalSource(cfg, config)
        else:  # urls / web_search: the candidates are URLs, downloaded as the base Source does
            self.downloader = Downloader(FetchOptions.from_config(cfg))
            self.loop.run_until_complete(self.downloader.__aenter__())
            self.source = Source(cfg, self.downloader)
        self.scorer: Any = None

    def __call__(self, shard: list[ConceptJob]) -> ShardResult:
        flat = [c for job in shard for c in job.cands]
        fetched = iter(self.loop.run_until_complete(self.source.fetch(flat)) if flat else [])
        result = ShardResult([])
        for job in shard:
            outcomes = [prepare(self.cfg, next(fetched)) for _ in job.cands]
            ready = [o for o in outcomes if isinstance(o, Prepared)]
            if ready:
                if self.scorer is None:
                    t0 = time.perf_counter()
                    self.scorer = build_scorer(self.cfg)
                    result.clip_load_seconds = round(time.perf_counter() - t0, 2)
                scores = self.scorer.score(job.concept, [o.image for o in ready])
                for o, s in zip(ready, scores, strict=True):
                    o.score = s
            result.outcomes.append([_portable(o) for o in outcomes])
        if self.scorer is not None:
            result.clip = self.scorer.describe()
        return result

    def __del__(self) -> None:
        if self.downloader is not None and not self.loop.is_closed():
            self.loop.run_until_complete(self.downloader.__aexit__(None, None, None))
            self.loop.close()
