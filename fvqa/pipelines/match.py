"""MetaCLIP-exact substring matching of vocabulary entries in captions.

MetaCLIP counts an entry as present in a caption when `" {entry} "` occurs in the caption after its
`spacing()` normalisation (pad with one space on each side, surround , . ; : ? ! and backtick with
spaces, turn tab, newline and carriage return into spaces). We must reproduce that test exactly, or
head/tail tiers and balancing would drift from the published counts.

A naive scan costs one `in` per entry per caption (500k entries: ~seconds per caption), so we build
one Aho-Corasick automaton (pyahocorasick) over the wrapped entries and reuse it. Its `iter()` reports
every match, overlapping ones included (`" a b "` and `" b c "` in `" a b c "`), which is what the
reference's "every entry whose wrapped form occurs" means. Duplicate entries share one key; all
their indices are reported. Large inputs are split into chunks and matched in worker processes that
inherit the automaton through `fork` instead of rebuilding it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from multiprocessing.pool import AsyncResult

import ahocorasick

# MetaCLIP's normalisation: these characters get a space on each side ...
PUNCTS_TO_WRAP: tuple[str, ...] = (",", ".", ";", ":", "?", "!", "`")
# ... and these become a space (applied after the punctuation step).
CHARS_TO_SPACE: tuple[str, ...] = ("\t", "\n", "\r")

#: Below this many texts a worker pool costs more than it saves.
MIN_TEXTS_FOR_POOL = 5_000
DEFAULT_CHUNK_SIZE = 1_000
#: Chunks queued per worker: deep enough that workers never wait for a busy parent to feed them.
IN_FLIGHT_PER_PROCESS = 8


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
        automaton = ahocorasick.Automaton()
        first_index: dict[str, int] = {}
        extra: dict[int, list[int]] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, str):
                raise TypeError(f"entry #{index} is {type(entry).__name__}, expected str: {entry!r:.80}")
            key = " " + entry + " "
            first = first_index.setdefault(key, index)
            if first == index:
                automaton.add_word(key, index)
            else:
                extra.setdefault(first, [first]).append(index)
        automaton.make_automaton()
        self._automaton = automaton
        self._empty = not first_index  # pyahocorasick refuses to search with an empty automaton
        # Duplicate entries: the automaton reports the first index, this expands it to all of them.
        self._duplicates: dict[int, tuple[int, ...]] = {k: tuple(v) for k, v in extra.items()}

    def match(self, text: str, *, position: int = 0) -> list[int]:
        """Sorted indices of the entries MetaCLIP would find in `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text #{position} is {type(text).__name__}, expected str: {text!r:.80}")
        if self._empty:
            return []
        found = {value for _end, value in self._automaton.iter(spacing(text))}
        if self._duplicates and found:
            dups = self._duplicates
            expanded: list[int] = []
            for index in found:
                expanded.extend(dups.get(index, (index,)))
            return sorted(expanded)
        return sorted(found)

    def match_chunk(self, texts: Sequence[str], offset: int = 0) -> list[list[int]]:
        """`match` for each text; `offset` is the first text's position (for error messages)."""
        return [self.match(text, position=offset + i) for i, text in enumerate(texts)]

    def iter_matches(
        self,
        texts: Iterable[str],
        *,
        processes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> Iterator[list[int]]:
        """Lazily yield `match(text)` per text, in input order, using worker processes if worthwhile.

        `processes=None` picks one process for fewer than MIN_TEXTS_FOR_POOL texts and otherwise
        all usable CPUs. At most IN_FLIGHT_PER_PROCESS chunks per worker are in flight, so memory stays bounded for
        inputs larger than RAM.
        """
        if processes is not None and processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        iterator = iter(texts)
        head = list(islice(iterator, MIN_TEXTS_FOR_POOL))
        if processes is None:
            processes = 1 if len(head) < MIN_TEXTS_FOR_POOL else default_processes()
        if processes == 1:
            for i, text in enumerate(head):
                yield self.match(text, position=i)
            for i, text in enumerate(iterator, start=len(head)):
                yield self.match(text, position=i)
            return
        yield from self._iter_pool(_chain(head, iterator), processes, chunk_size)

    def _iter_pool(self, texts: Iterator[str], processes: int, chunk_size: int) -> Iterator[list[int]]:
        # fork lets workers share the parent's automaton copy-on-write; elsewhere it is pickled once
        # per worker (pyahocorasick supports pickling), which is slower to start but correct.
        methods = mp.get_all_start_methods()
        context = mp.get_context("fork" if "fork" in methods else None)
        pending: deque[AsyncResult[list[list[int]]]] = deque()
        with context.Pool(processes, initializer=_init_worker, initargs=(self,)) as pool:
            offset = 0
            for chunk in _chunks(texts, chunk_size):
                pending.append(pool.apply_async(_match_chunk, (chunk, offset)))
                offset += len(chunk)
                while len(pending) >= IN_FLIGHT_PER_PROCESS * processes:
                    yield from pending.popleft().get()
            while pending:
                yield from pending.popleft().get()


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
from fvqa.errors import ConfigError  # noqa: E402
from fvqa.pipelines.base import Stage, StageContext  # noqa: E402


class MatchStage(Stage):
    """Caption pool -> per-entry counts and candidate URLs (being written; not usable yet)."""

    name = "match"
    outputs = ("entry_counts",)
    description = "MetaCLIP substring matching over a caption pool"

    def run(self, ctx: StageContext) -> None:
        raise ConfigError("the match stage is not implemented yet; set match.enabled: false")
