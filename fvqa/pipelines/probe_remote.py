"""The model probe on Ray (`executor: ray`): each chunk's rollouts run on a worker, the rest stays here.

The driver does what the local probe does — todo items, the rollouts earlier runs kept, planning
each chunk's missing rollouts with their seeds, then emitting rollouts, labels, rejects and deferrals
and committing chunk by chunk (`fvqa.pipelines.probe_model.record_chunk`, shared with the local
path) — except the rollouts themselves. One shard is one chunk: its planned rollouts, each with the
item's image *file path* (workers never open the DuckDB workspace) and its per-rollout `Sampling`,
so every HTTP request, and hence its cache key, is the one the local path would send.

A `ProbeWorker` per Ray worker builds the generator and the search tools once, as the local path
does, over the workspace's ONE response cache (`cache/llm/llm.sqlite`, which books each paid reply
with its spend row) and its search cache, and returns a shard's trajectories with what the shard
spent; the driver books that on the stage's stats.

Exactly once: a shard Ray re-runs after its worker died replays the calls already answered from the
cache (same request, same key) and pays only for the rest. What can still be paid twice is what can
locally: the calls in flight when the worker died (sent, reply not yet stored), at most the worker's
share of `max_concurrency`. The dead worker's paid calls are in the cache's spend ledger
(`fvqa status`) but not in this run's stage stats, where the re-run counts them as cache hits.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvqa.agent import Job, Mode, run_many
from fvqa.config import ProbeConfig
from fvqa.errors import ConfigError, FvqaError
from fvqa.executor import ensure_ray, map_shards, worker_count
from fvqa.generators import Sampling
from fvqa.generators.base import Generator
from fvqa.llm.client import LLMConfigError
from fvqa.pipelines.base import StageContext
from fvqa.pipelines.probe_model import (
    STAGE,
    ProbeTally,
    chunk_size,
    image_file,
    plan_rollouts,
    probe_generator,
    provenance_base,
    record_chunk,
    stored_rollouts,
    upstream_data_id,
)
from fvqa.protocol import AgentItem, Prompts, Trajectory, load_prompts
from fvqa.search.config import SearchConfig


@dataclass(frozen=True)
class RemoteJob:
    """One planned rollout as a worker receives it: the item with its image by path, mode, sampling."""

    item_id: str
    question: str
    image_path: str
    image_url: str | None
    data_id: str | None
    mode: Mode
    sampling: Sampling


@dataclass(frozen=True)
class ProbeShard:
    """One chunk's rollouts still to make (possibly none: the chunk's items are all resumed)."""

    jobs: list[RemoteJob]


@dataclass
class ShardResult:
    """A shard's trajectories (in job order) and what making them spent."""

    generator: str
    trajectories: list[Trajectory]
    calls: int = 0  # paid model calls
    usd: float = 0.0
    cache_hits: int = 0
    search_calls: int = 0  # paid search calls (and LLM page summaries)
    search_usd: float = 0.0


@dataclass
class _Chunk:
    """What the driver keeps of a chunk while its shard runs."""

    rows: list[dict[str, Any]]  # items with an image
    missing: list[tuple[str, str]]  # (item id, why): rejected `image_missing` when the chunk lands
    slots: list[tuple[str, tuple[str, int]]] = field(default_factory=list)  # (item id, slot) per job


