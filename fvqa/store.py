"""The workspace: one folder holding a DuckDB catalog, a content-addressed image store and caches.

DuckDB is the source of truth. Every stage writes its rows in batches inside transactions, and a
re-run processes only keys missing from its output table (or already rejected), so a `kill -9`
loses at most one uncommitted batch and never repeats a committed (possibly paid) call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from fvqa.errors import WorkspaceError
from fvqa.reasons import check_code, codes_of, legacy_code
from fvqa.schema import SCHEMA_VERSION
from fvqa.vision.gate import CheckedImage, ImageReject, check_image

DEFAULT_WORKSPACE = Path("fvqa-work")

# Tables every stage may read. Stage-private tables (probe_rollouts, llm batches...) are created by
# their own modules with `Workspace.ensure_table`.
CORE_DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS concepts (
    concept_id VARCHAR PRIMARY KEY, entry_id BIGINT, concept VARCHAR, count BIGINT, tier VARCHAR,
    category VARCHAR, provenance VARCHAR);
CREATE TABLE IF NOT EXISTS images (
    sha256 VARCHAR PRIMARY KEY, ext VARCHAR, width INTEGER, height INTEGER, n_bytes BIGINT,
    phash VARCHAR, provenance VARCHAR);
CREATE TABLE IF NOT EXISTS crawled (
    concept_id VARCHAR PRIMARY KEY, image_sha256 VARCHAR, image_url VARCHAR, page_url VARCHAR,
    page_title VARCHAR, page_text VARCHAR, clip_score DOUBLE, provenance VARCHAR);
CREATE TABLE IF NOT EXISTS items (
    item_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, question VARCHAR NOT NULL,
    answer VARCHAR NOT NULL, aliases VARCHAR[], answer_eval VARCHAR, question_type VARCHAR,
    image_sha256 VARCHAR, image_url VARCHAR, page_url VARCHAR, page_title VARCHAR, concept VARCHAR,
    concept_count BIGINT, concept_tier VARCHAR, entity_id VARCHAR, entity_text VARCHAR,
    provenance VARCHAR, data_id VARCHAR);
CREATE TABLE IF NOT EXISTS tags (
    item_id VARCHAR PRIMARY KEY, knowledge_type VARCHAR, knowledge_subtype VARCHAR,
    confidence DOUBLE, provenance VARCHAR);
CREATE TABLE IF NOT EXISTS labels (
    item_id VARCHAR PRIMARY KEY, search_label VARCHAR, p_direct DOUBLE, p_search DOUBLE,
    probe_k BIGINT, probe_method VARCHAR, provenance VARCHAR);
CREATE TABLE IF NOT EXISTS splits (item_id VARCHAR PRIMARY KEY, split VARCHAR, provenance VARCHAR);
CREATE TABLE IF NOT EXISTS gold (
    item_id VARCHAR PRIMARY KEY, status VARCHAR, answer VARCHAR, aliases VARCHAR[],
    knowledge_type VARCHAR, search_label VARCHAR, round VARCHAR, provenance VARCHAR, question VARCHAR);
-- a reviewed question (annotation edits); workspaces made before it get the column here
ALTER TABLE gold ADD COLUMN IF NOT EXISTS question VARCHAR;
CREATE TABLE IF NOT EXISTS rejects (
    stage VARCHAR, key VARCHAR, reason VARCHAR, detail VARCHAR, time TIMESTAMP);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR, stage VARCHAR, config_hash VARCHAR, started_at TIMESTAMP, seconds DOUBLE,
    n_in BIGINT, n_out BIGINT, n_rejected BIGINT, cost_usd DOUBLE, stats VARCHAR, status VARCHAR);
"""

# The dataset as users see it: items with their tags, labels, split and human decisions applied.
# Human (gold) decisions win over pipeline values; rejected items disappear from it.
DATASET_VIEW = """
CREATE OR REPLACE VIEW dataset AS
SELECT
    i.item_id, i.source, i.data_id, COALESCE(g.question, i.question) AS question,
    COALESCE(g.answer, i.answer) AS answer,
    COALESCE(g.aliases, i.aliases) AS aliases,
    CASE WHEN g.status = 'fixed' THEN NULL ELSE i.answer_eval END AS answer_eval,  -- stale once fixed
    i.question_type, i.image_sha256, im.ext AS image_ext, i.image_url, i.page_url,
    i.page_title, i.concept, i.concept_count, i.concept_tier, i.entity_id, i.entity_text,
    COALESCE(g.knowledge_type, t.knowledge_type) AS knowledge_type,
    t.knowledge_subtype, t.confidence AS tag_confidence,
    l.p_direct, l.p_search, l.probe_k, l.probe_method,
    COALESCE(g.search_label, l.search_label) AS search_label,
    COALESCE(s.split, 'unassigned') AS split,
    COALESCE(g.status, 'unreviewed') AS annotation_status,
    i.provenance
FROM items i
LEFT JOIN images im ON im.sha256 = i.image_sha256
LEFT JOIN tags t USING (item_id)
LEFT JOIN labels l USING (item_id)
LEFT JOIN splits s USING (item_id)
LEFT JOIN gold g USING (item_id)
WHERE COALESCE(g.status, '') <> 'rejected'
"""


