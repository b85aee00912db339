"""Persistent response cache and batch-job records, in one SQLite file (WAL).

Why SQLite: every write is one committed transaction, so `kill -9` at any point loses at most the
reply in flight, and readers never see half a record. Errors are stored with their class so a
deterministic failure (HTTP 400) is not paid for twice; transient ones are never stored.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    ok INTEGER NOT NULL,
    body TEXT,
    error_class TEXT,
    error TEXT,
    model TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_jobs (
    job TEXT PRIMARY KEY,
    base_url TEXT NOT NULL,
    input_file_id TEXT,
    batch_id TEXT,
    status TEXT NOT NULL,
    n INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    job TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (job, key)
);
CREATE INDEX IF NOT EXISTS batch_items_key ON batch_items(key);
"""

# Batch states after which a job holds nothing more to merge.
TERMINAL = ("merged", "failed", "expired", "cancelled", "abandoned")


def request_key(kind: str, model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of a request; `messages` must already carry image hashes."""
    blob = json.dumps(
        {"kind": kind, "model": model, "messages": messages, "params": params},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class CachedResponse:
    """A stored outcome: a reply body, or an error with its class."""

    ok: bool
    body: dict[str, Any] | None
    error_class: str | None
    error: str | None


@dataclass(frozen=True)
class BatchJob:
    job: str
    base_url: str
    input_file_id: str | None
    batch_id: str | None
    status: str
    n: int


class ResponseCache:
    """`cache_dir/llm.sqlite`: request key -> reply (or deterministic error), plus batch jobs."""

    def __init__(self, cache_dir: Path | str, *, secrets: list[str] | None = None) -> None:
        """`secrets` (API keys) are scrubbed from everything written, e.g. an error echoing the key."""
        self.secrets = [s for s in (secrets or []) if s]
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "llm.sqlite"
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=NORMAL")  # durable against process death, which is the threat
        self._con.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._con.close()

    def get(self, key: str) -> CachedResponse | None:
        with self._lock:
            row = self._con.execute(
                "SELECT ok, body, error_class, error FROM responses WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        ok, body, error_class, error = row
        return CachedResponse(bool(ok), json.loads(body) if body else None, error_class, error)

    def has(self, key: str) -> bool:
        with self._lock:
            return self._con.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def count(self, keys: list[str]) -> int:
        """How many of `keys` are answered already (for cost estimates)."""
        return sum(self.has(k) for k in keys)

    def put_ok(self, key: str, body: dict[str, Any], model: str) -> None:
        self._put(key, True, json.dumps(body, ensure_ascii=False), None, None, model)

    def put_error(self, key: str, error_class: str, error: str, model: str) -> None:
        self._put(key, False, None, error_class, error, model)

    def scrub(self, text: str | None) -> str | None:
        """The text with every secret replaced by ***."""
        if text is None:
            return None
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _put(
        self, key: str, ok: bool, body: str | None, ecls: str | None, err: str | None, model: str
    ) -> None:
        body, err = self.scrub(body), self.scrub(err)
        with self._lock:
            self._con.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, int(ok), body, ecls, err, model, time.time()),
            )

    def forget_errors(self) -> int:
        """Drop cached errors so the next run retries them (e.g. after fixing a prompt)."""
        with self._lock:
            return self._con.execute("DELETE FROM responses WHERE ok = 0").rowcount

    # -- batch jobs -------------------------------------------------------------------------------

    def add_job(self, job: str, base_url: str, keys: list[str]) -> None:
        """Record a job and its keys *before* anything is uploaded, so a crash can find it."""
        now = time.time()
        with self._lock:
            self._con.execute("BEGIN")
            self._con.execute(
                "INSERT OR IGNORE INTO batch_jobs VALUES (?, ?, NULL, NULL, 'new', ?, ?, ?)",
                (job, base_url, len(keys), now, now),
            )
            self._con.executemany("INSERT OR IGNORE INTO batch_items VALUES (?, ?)", [(job, k) for k in keys])
            self._con.execute("COMMIT")

    def update_job(self, job: str, **fields: str | None) -> None:
        allowed = {"input_file_id", "batch_id", "status"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"can only update {sorted(allowed)}")
        cols = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._con.execute(
                f"UPDATE batch_jobs SET {cols}, updated = ? WHERE job = ?",
                (*fields.values(), time.time(), job),
            )

    def job(self, job: str) -> BatchJob | None:
        with self._lock:
            row = self._con.execute(
                "SELECT job, base_url, input_file_id, batch_id, status, n FROM batch_jobs WHERE job = ?",
                (job,),
            ).fetchone()
        return BatchJob(*row) if row else None

    def open_jobs_for(self, keys: list[str]) -> dict[str, list[str]]:
        """Unfinished jobs that hold any of `keys`: job -> its keys among them."""
        wanted = set(keys)
        out: dict[str, list[str]] = {}
        with self._lock:
            rows = self._con.execute(
                "SELECT i.job, i.key FROM batch_items i JOIN batch_jobs j USING (job) "
                f"WHERE j.status NOT IN ({','.join('?' * len(TERMINAL))})",
                TERMINAL,
            ).fetchall()
        for job, key in rows:
            if key in wanted:
                out.setdefault(job, []).append(key)
        return out

    def job_keys(self, job: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._con.execute("SELECT key FROM batch_items WHERE job = ?", (job,))]
