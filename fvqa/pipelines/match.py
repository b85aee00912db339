"""MetaCLIP-exact substring matching of vocabulary entries in captions.

MetaCLIP counts an entry as present in a caption when `" {entry} "` occurs in the caption after its
`spacing()` normalisation (pad with one space on each side, surround , . ; : ? ! and backtick with
spaces, turn tab, newline and carriage return into spaces). We must reproduce that test exactly, or
head/tail tiers and balancing would drift from the published counts.

A naive scan costs one `in` per entry per caption (500k entries: ~seconds per caption), so we build
one Aho-Corasick automaton over the wrapped entries and reuse it. It is daachorse's byte-wise
double-array automaton: at 500k keys the scan is memory-bound and its compact layout is ~1.5-2x
faster per caption than pyahocorasick's trie (bench/bench_match.py). `find_overlapping` reports
every occurrence of every key, overlapping ones and keys that are suffixes of others included
(`" a b "`, `" b "` and `" b c "` in `" a b c "`), which is what the reference's "every entry whose
wrapped form occurs" means; duplicate entries are registered as they are, so every index is
reported. Keys and captions are matched as UTF-8 (with `surrogatepass`, so lone surrogates work):
UTF-8 is a self-synchronising prefix code, hence a key's bytes occur in a caption's bytes exactly
when the key occurs in the caption. Large inputs are split into chunks and matched in worker
processes that inherit the automaton through `fork` instead of rebuilding it.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import daachorse
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fvqa.errors import ConfigError
from fvqa.executor import map_shards, uses_ray
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.match_sample import Summary, Totals, ranks_within, summarize
from fvqa.store import Workspace, now

if TYPE_CHECKING:
    from fvqa.config import RunConfig

# MetaCLIP's normalisation: these characters get a space on each side ...
PUNCTS_TO_WRAP: tuple[str, ...] = (",", ".", ";", ":", "?", "!", "`")
# ... and these become a space (applied after the punctuation step).
CHARS_TO_SPACE: tuple[str, ...] = ("\t", "\n", "\r")

#: Below this many texts a worker pool costs more than it saves.
MIN_TEXTS_FOR_POOL = 5_000
DEFAULT_CHUNK_SIZE = 1_000
#: Chunks queued per worker: deep enough that workers never wait for a busy parent to feed them.
IN_FLIGHT_PER_PROCESS = 8
#: Joins a chunk's captions so they are normalised in one pass; spacing() leaves it unchanged, and a
#: chunk in which some caption contains it is normalised caption by caption instead.
_SEPARATOR = "\x00"


def spacing(text: str) -> str:
    """Normalise a caption exactly as MetaCLIP's `substr_matching.spacing` does."""
    out = " " + text + " "
    for punct in PUNCTS_TO_WRAP:
        if punct in out:
            out = out.replace(punct, " " + punct + " ")
    for char in CHARS_TO_SPACE:
        if char in out:
            out = out.replace(char, " ")
    return out


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _spaced_utf8(texts: Sequence[str]) -> list[bytes] | None:
    """`[_utf8(spacing(t)) for t in texts]` in a few whole-chunk string operations, or None if unsafe.

    Apart from its padding, spacing() replaces characters one at a time and never produces or
    consumes the separator, so spacing(a + sep + b) == spacing(a)[:-1] + sep + spacing(b)[1:]:
    padding each separator as spacing pads a text, then splitting at the separators, gives each
    text's own normalisation. That needs only that no text contains the separator (counted here).
    Measured: ~0.5 instead of ~0.7 µs per caption for normalising and encoding (a few % of a match).
    """
    try:
        joined = _SEPARATOR.join(texts)
    except TypeError:  # a non-str text: the caller's per-text path names it
        return None
    if joined.count(_SEPARATOR) != len(texts) - 1:
        return None
    spaced = spacing(joined).replace(_SEPARATOR, spacing(_SEPARATOR))
    return _utf8(spaced).split(_utf8(_SEPARATOR))


