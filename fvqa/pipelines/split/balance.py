"""Quota allocation for balanced splits: pure functions, no workspace.

A class quota (say 1,600 search-free training items) is spread over strata cells (knowledge type x
source) max-min fairly ("water filling"): every cell gets an even share, a cell with too little
supply gives what it has and its deficit moves to cells that still have spare items. So the quota is
met exactly whenever the total supply allows, the mix stays as even as the data permits, and the
cells that ran short are known by name.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)


def water_fill(quota: int, supply: Mapping[K, int]) -> dict[K, int]:
    """Max-min fair integer allocation of `quota` over cells, never above a cell's supply.

    Deterministic: ties in the remainder go to cells in sorted order of their string form.
    """
    if quota < 0:
        raise ValueError(f"quota must be >= 0, got {quota}")
    alloc: dict[K, int] = dict.fromkeys(supply, 0)
    remaining = min(quota, sum(max(0, s) for s in supply.values()))
    cells = sorted(supply, key=lambda c: (supply[c], str(c)))
    for i, cell in enumerate(cells):
        left = len(cells) - i
        level = remaining // left
        if supply[cell] <= level:  # a small cell takes all it has; its deficit stays in `remaining`
            alloc[cell] = max(0, supply[cell])
            remaining -= alloc[cell]
            continue
        # every cell from here on has more than `level`: even shares, remainder to the largest cells
        extra = remaining - level * left
        for j, rest in enumerate(cells[i:]):
            alloc[rest] = level + (1 if j >= left - extra else 0)
        break
    return alloc


@dataclass
class CellReport:
    """Target (even share) vs achieved for one cell; `short` when its supply was below its share."""

    cell: tuple[str, ...]
    target: float
    supply: int
    achieved: int

    @property
    def short(self) -> bool:
        return self.supply < self.target


def cell_reports(quota: int, supply: Mapping[tuple[str, ...], int], alloc: Mapping[tuple[str, ...], int]
                 ) -> list[CellReport]:
    """Per-cell even-share target, supply and achieved count (sorted by cell)."""
    even = quota / len(supply) if supply else 0.0
    return [CellReport(c, even, supply[c], alloc.get(c, 0)) for c in sorted(supply)]


def round_robin(items: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any], seed: int,
                prefer: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Seeded order that alternates between sub-groups (e.g. fine search labels) so a partial take
    stays mixed; `prefer` sorts within a sub-group (e.g. small leakage groups first)."""
    rng = random.Random(seed)
    pool = sorted(items, key=lambda r: r["item_id"])
    rng.shuffle(pool)
    if prefer is not None:
        pool.sort(key=prefer)  # stable: the shuffle breaks ties
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in pool:
        groups[key(row)].append(row)
    queues = [groups[k] for k in sorted(groups, key=str)]
    out: list[dict[str, Any]] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out
