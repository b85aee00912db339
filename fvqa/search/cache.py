"""Persistent search cache: one SQLite file (WAL) in front of every backend, shared by processes.

Layers (like upstream's): `image` (image sha256 -> hits), `query` (text query -> result list),
`page` (URL -> extracted page text, or a remembered failure with its class), `summary`
((page hash, question) -> summary). Each layer counts hits and misses; entries expire after `ttl_s`
and the least recently used are evicted once the file's payload exceeds `max_mb`. Keys include
the backend name, so a local-index answer is never served to a web-backend run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

LAYERS = ("image", "query", "page", "summary")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    layer TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    ok INTEGER NOT NULL DEFAULT 1,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    used REAL NOT NULL,
    PRIMARY KEY (layer, key)
);
CREATE INDEX IF NOT EXISTS entries_used ON entries(used);
"""


def cache_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts` (stable across processes and Python versions)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class SearchCache:
    """Thread-safe get/put per layer with TTL, size cap and hit/miss counters."""

    def __init__(self, directory: Path | str, *, ttl_s: float | None = None, max_mb: float = 2048,
                 error_ttl_s: float = 86_400) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "search_cache.sqlite"
        self.ttl_s = ttl_s
        self.error_ttl_s = error_ttl_s
        self.max_bytes = int(max_mb * 1_000_000)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.executescript(SCHEMA)
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._puts_since_check = 0

    def get(self, layer: str, key: str) -> tuple[bool, Any] | None:
        """`(ok, value)` if a live entry exists (counted as a hit), else None (a miss)."""
        now = time.time()
        with self._lock:
            row = self._con.execute(
                "SELECT value, ok, created FROM entries WHERE layer = ? AND key = ?", (layer, key)
            ).fetchone()
            if row is not None:
                value, ok, created = row
                ttl = self.ttl_s if ok else min(self.error_ttl_s, self.ttl_s or self.error_ttl_s)
                if ttl is not None and now - created > ttl:
                    self._con.execute("DELETE FROM entries WHERE layer = ? AND key = ?", (layer, key))
                    row = None
                else:
                    self._con.execute("UPDATE entries SET used = ? WHERE layer = ? AND key = ?", (now, layer, key))
            if row is None:
                self.misses[layer] += 1
                return None
            self.hits[layer] += 1
        return bool(ok), json.loads(value)

    def put(self, layer: str, key: str, value: Any, *, ok: bool = True) -> None:
        """Store a JSON-able value (or, with ok=False, a failure description) and evict if over size."""
        blob = json.dumps(value, ensure_ascii=False)
        now = time.time()
        with self._lock:
            self._con.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)",
                (layer, key, blob, int(ok), len(blob), now, now),
            )
            self._puts_since_check += 1
            if self._puts_since_check >= 100:
                self._puts_since_check = 0
                self._evict()

    def _evict(self) -> None:
        (total,) = self._con.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()
        if total <= self.max_bytes:
            return
        target = int(self.max_bytes * 0.9)
        self._con.execute("BEGIN")
        for rowid, size in self._con.execute("SELECT rowid, size FROM entries ORDER BY used").fetchall():
            if total <= target:
                break
            self._con.execute("DELETE FROM entries WHERE rowid = ?", (rowid,))
            total -= size
        self._con.execute("COMMIT")

    def evict_now(self) -> None:
        """Apply the size cap immediately (normally checked every 100 writes)."""
        with self._lock:
            self._evict()

    def stats(self) -> dict[str, Any]:
        """Per-layer hits, misses and stored entries (for stage summaries and `/metrics`)."""
        with self._lock:
            counts = dict(self._con.execute("SELECT layer, count(*) FROM entries GROUP BY layer").fetchall())
            (size,) = self._con.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()
        return {
            "layers": {
                layer: {"hits": self.hits[layer], "misses": self.misses[layer], "entries": counts.get(layer, 0)}
                for layer in LAYERS
            },
            "bytes": size,
        }

    def close(self) -> None:
        with self._lock:
            self._con.close()