def _legacy_data_id(item_id: str, source: str | None, provenance: str | None) -> str | None:
    """Where a schema-v1 workspace kept an item's upstream ``data_id``: in the import provenance
    (``{"import": {"data_id": ...}}``), or, for InfoSeek items, in the item id ``infoseek-<data_id>``
    (unless the line had no data_id and the id fell back to ``<file>:<line>``). Only the v1 -> v2
    migration reads it; since v2 it is the column ``items.data_id``."""
    try:
        prov = json.loads(provenance or "{}")
    except (TypeError, ValueError):
        return None
    prov = prov if isinstance(prov, dict) else {}
    imported = prov.get("import")
    if isinstance(imported, dict) and imported.get("data_id") not in (None, ""):
        return str(imported["data_id"])
    infoseek = prov.get("infoseek")
    if source == "infoseek" and item_id.startswith("infoseek-") and isinstance(infoseek, dict):
        data_id = item_id.removeprefix("infoseek-")
        if data_id and data_id != f"{infoseek.get('file')}:{infoseek.get('line')}":
            return data_id
    return None


def _v2_data_id_column(ws: Workspace) -> None:
    """v2: upstream's ``data_id`` becomes the column ``items.data_id``, back-filled from v1's places."""
    ws.execute("ALTER TABLE items ADD COLUMN IF NOT EXISTS data_id VARCHAR")
    rows = ws.execute("SELECT item_id, source, provenance FROM items WHERE data_id IS NULL")
    found = [(item_id, _legacy_data_id(item_id, source, prov)) for item_id, source, prov in rows]
    found = [(item_id, data_id) for item_id, data_id in found if data_id is not None]
    if not found:
        return
    table = pa.table({"item_id": [r[0] for r in found], "data_id": [r[1] for r in found]})
    ws.con.register("_v2_data_ids", table)
    try:
        ws.execute("UPDATE items SET data_id = d.data_id FROM _v2_data_ids d WHERE items.item_id = d.item_id")
    finally:
        ws.con.unregister("_v2_data_ids")


def _v3_reason_codes(ws: Workspace) -> None:
    """v3: reject reasons become codes from `fvqa.reasons`; a reason that was more than a rename
    (e.g. ``HTTP 404`` -> ``http_error``) keeps its old text at the front of the detail."""
    pairs = ws.execute("SELECT DISTINCT stage, reason FROM rejects")
    moves = [(stage, reason, *legacy_code(stage, reason)) for stage, reason in pairs
             if reason is not None and reason not in codes_of(stage)]
    for stage, reason, code, keep_text in moves:
        ws.execute(
            "UPDATE rejects SET reason = ?, detail = CASE WHEN ? THEN ? || coalesce(': ' || nullif(detail, ''), '') "
            "ELSE detail END WHERE stage = ? AND reason = ?", [code, keep_text, reason, stage, reason])


MIGRATIONS: dict[int, Callable[[Workspace], None]] = {2: _v2_data_id_column, 3: _v3_reason_codes}
"""Schema version -> the step that brings a workspace of the version before it up to it."""


@dataclass(frozen=True)
class ImageRef:
    """A stored image: its content hash, file extension and absolute path."""

    sha256: str
    ext: str
    path: Path
    width: int
    height: int


ImageError = ImageReject
"""Bytes that do not pass the image gate (`fvqa.vision.gate`; its `reason` goes into `rejects`)."""


def now() -> datetime:
    """Current UTC time without tzinfo (DuckDB TIMESTAMP)."""
    return datetime.now(UTC).replace(tzinfo=None)


_SUBFOLDERS = ("images", "cache", "exports")
PROGRESS_FILE = "build-progress.json"  # a running build's snapshot, readable while DuckDB is locked


def write_progress(root: Path | str, snapshot: dict[str, Any]) -> None:
    """Publish a build's progress as `<root>/build-progress.json`, atomically (temp file + rename),
    so `fvqa status` never reads half a file. A failed write is ignored: it must not stop a build."""
    root = Path(root)
    try:
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".build-progress-", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(snapshot, fh, default=str)
        os.replace(tmp, root / PROGRESS_FILE)
    except OSError:
        pass


