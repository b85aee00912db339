"""Build (or keep) the local search index that probe, eval and training search against offline.

The index is derived data, not catalog rows: it lives in the folder `search.local.index_dir`
and is rebuilt only when its inputs or CLIP model change (`ensure_index`), so re-runs cost nothing.
With `executor: ray` its images are read and embedded on Ray workers; the rest of the build (pages,
joins, rows, the ANN index, publishing) stays in this process and the index is the same.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from fvqa.config import IndexConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.executor import map_shards, uses_ray
from fvqa.pipelines.base import Stage, StageContext


def index_inputs(cfg: IndexConfig, config: RunConfig) -> tuple[Path, Path | None]:
    """Corpus jsonl and image manifest (a demo world's local web is filled in at load, `fvqa.config`)."""
    if cfg.corpus is None:
        raise ConfigError("index.corpus is not set (and no demo world is configured)")
    return cfg.corpus, cfg.images


class IndexStage(Stage):
    """Local text (BM25) + image (CLIP) index over a page corpus, for the `local` search backend."""

    name = "index"
    outputs = ()
    description = "build the offline search index"

    def enabled(self, config: RunConfig) -> bool:
        """On when the local backend is chosen and told where its index lives."""
        if not config.index.enabled or config.search.backend != "local":
            return False
        return config.search.local.index_dir is not None

    def run(self, ctx: StageContext) -> None:
        from fvqa.search.local_index import ensure_index

        search = ctx.config.search
        corpus, images = index_inputs(ctx.cfg, ctx.config)
        shard_map = partial(map_shards, ctx.config) if uses_ray(ctx.config) else None
        stats = ensure_index(corpus, images, search.local.index_dir, config=search.local, shard_map=shard_map)
        if stats is None:
            ctx.stats.notes.append(f"index up to date: {search.local.index_dir}")
            return
        ctx.stats.n_in = stats.pages + stats.images + sum(stats.rejected.values())
        ctx.stats.n_out = stats.pages + stats.images
        ctx.stats.rejected.update(stats.rejected)
        n = stats.worker_processes
        where = f", embedded by {n} Ray worker{'s' * (n != 1)}" if shard_map else ""
        ctx.stats.notes.append(f"{stats.pages} pages, {stats.images} images ({stats.embedder}{where}) "
                               f"-> {search.local.index_dir}")
