"""Order-free sampling of `match`: any split of the pool into shards gives the same counts and
candidates; candidates are a uniform sample without replacement; balancing keeps MetaCLIP's share."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from fvqa.pipelines.match import keep_probability
from fvqa.pipelines.match_sample import Totals, keep_probabilities, summarize


def _pool(n_rows: int, n_entries: int, seed: int) -> tuple[list[int], list[list[int]]]:
    rng = random.Random(seed)
    rows = sorted(rng.sample(range(n_rows * 2), n_rows))  # row numbers with gaps (rejected rows)
    ids = [sorted(rng.sample(range(n_entries), rng.choice([0, 0, 1, 2, 3]))) for _ in rows]
    return rows, ids


def _merged(rows: list[int], ids: list[list[int]], cuts: list[int], n_entries: int, **kw: object) -> tuple:
    totals = Totals(n_entries, int(kw["k"]))  # type: ignore[call-overload]
    bounds = [0, *cuts, len(rows)]
    order = list(range(len(bounds) - 1))
    random.Random(len(cuts)).shuffle(order)  # shards may arrive in any order
    for i in order:
        lo, hi = bounds[i], bounds[i + 1]
        totals.add(summarize(rows[lo:hi], ids[lo:hi], **kw))  # type: ignore[arg-type]
    entries, cand_rows = totals.candidates()
    return totals.counts.tolist(), entries.tolist(), cand_rows.tolist(), totals.n_matched, totals.n_kept


@pytest.mark.parametrize("balance", [False, True])
def test_any_sharding_gives_the_same_summary(balance: bool) -> None:
    rows, ids = _pool(5_000, 40, seed=1)
    kw: dict = dict(k=3, seed=7)
    if balance:
        raw = Totals(40, 0)
        raw.add(summarize(rows, ids, k=0, seed=7))
        kw.update(balance_counts=raw.counts, threshold=60)
    whole = _merged(rows, ids, [], 40, **kw)
    for cuts in ([1], [2_500], [10, 11, 12, 4_000], sorted(random.Random(3).sample(range(1, 5_000), 40))):
        assert _merged(rows, ids, cuts, 40, **kw) == whole
    counts, entries, _, n_matched, n_kept = whole
    assert Counter(entries) == {e: min(3, c) for e, c in enumerate(counts) if c}
    if balance:
        assert n_kept < n_matched
    else:
        assert counts == [sum(e in x for x in ids) for e in range(40)] and n_kept == n_matched


def test_candidates_are_a_uniform_sample_without_replacement() -> None:
    rows = list(range(20))
    ids = [[0] for _ in rows]  # one entry in 20 rows; k = 5: each row is chosen with probability 1/4
    chosen: Counter[int] = Counter()
    trials = 4_000
    for seed in range(trials):
        s = summarize(rows, ids, k=5, seed=seed)
        assert len(set(s.cand_rows.tolist())) == 5
        chosen.update(s.cand_rows.tolist())
    expected = trials * 5 / 20
    assert all(abs(chosen[r] - expected) < 5 * expected ** 0.5 for r in rows), chosen  # within 5 sigma


def test_vectorised_keep_probability_is_the_metaclip_formula() -> None:
    counts = np.array([1, 4, 40, 400, 0], dtype=np.int64)
    groups = [[0], [1, 2], [2, 3], [3], [0, 3], [4, 3]]
    flat = np.array([e for g in groups for e in g])
    offsets = np.r_[0, np.cumsum([len(g) for g in groups])[:-1]]
    got = keep_probabilities(counts, flat, offsets, threshold=20)
    assert got == pytest.approx([keep_probability([int(counts[e]) for e in g], 20) for g in groups])


def test_balancing_keeps_about_t_rows_of_a_head_entry() -> None:
    rows = list(range(10_000))
    ids = [[0] for _ in rows]
    raw = summarize(rows, ids, k=0, seed=1)
    counts = np.zeros(1, np.int64)
    counts[raw.entries] = raw.counts
    kept = summarize(rows, ids, k=4, seed=1, balance_counts=counts, threshold=500)
    assert abs(kept.n_kept - 500) < 5 * 500 ** 0.5 and int(kept.counts[0]) == kept.n_kept