def default_processes() -> int:
    """CPUs this process may run on (respects affinity masks and container CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class EntryMatcher:
    """An Aho-Corasick automaton over `" {entry} "` keys, built once and reused for many texts."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.n_entries = len(entries)
        keys: list[bytes] = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, str):
                raise TypeError(f"entry #{index} is {type(entry).__name__}, expected str: {entry!r:.80}")
            keys.append(_utf8(" " + entry + " "))
        # Pattern id = entry index (duplicates included). The automaton lives in Rust memory that
        # matching never writes to, so forked workers keep sharing it instead of copying pages.
        self._automaton = daachorse.DoubleArrayAhoCorasick(keys, daachorse.MATCH_KIND_STANDARD)

    def match(self, text: str, *, position: int = 0) -> list[int]:
        """Sorted indices of the entries MetaCLIP would find in `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text #{position} is {type(text).__name__}, expected str: {text!r:.80}")
        return sorted({m[2] for m in self._automaton.find_overlapping(_utf8(spacing(text)))})

    def match_chunk(self, texts: Sequence[str], offset: int = 0) -> list[list[int]]:
        """`match` for each text; `offset` is the first text's position (for error messages)."""
        spaced = _spaced_utf8(texts)
        if spaced is None:  # a non-str text, or one containing the separator
            return [self.match(text, position=offset + i) for i, text in enumerate(texts)]
        find = self._automaton.find_overlapping
        # (start, end, entry index) per occurrence; the set keeps each entry once
        return [sorted({m[2] for m in find(data)}) for data in spaced]

    def iter_matches(
        self,
        texts: Iterable[str],
        *,
        processes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        min_pool_texts: int | None = None,
    ) -> Iterator[list[int]]:
        """Lazily yield `match(text)` per text, in input order, using worker processes if worthwhile.

        `processes=None` means all usable CPUs. A pool is only started for at least `min_pool_texts`
        texts (default: MIN_TEXTS_FOR_POOL when `processes` is None, else always). At most
        IN_FLIGHT_PER_PROCESS chunks per worker are in flight, so memory stays bounded for inputs
        larger than RAM.
        """
        if processes is not None and processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if min_pool_texts is None:
            min_pool_texts = MIN_TEXTS_FOR_POOL if processes is None else 0
        iterator = iter(texts)
        head = list(islice(iterator, min_pool_texts))
        if processes is None:
            processes = default_processes()
        if processes == 1 or len(head) < min_pool_texts:
            offset = 0
            for chunk in _chunks(_chain(head, iterator), chunk_size):
                yield from self.match_chunk(chunk, offset)
                offset += len(chunk)
            return
        yield from self._iter_pool(_chain(head, iterator), processes, chunk_size)

    def _iter_pool(self, texts: Iterator[str], processes: int, chunk_size: int) -> Iterator[list[int]]:
        # fork lets workers share the parent's automaton copy-on-write; elsewhere it is pickled once
        # per worker (daachorse supports pickling), which is slower to start but correct.
        # ProcessPoolExecutor rather than multiprocessing.Pool: Pool's worker-handler thread wakes
        # whenever a result is waiting to be read, which cost the parent ~0.3 of its ~0.7 CPU-s per 100k captions.
        methods = mp.get_all_start_methods()
        context = mp.get_context("fork" if "fork" in methods else None)
        pending: deque[Future[list[list[int]]]] = deque()
        executor = ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker, initargs=(self,))
        try:
            offset = 0
            for chunk in _chunks(texts, chunk_size):
                pending.append(executor.submit(_match_chunk, chunk, offset))
                offset += len(chunk)
                while len(pending) >= IN_FLIGHT_PER_PROCESS * processes:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:  # also on an error or an abandoned generator: queued chunks are dropped, workers joined
            executor.shutdown(wait=True, cancel_futures=True)


def match_texts(
    entries: list[str],
    texts: Iterable[str],
    *,
    processes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> list[list[int]]:
    """For each text, the sorted, de-duplicated indices of `entries` that MetaCLIP matches in it.

    Equivalent to `[i for i, e in enumerate(entries) if f" {e} " in spacing(text)]` per text.
    Build an `EntryMatcher` yourself to reuse the automaton across calls.
    """
    matcher = EntryMatcher(entries)
    return list(matcher.iter_matches(texts, processes=processes, chunk_size=chunk_size))


# -- worker side ----------------------------------------------------------------------------------
_WORKER_MATCHER: EntryMatcher | None = None


def _init_worker(matcher: EntryMatcher) -> None:
    global _WORKER_MATCHER
    _WORKER_MATCHER = matcher


def _match_chunk(texts: list[str], offset: int) -> list[list[int]]:
    assert _WORKER_MATCHER is not None, "worker not initialised"
    return _WORKER_MATCHER.match_chunk(texts, offset)


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(texts, size)):
        yield chunk