def read_progress(root: Path | str) -> dict[str, Any] | None:
    """The last published build snapshot of the workspace at `root` (None: none or unreadable)."""
    try:
        data = json.loads((Path(root) / PROGRESS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class WorkspaceLocked(WorkspaceError):
    """Another process holds the workspace's DuckDB lock (a running build, usually)."""


def _check_readable(root: Path, db: Path) -> None:
    """Why a workspace cannot be read, as one `WorkspaceError` line naming the path; touches nothing."""
    if not root.exists():
        raise WorkspaceError(f"no workspace at {root} (run `fvqa build` first)")
    if not root.is_dir():
        raise WorkspaceError(f"workspace {root} is a file, not a folder: pass the workspace folder")
    if not db.exists():
        raise WorkspaceError(f"no workspace at {root}: the folder has no fvqa.duckdb (run `fvqa build` first)")
    if db.is_dir():
        raise WorkspaceError(f"workspace {root}: {db.name} is a folder, not a DuckDB database file")
    if not os.access(db, os.R_OK):
        raise WorkspaceError(f"workspace {root}: cannot read {db.name} (permission denied)")


def check_writable(root: Path | str) -> None:
    """Why a workspace could not be opened for writing, as one `WorkspaceError` line; creates nothing.

    The build calls it before writing anything else (the demo world, the search index), so a bad
    `--workspace` fails before minutes of work instead of after them."""
    root = Path(root).resolve()
    _check_folders(root, root / "fvqa.duckdb")


def _check_folders(root: Path, db: Path) -> None:
    """The checks of `_prepare_folders`, without creating anything."""
    if root.exists() and not root.is_dir():
        raise WorkspaceError(f"workspace {root} is a file, not a folder: pass a folder (or a new path)")
    if not root.exists():
        parent = next(p for p in root.parents if p.exists())  # "/" always exists
        if not parent.is_dir():
            raise WorkspaceError(f"cannot create workspace {root}: {parent} is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise WorkspaceError(f"cannot create workspace {root}: permission denied in {parent}")
        return
    if not os.access(root, os.W_OK | os.X_OK):
        raise WorkspaceError(f"workspace {root} is not writable (permission denied)")
    for sub in _SUBFOLDERS:
        path = root / sub
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"workspace {root}: {sub}/ is a file, not a folder (move it aside)")
        if path.exists() and not os.access(path, os.W_OK | os.X_OK):
            raise WorkspaceError(f"workspace {root}: {sub}/ is not writable (permission denied)")
    if db.is_dir():
        raise WorkspaceError(f"workspace {root}: {db.name} is a folder, not a DuckDB database file")
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise WorkspaceError(f"workspace {root}: {db.name} is read-only (permission denied); "
                             "`fvqa status` and `fvqa sql` can still read it")


def _prepare_folders(root: Path, db: Path) -> None:
    """Check the workspace folder, its sub-folders and database file, creating only the folder
    itself (the sub-folders follow once DuckDB has opened the database), or say in one line why
    they cannot be used."""
    _check_folders(root, db)
    _mkdir(root)
    _check_folders(root, db)  # the new folder itself (a read-only mount lets mkdir succeed elsewhere)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a race with the checks above, or a read-only file system
        raise WorkspaceError(f"cannot create workspace folder {path}: "
                             f"{(exc.strerror or type(exc).__name__).lower()}") from exc


def _open_failure(root: Path, db: Path, exc: duckdb.Error) -> str:
    """DuckDB's refusal to open `db` as one line saying which problem it is (by its message)."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = re.sub(r'"[^"]*"', '""', text).lower()  # match DuckDB's words, not the quoted path's
    if "conflicting lock" in low or "could not set lock" in low:
        # "Could not set lock on file "...": Conflicting lock is held in <exe> (PID n)"
        pid = re.search(r"\(PID (\d+)\)", text)
        by = f" (PID {pid.group(1)})" if pid else ""
        return (f"workspace {root} is in use by another process{by}: wait for it to finish (or stop it), "
                "then retry")
    if "not a valid duckdb database" in low:
        return (f"workspace {root}: {db.name} is not a DuckDB database (corrupt or another kind of "
                "file): move it aside or use another --workspace")
    if "is a directory" in low:
        return f"workspace {root}: {db.name} is a folder, not a DuckDB database file"
    if "permission denied" in low:
        return f"workspace {root}: cannot open {db.name} (permission denied)"
    if "read-only file system" in low:
        return f"workspace {root} is on a read-only file system"
    if "version" in low:
        return f"workspace {root}: {db.name} was written by another DuckDB version: {text}"
    return f"cannot open workspace {root}: {text}"


class Workspace:
    """One run folder: `fvqa.duckdb`, `images/`, `cache/`, `exports/`.

    Opening it read-write creates missing tables and migrates an older schema version (recorded in
    ``meta``) once; ``schema_version`` is the version of the tables as opened.
    """

    schema_version: int

    def __init__(self, root: Path | str = DEFAULT_WORKSPACE, *, read_only: bool = False) -> None:
        self.root = Path(root).resolve()
        self.read_only = read_only
        db = self.root / "fvqa.duckdb"
        if read_only:  # reading never creates anything: not the folder, not its sub-folders
            _check_readable(self.root, db)
        else:
            _prepare_folders(self.root, db)
        try:
            self.con = duckdb.connect(str(db), read_only=read_only)
        except duckdb.Error as exc:
            message = _open_failure(self.root, db, exc)
            kind = WorkspaceLocked if " is in use by another process" in message else WorkspaceError
            raise kind(message) from exc
        try:
            for sub in () if read_only else _SUBFOLDERS:
                _mkdir(self.root / sub)
        except BaseException:
            self.con.close()
            raise
        self._in_tx = False
        self._keyed: dict[str, bool] = {}
        self.on_commit: list[Callable[[], None]] = []  # called after each committed transaction
        try:
            if not read_only:
                self.execute(CORE_DDL)
            self._check_version()
            if not read_only:
                self.execute(DATASET_VIEW)
        except BaseException:
            self.con.close()  # a refused or failed open must not keep the database locked
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Close the DuckDB connection (checkpointing the WAL)."""
        self.con.close()

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_version(self) -> None:
        try:
            row = next(iter(self.execute("SELECT value FROM meta WHERE key = 'schema_version'")), None)
        except duckdb.CatalogException as exc:  # only a read-only open gets here without `meta`
            raise WorkspaceError(f"workspace {self.root}: fvqa.duckdb is a DuckDB database but not an fvqa "
                                 "workspace (no `meta` table)") from exc
        if row is None:
            if not self.read_only:
                self.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
            self.schema_version = SCHEMA_VERSION
            return
        found = int(row[0])
        if found > SCHEMA_VERSION:
            raise WorkspaceError(
                f"workspace {self.root} was created by a newer fvqa (schema v{found}; this fvqa reads "
                f"up to v{SCHEMA_VERSION}): upgrade fvqa or use another --workspace"
            )
        self.schema_version = found
        if found < SCHEMA_VERSION and not self.read_only:
            self._migrate(found)

    def _migrate(self, found: int) -> None:
        """Bring an older workspace up to SCHEMA_VERSION: every step and the new version in one
        transaction, so a crash leaves the old version intact and the next open simply retries.

        A read-only open never migrates: it reads the tables (and `dataset` view) as they are.
        """
        with self.transaction():
            for version in range(found + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](self)
            self.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        self.schema_version = SCHEMA_VERSION

    # -- paths -----------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        """Where LLM and search caches live (survive re-runs; never hold secrets)."""
        return self.root / "cache"

    @property
    def exports_dir(self) -> Path:
        """Where `fvqa export` writes."""
        return self.root / "exports"

    def image_path(self, sha256: str, ext: str) -> Path:
        """Content-addressed location `images/ab/<sha256>.<ext>`."""
        return self.root / "images" / sha256[:2] / f"{sha256}.{ext}"

    def find_image(self, sha256: str) -> Path:
        """Path of a stored image by hash (extension looked up in the catalog)."""
        row = next(iter(self.execute("SELECT ext FROM images WHERE sha256 = ?", [sha256])), None)
        if row is None:
            raise KeyError(f"image {sha256} not in workspace")
        return self.image_path(sha256, row[0])

    # -- images ----------------------------------------------------------------------------
    def store_image(
        self, data: bytes, *, provenance: dict[str, Any] | None = None, checked: CheckedImage | None = None,
        min_side: int = 1,
    ) -> tuple[ImageRef, dict[str, Any]]:
        """Gate image bytes, write the file once by content hash (atomic) and return its ref and its
        `images` row, *not inserted*: the caller commits the row in the transaction of the batch that
        references it (a file nothing references is harmless; a row without its item is not).

        `checked`: the gate's result for `data` when the caller already has it (crawl re-encodes its
        checked image itself); otherwise `check_image(data, min_side=min_side)` runs here and raises
        `ImageError` (= `ImageReject`)."""
        if checked is None:
            checked = check_image(data, min_side=min_side)
        sha = hashlib.sha256(data).hexdigest()
        path = self.image_path(sha, checked.ext)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        row = dict(sha256=sha, ext=checked.ext, width=checked.width, height=checked.height, n_bytes=len(data),
                   provenance=json.dumps(provenance or {}))
        return ImageRef(sha, checked.ext, path, checked.width, checked.height), row

    def put_image(self, data: bytes, *, provenance: dict[str, Any] | None = None, min_side: int = 1) -> ImageRef:
        """`store_image` and insert its row right away (inside the current transaction, if any).

        For single images outside a stage batch; a stage storing images for the rows it emits uses
        `store_image` and commits the row with them."""
        ref, row = self.store_image(data, provenance=provenance, min_side=min_side)
        self.insert("images", [row])
        return ref

    # -- rows ------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All-or-nothing write; nested use joins the outer transaction."""
        if self._in_tx:
            yield
            return
        self.execute("BEGIN TRANSACTION")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self.execute("ROLLBACK")
            raise
        else:
            self.execute("COMMIT")
        finally:
            self._in_tx = False
        for hook in self.on_commit:  # e.g. the build's progress snapshot
            hook()

    def ensure_table(self, ddl: str) -> None:
        """Create a stage-private table (`CREATE TABLE IF NOT EXISTS ...`)."""
        self.execute(ddl)

    def execute(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run a statement and drain its result (DuckDB 2 refuses new work while one is pending)."""
        return self.con.execute(sql, params or []).fetchall()

    def insert(self, table: str, rows: Sequence[dict[str, Any]], *, replace: bool = False) -> int:
        """Insert rows by column name; rows whose key already exists are ignored (or replaced)."""
        if not rows:
            return 0
        # every key of every row (from_pylist alone would take the columns of the first row only)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return self.insert_arrow(table, pa.Table.from_pydict({c: [row.get(c) for row in rows] for c in columns}),
                                 replace=replace)

    def insert_arrow(self, table: str, arrow: pa.Table, *, replace: bool = False, unique: bool = False) -> int:
        """`insert` for rows already in columns: millions of rows without a dict per row.

        `unique`: the caller guarantees no key repeats and none is in the table yet, so a plain
        INSERT runs (DuckDB's OR IGNORE path costs ~0.5 KB more memory per row: GBs at 4M rows)."""
        if not arrow.num_rows:
            return 0
        name = f"_ins_{table}"
        self.con.register(name, arrow)
        try:
            if unique or not self._has_key(table):
                verb = "INSERT"
            else:
                verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            self.execute(f"{verb} INTO {table} BY NAME SELECT * FROM {name}")
        finally:
            self.con.unregister(name)
        return arrow.num_rows

    def _has_key(self, table: str) -> bool:
        if table not in self._keyed:
            rows = self.execute(
                "SELECT count(*) FROM duckdb_constraints() WHERE table_name = ? "
                "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')", [table]
            )
            self._keyed[table] = bool(rows[0][0])
        return self._keyed[table]

    def keys(self, table: str, column: str) -> set[str]:
        """All values of a key column (used to skip work already done)."""
        return {r[0] for r in self.execute(f"SELECT {column} FROM {table}")}

    def rejected_keys(self, stage: str) -> set[str]:
        """Keys a stage has already rejected (not retried on re-run unless forced)."""
        rows = self.execute("SELECT DISTINCT key FROM rejects WHERE stage = ?", [stage])
        return {r[0] for r in rows}

    def reject(self, stage: str, key: str, code: str, detail: str = "") -> None:
        """Record a dropped input: a registered reason code (`fvqa.reasons`) and what was found."""
        self.add_rejects([(stage, key, code, detail)])

    def add_rejects(self, rejects: Iterable[tuple[str, str, str, str]]) -> None:
        """Record many rejects at once; every code must be registered for its stage (`fvqa.reasons`)."""
        rejects = list(rejects)
        for stage, _, code, _ in rejects:
            check_code(stage, code)
        rows = [dict(stage=s, key=k, reason=r, detail=d[:4000], time=now()) for s, k, r, d in rejects]
        if rows:
            self.insert("rejects", rows)

    def count(self, table: str) -> int:
        """Row count of a table (0 if it does not exist)."""
        try:
            return int(self.execute(f"SELECT count(*) FROM {table}")[0][0])
        except duckdb.CatalogException:
            return 0

    def tables(self) -> list[str]:
        """Names of all tables in the catalog."""
        rows = self.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1"
        )
        return [r[0] for r in rows]
