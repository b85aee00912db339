"""A seeded, category-balanced sampler: strata taken round-robin, with a per-entity cap.

Rows are grouped into strata (e.g. question type x knowledge type) and taken round-robin, one per
stratum per pass, so small strata are used up completely before large ones dominate; an optional
cap limits rows per entity. The same seed and rows always give the same sample, in the same order.
`round_robin` is the rule itself over any ordered queues (the InfoSeek stage streams its strata out
of DuckDB, and refuses rows whose image is unusable, so they are replaced from the same stratum);
`balanced_sample` is it over rows in memory, shuffled with a seed.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

Row = TypeVar("Row", bound=dict[str, Any])


def _key_fn(strata: Sequence[str] | Callable[[Any], Hashable]) -> Callable[[Any], Hashable]:
    if callable(strata):
        return strata
    fields = tuple(strata)
    return lambda row: tuple(row.get(f) for f in fields)


def round_robin(
    queues: Sequence[Iterable[Row]],
    n: int,
    *,
    cap_field: str | None = None,
    cap: int | None = None,
    take: Callable[[Row], bool] | None = None,
) -> Iterator[Row]:
    """Yield up to `n` rows, one per queue per pass (queues in the given order, each in its own order).

    A row whose `cap_field` value already has `cap` rows is passed over; so is a row `take` refuses
    (e.g. its image is missing), and the next row of the same queue is tried instead, so a refused
    row is replaced from its own stratum. Stops when `n` rows are out or every queue is used up.
    Lazy: a queue is read only as far as it is needed."""
    if n <= 0:
        return
    live = [iter(q) for q in queues]
    used: Counter[Any] = Counter()
    out = 0
    while live:
        still: list[Iterator[Row]] = []  # the queues not used up in this pass
        for queue in live:
            for row in queue:
                owner = row.get(cap_field) if cap_field else None
                if cap is not None and owner is not None and used[owner] >= cap:
                    continue
                if take is not None and not take(row):
                    continue
                used[owner] += 1
                out += 1
                still.append(queue)
                yield row
                break
            if out >= n:
                return
        live = still


def balanced_sample(
    rows: Sequence[Row],
    n: int,
    *,
    strata: Sequence[str] | Callable[[Row], Hashable] = (),
    seed: int = 0,
    id_field: str = "id",
    cap_field: str | None = None,
    cap: int | None = None,
) -> list[Row]:
    """Up to `n` rows, as even across strata as the data allows, at most `cap` per `cap_field` value.

    Rows are first sorted by `id_field` so the result does not depend on input order."""
    if n <= 0 or not rows:
        return []
    key = _key_fn(strata)
    rng = random.Random(seed)
    ordered = sorted(rows, key=lambda r: str(r.get(id_field)))
    rng.shuffle(ordered)
    groups: dict[Hashable, list[Row]] = defaultdict(list)
    for row in ordered:
        groups[key(row)].append(row)
    queues = [groups[k] for k in sorted(groups, key=repr)]
    return list(round_robin(queues, n, cap_field=cap_field, cap=cap))


def stratum_counts(rows: Sequence[dict[str, Any]], strata: Sequence[str]) -> dict[str, int]:
    """Rows per stratum as 'a/b' -> n (for summaries and tests)."""
    key = _key_fn(strata)
    counts: Counter[str] = Counter("/".join(str(v) for v in key(r)) for r in rows)  # type: ignore[union-attr]
    return dict(sorted(counts.items()))