# -- stage ----------------------------------------------------------------------------------------
# The stage matches the whole vocabulary (not only sampled concepts), so `concepts` can take its
# tiers from these counts and `crawl` can join candidates to whichever concepts were sampled.

ENTRY_COUNTS_DDL = """CREATE TABLE IF NOT EXISTS entry_counts (
    entry_id BIGINT PRIMARY KEY, entry VARCHAR, count BIGINT, balanced_count BIGINT, provenance VARCHAR)"""
CANDIDATES_DDL = """CREATE TABLE IF NOT EXISTS match_candidates (
    entry_id BIGINT, rank INTEGER, url VARCHAR, page_url VARCHAR, caption VARCHAR,
    PRIMARY KEY (entry_id, rank))"""
POOL_BATCH_ROWS = 65_536
SUMMARY_ROWS = 65_536  # local path: usable rows per summary (`fvqa.pipelines.match_sample`)


def keep_probability(counts: Sequence[int], threshold: int) -> float:
    """MetaCLIP balancing: a pair is kept unless every matched entry independently drops it.

    Entry i keeps a pair with probability min(1, t / count_i), so tail entries keep all their pairs
    and head entries are capped at about t; a pair survives with 1 - prod(1 - min(1, t / count_i)).
    """
    drop = 1.0
    for count in counts:
        if count > 0:
            drop *= 1.0 - min(1.0, threshold / count)
    return 1.0 - drop if counts else 0.0


def _load_entries(path: Path) -> list[Any]:
    if not path.is_file():
        raise ConfigError(f"MetaCLIP metadata not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ConfigError(f"{path}: MetaCLIP metadata must be a JSON list of strings")
    return data


def _valid_entries(entries: Sequence[Any]) -> list[int]:
    """Indices of the entries that are strings (the others are rejected as `wrong_type`)."""
    return [i for i, e in enumerate(entries) if isinstance(e, str)]


def _entry_matcher(entries: Sequence[Any]) -> tuple[EntryMatcher, np.ndarray | None]:
    """The automaton over the string entries, and its index -> metadata index (None: the same)."""
    valid = _valid_entries(entries)
    to_entry = None if len(valid) == len(entries) else np.asarray(valid, dtype=np.int64)
    return EntryMatcher([entries[i] for i in valid]), to_entry


def _reject_row(ctx: StageContext, pool: Path, row_no: int, code: str, what: str, url: Any, caption: Any) -> None:
    """A pool row the stage cannot use: keyed by the pool's name and the row number."""
    ctx.reject(f"pool:{pool.name}:{row_no}", code, f"{what}: url={url!r:.200} caption={caption!r:.200}")


def _resolve_paths(config: RunConfig) -> tuple[Path, Path]:
    metadata, pool = config.concepts.metadata_path, config.match.pool  # a demo world's: filled in at load
    if metadata is None:
        raise ConfigError("concepts.metadata_path is not set (and no demo world is configured)")
    if pool is None:
        raise ConfigError("match.pool is not set: a Parquet file with url, caption[, page_url] columns")
    if not pool.is_file():
        raise ConfigError(f"match.pool not found: {pool}")
    return metadata, pool


def _open_pool(path: Path) -> tuple[pq.ParquetFile, list[str]]:
    """The pool's Parquet reader and the columns the stage reads; a ConfigError if it cannot be used."""
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"match.pool {path} is not a readable Parquet file: {exc}") from exc
    names = set(reader.schema_arrow.names)
    missing = {"url", "caption"} - names
    if missing:
        raise ConfigError(f"match.pool {path} lacks column(s) {', '.join(sorted(missing))} "
                          f"(has: {', '.join(sorted(names))})")
    return reader, ["url", "caption"] + (["page_url"] if "page_url" in names else [])


