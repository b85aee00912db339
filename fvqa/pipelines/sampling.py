"""A seeded, category-balanced sampler that the build stages share (InfoSeek, split, annotation).

Rows are grouped into strata (e.g. question type x knowledge type) and taken round-robin, one per
stratum per pass, so small strata are used up completely before large ones dominate; an optional
cap limits rows per entity. The same seed and rows always give the same sample, in the same order.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

Row = TypeVar("Row", bound=dict[str, Any])


def _key_fn(strata: Sequence[str] | Callable[[Any], Hashable]) -> Callable[[Any], Hashable]:
    if callable(strata):
        return strata
    fields = tuple(strata)
    return lambda row: tuple(row.get(f) for f in fields)


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
    queues = [groups[k][::-1] for k in sorted(groups, key=repr)]  # pop() from the end = shuffled order
    used: Counter[Any] = Counter()
    chosen: list[Row] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            while queue:
                row = queue.pop()
                owner = row.get(cap_field) if cap_field else None
                if cap is not None and cap_field and owner is not None and used[owner] >= cap:
                    continue
                used[owner] += 1
                chosen.append(row)
                break
            if len(chosen) >= n:
                break
    return chosen


def stratum_counts(rows: Sequence[dict[str, Any]], strata: Sequence[str]) -> dict[str, int]:
    """Rows per stratum as 'a/b' -> n (for summaries and tests)."""
    key = _key_fn(strata)
    counts: Counter[str] = Counter("/".join(str(v) for v in key(r)) for r in rows)  # type: ignore[union-attr]
    return dict(sorted(counts.items()))
