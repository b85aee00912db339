"""Persistent response cache and batch-job records, in one SQLite file (WAL).

Why SQLite: every write is one committed transaction, so `kill -9` at any point loses at most the
reply in flight, and readers never see half a record. Each paid reply is stored together with its
`spend` row (stage, tokens, dollars; the batch id for Batch API lines) in one transaction, so after
a kill the money on the books equals the replies kept: `read_spend` sums it for `fvqa status`. Errors are stored with their class so a
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

from fvqa.llm.config import Price
from fvqa.redact import Scrubber

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
CREATE TABLE IF NOT EXISTS spend (
    key TEXT NOT NULL,
    stage TEXT NOT NULL,
    model TEXT,
    usd REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    batch TEXT,
    created REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS spend_batch_line ON spend(key, batch);
CREATE TABLE IF NOT EXISTS batch_extra (
    batch_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    status TEXT NOT NULL,
    updated REAL NOT NULL
);
"""

@dataclass(frozen=True)
class SpendRow:
    stage: str
    model: str | None
    batch: bool
    calls: int
    prompt_tokens: int
    completion_tokens: int
    usd: float


def _spend_rows(con: sqlite3.Connection) -> list[SpendRow]:
    rows = con.execute(
        "SELECT stage, model, batch IS NOT NULL, count(*), sum(prompt_tokens), sum(completion_tokens), sum(usd) "
        "FROM spend GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall()
    return [SpendRow(s, m, bool(b), n, int(p or 0), int(c or 0), float(u or 0.0)) for s, m, b, n, p, c, u in rows]


def read_spend(root: Path | str) -> list[SpendRow]:
    """Every `llm.sqlite` under `root` (a workspace's `cache/`), read-only: its booked spend.

    Caches of an older fvqa (no `spend` table) contribute nothing."""
    out: list[SpendRow] = []
    for path in sorted(Path(root).rglob("llm.sqlite")):
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        except sqlite3.Error:
            continue
        try:
            out += _spend_rows(con)
        except sqlite3.Error:  # no spend table
            pass
        finally:
            con.close()
    return out


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
        self.scrubber = Scrubber(self.secrets)
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

    def put_ok(
        self,
        key: str,
        body: dict[str, Any],
        model: str,
        *,
        stage: str | None = None,
        price: Price | None = None,
        usd: float | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        batch: str | None = None,
    ) -> None:
        """Store a reply; with `stage`, also its spend row in the same transaction.

        Tokens default to the body's `usage`; `usd` defaults to `price` (batch-discounted when
        `batch`, the batch id, is set). One row per online payment; a batch line is booked once per
        (key, batch), so merging a batch's output again after a kill books nothing twice."""
        spend = None
        if stage is not None:
            usage = body.get("usage") or {}
            p = int(prompt_tokens if prompt_tokens is not None else usage.get("prompt_tokens") or 0)
            c = int(completion_tokens if completion_tokens is not None else usage.get("completion_tokens") or 0)
            if usd is None:
                usd = price.usd(p, c, batch=batch is not None) if price is not None else 0.0
            spend = (key, stage, model, float(usd), p, c, batch)
        self._put(key, True, json.dumps(body, ensure_ascii=False), None, None, model, spend=spend)

    def add_spend(
        self, key: str, stage: str, model: str, usd: float, prompt_tokens: int, completion_tokens: int, batch: str
    ) -> bool:
        """Book a batch line whose reply is not stored (a duplicate batch that could not be
        cancelled still bills its lines); False if this line was booked already."""
        with self._lock:
            cur = self._con.execute(
                "INSERT OR IGNORE INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, stage, model, usd, prompt_tokens, completion_tokens, batch, time.time()),
            )
            return cur.rowcount > 0

    def put_error(self, key: str, error_class: str, error: str, model: str) -> None:
        self._put(key, False, None, error_class, error, model)

    def scrub(self, text: str | None) -> str | None:
        """The text with every secret (in any form `fvqa.redact` knows) replaced by ***."""
        return None if text is None else self.scrubber.text(text)

    def _put(
        self,
        key: str,
        ok: bool,
        body: str | None,
        ecls: str | None,
        err: str | None,
        model: str,
        *,
        spend: tuple[Any, ...] | None = None,
    ) -> None:
        body, err = self.scrub(body), self.scrub(err)
        now = time.time()
        with self._lock:
            self._con.execute("BEGIN")
            try:
                self._con.execute(
                    "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (key, int(ok), body, ecls, err, model, now),
                )
                if spend is not None:
                    self._con.execute("INSERT OR IGNORE INTO spend VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*spend, now))
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")

    def spend(self) -> list[SpendRow]:
        """Paid calls booked in this cache, per (stage, model, online/batch)."""
        with self._lock:
            return _spend_rows(self._con)

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

    def add_extra_batch(self, job: str, batch_id: str, status: str) -> None:
        """A second batch found for `job` (an ambiguous create): cancelled, or still billing."""
        with self._lock:
            self._con.execute(
                "INSERT OR REPLACE INTO batch_extra VALUES (?, ?, ?, ?)", (batch_id, job, status, time.time())
            )

    def extra_batches(self, job: str | None = None) -> dict[str, str]:
        """Duplicate batches not yet settled (batch id -> last status), of `job` or of every job."""
        with self._lock:
            rows = self._con.execute(
                "SELECT batch_id, status FROM batch_extra WHERE status != 'settled'"
                + (" AND job = ?" if job else ""),
                (job,) if job else (),
            ).fetchall()
        return dict(rows)

    def job_keys(self, job: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._con.execute("SELECT key FROM batch_items WHERE job = ?", (job,))]