def share_concurrency(cfg: ProbeConfig, search: SearchConfig, workers: int
                      ) -> tuple[ProbeConfig, SearchConfig]:
    """The configs one of `workers` workers runs with: every limit the user set for a whole build is
    divided among the workers (at least 1 each), so together they stay within it.

    That is `probe.llm.max_concurrency` (requests in flight over its endpoints), the LLM summariser's
    `search.summarizer.llm.max_concurrency`, and the search service limits (`image_concurrency`,
    `text_concurrency`, `rate_per_s`). `max_concurrency` bounds a client's requests over all its
    endpoints (and each endpoint's connection pool), so the share also bounds each endpoint. With more
    workers than a limit each still gets 1, and up to `ray.workers` requests are in flight: keep
    `ray.workers` at most `max_concurrency` to stay within it. None of these is part of a request, so
    cache keys (and replies) are those of the local path."""
    def share(n: int) -> int:
        return max(1, n // workers)

    if cfg.llm is not None:
        llm = cfg.llm.model_copy(update={"max_concurrency": share(cfg.llm.max_concurrency)})
        cfg = cfg.model_copy(update={"llm": llm})
    svc = search.service
    rate = svc.rate_per_s / workers if svc.rate_per_s else svc.rate_per_s
    svc = svc.model_copy(update={"image_concurrency": share(svc.image_concurrency),
                                 "text_concurrency": share(svc.text_concurrency), "rate_per_s": rate})
    summ = search.summarizer
    if summ.llm is not None:
        summ = summ.model_copy(update={"llm": summ.llm.model_copy(
            update={"max_concurrency": share(summ.llm.max_concurrency)})})
    return cfg, search.model_copy(update={"service": svc, "summarizer": summ})


class ProbeWorker:
    """Runs shards of probe rollouts in a Ray worker; built once per worker process.

    The generator and the search tools are built on the first shard, so a configuration error (an
    API key not set in the worker's environment, where keys are read: they are never shipped in
    shards or arguments) comes back to the driver as one line."""

    def __init__(self, cfg: ProbeConfig, search: SearchConfig, prompts: Prompts, llm_cache_dir: str,
                 search_cache_dir: str) -> None:
        self.cfg, self.search, self.prompts = cfg, search, prompts
        self.llm_cache_dir, self.search_cache_dir = llm_cache_dir, search_cache_dir
        self.generator: Generator | None = None
        self.tools: Any = None
        self._lock = threading.Lock()
        self._search_calls, self._search_usd = 0, 0.0

    def _search_cost(self, kind: str, n_calls: int, usd: float) -> None:
        with self._lock:  # called from the search threads
            self._search_calls += n_calls
            self._search_usd += usd

    def _build(self) -> Generator:
        if self.generator is None:
            from fvqa.search.tools import make_search_tools

            self.generator = probe_generator(self.cfg, Path(self.llm_cache_dir))
            self.tools = make_search_tools(self.search, cache_dir=Path(self.search_cache_dir),
                                           cost_hook=self._search_cost)
        return self.generator

    def _spent(self) -> tuple[int, float, int, int, float]:
        ledger = getattr(self.generator, "ledger", None)
        totals = ledger.stage(STAGE) if ledger is not None else None
        with self._lock:
            search = self._search_calls, self._search_usd
        if totals is None:
            return 0, 0.0, 0, *search
        return totals.calls, totals.usd, totals.cache_hits, *search

    def __call__(self, shard: ProbeShard) -> ShardResult:
        generator = self._build()
        jobs = [Job(AgentItem(j.item_id, j.question, _read_image(j.image_path), j.image_url, j.data_id),
                    j.mode, j.sampling) for j in shard.jobs]
        before = self._spent()
        try:
            trajs = run_many(jobs, generator, self.tools, self.cfg.limits, self.prompts) if jobs else []
        except LLMConfigError as exc:  # its keyword-only fields do not survive pickling back to the driver
            raise ConfigError(str(exc)) from None
        calls, usd, hits, s_calls, s_usd = (a - b for a, b in zip(self._spent(), before, strict=True))
        return ShardResult(generator.name, trajs, calls=int(calls), usd=float(usd), cache_hits=int(hits),
                           search_calls=int(s_calls), search_usd=float(s_usd))


def _read_image(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:  # the driver saw the file: on a cluster, a node without the workspace
        raise FvqaError(f"probe: a Ray worker cannot read the image {path} ({exc}); on several machines the "
                        "workspace must be on storage every node sees at the same path") from exc


def run_remote_probe(ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]], method: str) -> None:
    """The model probe with its rollouts on Ray workers; rows, labels and commits as the local path."""
    prompts = load_prompts(cfg.prompts)
    have_all = stored_rollouts(ctx, [r["item_id"] for r in rows], cfg.k)
    size = chunk_size(ctx, cfg)
    chunks: list[_Chunk] = []
    shards: list[ProbeShard] = []
    for start in range(0, len(rows), size):
        chunk, jobs = _Chunk([], []), []
        for r in rows[start:start + size]:
            path, why = image_file(ctx, r)
            if path is not None:
                try:
                    path.stat()
                except OSError as exc:
                    path, why = None, str(exc)
            if path is None:
                chunk.missing.append((r["item_id"], why))
                continue
            chunk.rows.append(r)
            for slot, mode, sampling in plan_rollouts(r["item_id"], cfg, set(have_all.get(r["item_id"], {}))):
                chunk.slots.append((r["item_id"], slot))
                jobs.append(RemoteJob(r["item_id"], r["question"], str(path.resolve()), r.get("image_url"),
                                      upstream_data_id(r), mode, sampling))
        chunks.append(chunk)
        shards.append(ProbeShard(jobs))
    tally = ProbeTally()
    if shards:
        ensure_ray(ctx.config.ray)
        workers = min(worker_count(ctx.config.ray), len(shards))  # what map_shards starts
        worker_cfg, worker_search = share_concurrency(cfg, ctx.config.search, workers)
        if cfg.llm is not None and workers > cfg.llm.max_concurrency:
            ctx.stats.notes.append(
                f"{workers} Ray workers, one request each: more than probe.llm.max_concurrency "
                f"({cfg.llm.max_concurrency}) in flight; set ray.workers to stay within it")
        init = dict(cfg=worker_cfg, search=worker_search, prompts=prompts,
                    llm_cache_dir=str((ctx.ws.cache_dir / "llm").resolve()),
                    search_cache_dir=str((ctx.ws.cache_dir / "search").resolve()))
        results = map_shards(ctx.config, ProbeWorker, init, shards, name=STAGE)
        description = f"probe: {cfg.backend} on {workers} Ray worker(s) ({size}/step)"
        landed = ctx.progress(zip(chunks, results, strict=True), total=len(chunks), description=description)
        for chunk, res in landed:
            for item_id, why in chunk.missing:
                ctx.reject(item_id, "image_missing", why)
            record_chunk(ctx, cfg, method, provenance_base(cfg, method, prompts, res.generator), chunk.rows,
                         chunk.slots, res.trajectories, have_all, tally)
            ctx.stats.paid_calls += res.calls + res.search_calls
            ctx.stats.cost_usd += res.usd + res.search_usd
            ctx.stats.cache_hits += res.cache_hits
    tally.notes(ctx)
