"""Order-free counting, balancing and candidate sampling for `match`, so any split of the pool into
shards (one process, worker processes, Ray workers on several machines) gives the same tables.

A sequential reservoir and one running RNG make the result depend on the order rows are seen in,
so the per-row work would have to stay in one process (it was the bottleneck: ~3.7M reservoir offers
for 200k captions at 500k entries). Instead every random choice is a hash of the pool row number
(and entry), fixed before anything runs:

* a pair (entry, row) gets the priority `hash(seed, row, entry)`; an entry's candidates are its k
  pairs of lowest priority — a uniform sample without replacement (bottom-k sampling), which
  merges: the bottom k of a union is the bottom k of the shards' bottom k's;
* MetaCLIP balancing keeps a row when `u(seed, row) < keep_probability(row's entries)`, with `u`
  uniform in [0, 1) from the same kind of hash.

Counts are sums of per-shard counts. All of it is vectorised with numpy per shard, so the driver
only adds up small summaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ROW_SALT = np.uint64(0xD1B54A32D192ED03)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a fast, well-spread hash."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _seeded(seed: int, rows: np.ndarray) -> np.ndarray:
    return _mix(rows.astype(np.uint64) * _GOLDEN + np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


def pair_priority(seed: int, entries: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The sampling priority of each (entry, pool row) pair: lowest k per entry are its candidates."""
    return _mix(_seeded(seed, rows) ^ (entries.astype(np.uint64) * _GOLDEN))


def row_uniform(seed: int, rows: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per pool row (the balancing draw)."""
    return (_mix(_seeded(seed, rows) ^ _ROW_SALT) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def ranks_within(keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of the sorted `keys` (an entry's candidates' ranks)."""
    if not len(keys):
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return np.arange(len(keys)) - np.repeat(starts, np.diff(np.r_[starts, len(keys)]))


def bottom_k(entries: np.ndarray, prios: np.ndarray, rows: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per entry its k pairs of lowest priority, sorted by (entry, priority, row)."""
    if k <= 0 or not len(entries):
        empty = np.zeros(0, np.int64)
        return empty, np.zeros(0, np.uint64), empty
    order = np.lexsort((rows, prios, entries))
    entries, prios, rows = entries[order], prios[order], rows[order]
    keep = ranks_within(entries) < k
    return entries[keep], prios[keep], rows[keep]


@dataclass
class Summary:
    """What one shard contributes: counts of the entries it matched, and its bottom-k candidates."""

    n_rows: int = 0  # usable rows seen
    n_matched: int = 0  # rows matching at least one entry
    n_kept: int = 0  # rows balancing kept (pass 2), else n_matched
    entries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # ids with counts below
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cand_entries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cand_prios: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    cand_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def keep_probabilities(counts: np.ndarray, flat: np.ndarray, offsets: np.ndarray, threshold: int) -> np.ndarray:
    """`keep_probability` per row, vectorised: rows are segments of `flat` (entry ids) at `offsets`
    (each non-empty)."""
    c = counts[flat].astype(np.float64)
    drop = np.where(c > 0, 1.0 - np.minimum(1.0, threshold / np.maximum(c, 1.0)), 1.0)
    return 1.0 - np.multiply.reduceat(drop, offsets)


def summarize(rows: Sequence[int], ids: Sequence[Sequence[int]], *, k: int, seed: int,
              balance_counts: np.ndarray | None = None, threshold: int = 0,
              to_entry: np.ndarray | None = None) -> Summary:
    """The summary of usable pool rows `rows` with their matched ids `ids` (indices into `to_entry`,
    the automaton's entry -> metadata index, when given; else metadata indices).

    Without `balance_counts`: raw counts and candidates over all matched rows (pass 1). With the
    final raw counts: MetaCLIP balancing first, then counts and candidates over the kept rows."""
    lens = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(chain.from_iterable(ids), np.int64, int(lens.sum()))
    if to_entry is not None:
        flat = to_entry[flat]
    row_arr = np.asarray(rows, dtype=np.int64)
    matched = lens > 0
    out = Summary(n_rows=len(row_arr), n_matched=int(matched.sum()))
    if balance_counts is not None and len(flat):
        m_lens, m_rows = lens[matched], row_arr[matched]
        offsets = np.r_[0, np.cumsum(m_lens)[:-1]]
        keep = row_uniform(seed, m_rows) < keep_probabilities(balance_counts, flat, offsets, threshold)
        flat = flat[np.repeat(keep, m_lens)]
        lens = np.zeros_like(lens)
        lens[np.flatnonzero(matched)[keep]] = m_lens[keep]
        out.n_kept = int(keep.sum())
    else:
        out.n_kept = out.n_matched
    out.entries, out.counts = np.unique(flat, return_counts=True)
    out.counts = out.counts.astype(np.int64)
    if k > 0 and len(flat):
        pair_rows = np.repeat(row_arr, lens)
        out.cand_entries, out.cand_prios, out.cand_rows = bottom_k(
            flat, pair_priority(seed, flat, pair_rows), pair_rows, k)
    return out


class Totals:
    """Adds up summaries: dense counts per entry, and a running bottom-k of candidates that is
    compacted whenever what was added since doubles it (amortised linear)."""

    def __init__(self, n_entries: int, k: int) -> None:
        self.k = k
        self.counts = np.zeros(n_entries, np.int64)
        self.n_rows = self.n_matched = self.n_kept = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._kept = 0
        self._pending = 0

    def add(self, s: Summary) -> None:
        self.n_rows += s.n_rows
        self.n_matched += s.n_matched
        self.n_kept += s.n_kept
        np.add.at(self.counts, s.entries, s.counts)
        if len(s.cand_entries):
            self._parts.append((s.cand_entries, s.cand_prios, s.cand_rows))
            self._pending += len(s.cand_entries)
            if self._pending > max(self._kept, 1 << 16):
                self._compact()

    def _compact(self) -> None:
        if len(self._parts) > 1 or self._pending:
            e, p, r = (np.concatenate(x) for x in zip(*self._parts, strict=True))
            self._parts = [bottom_k(e, p, r, self.k)]
        self._kept = len(self._parts[0][0]) if self._parts else 0
        self._pending = 0

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        """(entry id, pool row) of every candidate, by entry then priority (= rank order)."""
        if not self._parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._compact()
        e, _, r = self._parts[0]
        return e, r