def _rows_of(batch: pa.RecordBatch | pa.Table, first_row: int) -> Iterator[tuple[int, Any, Any, Any]]:
    data = batch.to_pydict()
    pages = data.get("page_url") or [None] * batch.num_rows
    for i, (url, caption, page) in enumerate(zip(data["url"], data["caption"], pages, strict=True)):
        yield first_row + i, url, caption, page


def _pool_rows(path: Path) -> Iterator[tuple[int, Any, Any, Any]]:
    """(row number, url, caption, page_url) for every row of the Parquet pool, streamed in batches."""
    reader, columns = _open_pool(path)
    row_no = 0
    for batch in reader.iter_batches(batch_size=POOL_BATCH_ROWS, columns=columns):
        yield from _rows_of(batch, row_no)
        row_no += batch.num_rows


def pool_shards(path: Path, shard_rows: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of `shard_rows` rows (the last one shorter) covering the pool; a
    worker reads only the row groups its range overlaps."""
    reader, _ = _open_pool(path)
    total = reader.metadata.num_rows
    return [(lo, min(lo + shard_rows, total)) for lo in range(0, total, shard_rows)]


def _pool_range(path: Path, start: int, stop: int) -> Iterator[tuple[int, Any, Any, Any]]:
    """The rows [start, stop) of the pool, reading only the row groups that hold them."""
    reader, columns = _open_pool(path)
    first = 0
    for g in range(reader.metadata.num_row_groups):
        n = reader.metadata.row_group(g).num_rows
        lo, hi = max(start, first), min(stop, first + n)
        if lo < hi:
            table = reader.read_row_group(g, columns=columns).slice(lo - first, hi - lo)
            yield from _rows_of(table, lo)
        first += n
        if first >= stop:
            return


@dataclass
class ShardResult:
    """What a worker found in one row range: its summary and its unusable rows."""

    summary: Summary
    bad: list[tuple[int, str, str, Any, Any]]  # (row number, reason code, what, url, caption)


class MatchShardWorker:
    """Ray worker of `match`: builds the automaton once from the metadata file and summarises row
    ranges of the pool (both files read by path, so on a cluster they must be on shared storage).
    `balance_counts` (the raw counts of pass 1) makes it a balancing pass."""

    def __init__(self, metadata: str, pool: str, k: int, seed: int, threshold: int,
                 balance_counts: np.ndarray | None = None) -> None:
        self.matcher, self.to_entry = _entry_matcher(_load_entries(Path(metadata)))
        self.pool = Path(pool)
        self.sample = dict(k=k, seed=seed, balance_counts=balance_counts, threshold=threshold)

    def __call__(self, shard: tuple[int, int]) -> ShardResult:
        bad: list[tuple[int, str, str, Any, Any]] = []
        rows: list[int] = []
        captions: list[str] = []
        for row_no, url, caption, page in _pool_range(self.pool, *shard):
            problem = _row_problem(url, caption, page)
            if problem:
                bad.append((row_no, problem[0], problem[1], url, caption))
            else:
                rows.append(row_no)
                captions.append(caption)
        ids = list(self.matcher.iter_matches(captions, processes=1))
        return ShardResult(summarize(rows, ids, to_entry=self.to_entry, **self.sample), bad)


class MatchStage(Stage):
    """Caption pool -> per-entry match counts (`entry_counts`) and candidate URLs (`match_candidates`)."""

    name = "match"
    outputs = ("entry_counts", "match_candidates")
    description = "MetaCLIP substring matching over a caption pool"

    def prepare(self, ws: Workspace) -> None:
        ws.ensure_table(ENTRY_COUNTS_DDL)
        ws.ensure_table(CANDIDATES_DDL)

    def reset(self, ws: Workspace) -> None:
        self.prepare(ws)
        super().reset(ws)

    def run(self, ctx: StageContext) -> None:
        cfg = ctx.cfg
        if cfg.processes < 1 or cfg.candidates_per_concept < 0:
            raise ConfigError("match.processes must be >= 1 and match.candidates_per_concept >= 0")
        if ctx.ws.count("entry_counts"):
            ctx.stats.notes.append("entry_counts already computed; `--force match` recomputes them")
            return
        metadata, pool = _resolve_paths(ctx.config)
        threshold, k = ctx.config.concepts.threshold, cfg.candidates_per_concept
        entries = _load_entries(metadata)
        valid = _valid_entries(entries)
        for i in sorted(set(range(len(entries))) - set(valid)):
            ctx.reject(f"entry:{i}", "wrong_type", f"{entries[i]!r:.200} in {metadata}")
        scan = _RayScan(ctx, metadata, pool) if uses_ray(ctx.config) else _LocalScan(ctx, entries, pool)
        # pass 1: raw counts (and candidates, unless balancing changes which rows survive)
        k_first = 0 if cfg.balance else k
        raw = Totals(len(entries), k_first)
        for summary in scan.summaries(k=k_first, seed=cfg.seed, threshold=threshold, reject=True):
            raw.add(summary)
        ctx.stats.n_in = raw.n_rows + scan.bad_rows
        final, balanced = raw, None
        if cfg.balance:
            # pass 2: MetaCLIP balancing needs the final counts, so the pool is matched again
            final = Totals(len(entries), k)
            for summary in scan.summaries(k=k, seed=cfg.seed, threshold=threshold, reject=False,
                                          balance_counts=raw.counts):
                final.add(summary)
            balanced = final.counts
        self._write(ctx, entries, raw.counts, balanced, final.candidates(), metadata, pool, threshold)
        n_kept = final.n_kept
        ctx.stats.n_out = n_kept
        ctx.stats.notes.append(
            f"{raw.n_matched} of {raw.n_rows} captions matched at least one of {len(valid)} entries"
            + (f"; balancing (t={threshold}) kept {n_kept}" if cfg.balance else "")
        )
        ctx.stats.extra.update(matched_rows=raw.n_matched, kept_rows=n_kept,
                               entries_matched=int(np.count_nonzero(raw.counts)))
        scan.note()

    def _write(
        self,
        ctx: StageContext,
        entries: list[Any],
        counts: np.ndarray,
        balanced: np.ndarray | None,
        candidates: tuple[np.ndarray, np.ndarray],
        metadata: Path,
        pool: Path,
        threshold: int,
    ) -> None:
        """All outputs in one transaction: a crash leaves nothing half-written, the re-run starts over."""
        provenance = json.dumps({"stage": "match", "metadata": str(metadata), "pool": str(pool),
                                 "balance": ctx.cfg.balance, "threshold": threshold, "seed": ctx.cfg.seed,
                                 "sampling": "bottom-k by hash(seed, row, entry)", "time": now().isoformat()})
        # columns, not a dict per row: 500k entries x k candidates is millions of rows at MetaCLIP scale
        count_cols = pa.table({
            "entry_id": pa.array(np.arange(len(entries), dtype=np.int64)),
            "entry": pa.array([e if isinstance(e, str) else None for e in entries], pa.string()),
            "count": pa.array(counts, pa.int64()),
            "balanced_count": pa.array(balanced if balanced is not None else [None] * len(entries), pa.int64()),
            "provenance": pa.repeat(provenance, len(entries)).cast(pa.string()),
        })
        cand_entries, cand_rows = candidates
        texts = _rows_by_number(pool, cand_rows)
        candidate_cols = pa.table({"entry_id": pa.array(cand_entries, pa.int64()),
                                   "rank": pa.array(ranks_within(cand_entries), pa.int32()), "url": texts["url"],
                                   "page_url": texts["page_url"], "caption": texts["caption"]})
        del texts
        ctx.commit()  # rejects first, so the outputs below are the transaction's last word
        with ctx.ws.transaction():
            # both tables are empty here (the stage returns early or was reset) and keys are unique
            ctx.ws.insert_arrow("entry_counts", count_cols, unique=True)
            ctx.ws.insert_arrow("match_candidates", candidate_cols, unique=True)


def _rows_by_number(pool: Path, wanted: np.ndarray) -> pa.Table:
    """The url, page_url and caption of pool rows `wanted` (any order, repeats allowed), in that
    order: one streaming read that takes the wanted rows of each batch (memory: the candidates)."""
    reader, columns = _open_pool(pool)
    order = np.argsort(wanted, kind="stable")
    rows = wanted[order]
    parts: list[pa.Table] = []
    first = 0
    for batch in reader.iter_batches(batch_size=POOL_BATCH_ROWS, columns=columns):
        lo, hi = np.searchsorted(rows, [first, first + batch.num_rows])
        if hi > lo:
            parts.append(pa.Table.from_batches([batch]).take(pa.array(rows[lo:hi] - first)))
        first += batch.num_rows
    schema = pa.schema([("url", pa.string()), ("page_url", pa.string()), ("caption", pa.string())])
    if not parts:
        return schema.empty_table()
    table = pa.concat_tables(parts)
    page = table["page_url"] if "page_url" in table.column_names else pa.nulls(len(table), pa.string())
    table = pa.table([table["url"].cast(pa.string()), page.cast(pa.string()), table["caption"].cast(pa.string())],
                     schema=schema)
    return table.take(pa.array(np.argsort(order, kind="stable")))  # back to the order of `wanted`


class _LocalScan:
    """Pool rows matched in this process (or its forked workers), summarised per SUMMARY_ROWS rows."""

    def __init__(self, ctx: StageContext, entries: list[Any], pool: Path) -> None:
        self.ctx, self.pool = ctx, pool
        self.matcher, self.to_entry = _entry_matcher(entries)
        self.bad_rows = 0

    def summaries(self, *, k: int, seed: int, threshold: int, reject: bool,
                  balance_counts: np.ndarray | None = None) -> Iterator[Summary]:
        ctx, pool = self.ctx, self.pool
        rows: deque[int] = deque()

        def captions() -> Iterator[str]:
            for row_no, url, caption, page in _pool_rows(pool):
                problem = _row_problem(url, caption, page)
                if problem:
                    if reject:
                        self.bad_rows += 1
                        _reject_row(ctx, pool, row_no, *problem, url, caption)
                    continue
                rows.append(row_no)
                yield caption

        matches = self.matcher.iter_matches(captions(), processes=ctx.cfg.processes, min_pool_texts=MIN_TEXTS_FOR_POOL)
        while chunk := list(islice(matches, SUMMARY_ROWS)):
            numbers = [rows.popleft() for _ in chunk]
            yield summarize(numbers, chunk, k=k, seed=seed, balance_counts=balance_counts, threshold=threshold,
                            to_entry=self.to_entry)

    def note(self) -> None:
        """Nothing to add: the local path is the default."""


class _RayScan:
    """Row ranges of the pool summarised by Ray workers (`MatchShardWorker`), read back in order."""

    def __init__(self, ctx: StageContext, metadata: Path, pool: Path) -> None:
        self.ctx, self.metadata, self.pool = ctx, metadata, pool
        self.shards = pool_shards(pool, ctx.cfg.shard_rows)
        self.bad_rows = 0

    def summaries(self, *, k: int, seed: int, threshold: int, reject: bool,
                  balance_counts: np.ndarray | None = None) -> Iterator[Summary]:
        ctx, pool = self.ctx, self.pool
        init = dict(metadata=str(self.metadata), pool=str(pool), k=k, seed=seed, threshold=threshold,
                    balance_counts=balance_counts)
        results = map_shards(ctx.config, MatchShardWorker, init, self.shards, name="match")
        what = "matching" if balance_counts is None else "balancing"
        for result in ctx.progress(results, total=len(self.shards), description=f"match: {what} pool shards on Ray"):
            if reject:
                self.bad_rows += len(result.bad)
                for bad in result.bad:
                    _reject_row(ctx, pool, *bad)
            yield result.summary

    def note(self) -> None:
        self.ctx.stats.extra["ray_shards"] = len(self.shards)
        self.ctx.stats.notes.append(f"matched on Ray: {len(self.shards)} shards of {self.ctx.cfg.shard_rows} pool rows")


def _row_problem(url: Any, caption: Any, page: Any) -> tuple[str, str] | None:
    """Why a pool row cannot be used, as (reason code, what), or None if it can."""
    if not isinstance(url, str) or not url.strip():
        return "field_missing", "no url"
    if not isinstance(caption, str):
        return "field_missing", "no caption string"
    if page is not None and not isinstance(page, str):
        return "wrong_type", "page_url is not a string"
    return None
