"""Search tools for the agent: `image_search(image)` and `text_search(query, question)`.

Backends: `local` (BM25 + CLIP index over a user corpus; offline default), `web` (SerpAPI), `replay`
(upstream's released image-search caches), `http` (the shared `fvqa search serve` service). A
persistent SQLite cache sits in front of every backend. Start with `make_search_tools(cfg.search,
cache_dir=ws.cache_dir / "search")`. Names are imported lazily so `import fvqa.search` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "SearchConfig": "fvqa.search.config",
    "SearchTools": "fvqa.search.tools",
    "make_search_tools": "fvqa.search.tools",
    "ledger_hook": "fvqa.search.tools",
    "SearchClient": "fvqa.search.client",
    "build_index": "fvqa.search.local_index",
    "LocalIndex": "fvqa.search.local_index",
    "ImageHit": "fvqa.search.types",
    "TextHit": "fvqa.search.types",
    "SearchError": "fvqa.search.types",
    "BadRequest": "fvqa.search.types",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fvqa.search' has no attribute {name!r}")
