"""Inter-annotator agreement on nominal fields: Cohen's kappa (two annotators), Krippendorff's alpha.

Written out here (a few lines each) rather than pulled in as a dependency; the tests check both
against hand-computed values and Krippendorff's own published example.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import permutations


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa for two annotators who labelled the same units (nan when chance agreement is 1)."""
    if len(a) != len(b):
        raise ValueError(f"kappa needs paired labels, got {len(a)} and {len(b)}")
    n = len(a)
    if n == 0:
        return math.nan
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    expected = sum(ca[k] * cb[k] for k in ca) / (n * n)
    if expected == 1.0:
        return math.nan  # both annotators used one and the same label: agreement is undefined
    return (observed - expected) / (1.0 - expected)


def krippendorff_alpha_nominal(units: Sequence[Sequence[Hashable]]) -> float:
    """Krippendorff's alpha (nominal) from the labels each unit received; missing values simply absent.

    Units with fewer than two labels are not pairable and do not count. Returns nan when there is no
    variation at all (expected disagreement zero).
    """
    coincidence: Counter[tuple[Hashable, Hashable]] = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for i, j in permutations(range(m), 2):
            coincidence[(values[i], values[j])] += 1.0 / (m - 1)
    totals: Counter[Hashable] = Counter()
    for (c, _k), w in coincidence.items():
        totals[c] += w
    n = sum(totals.values())
    if n <= 1:
        return math.nan
    observed = sum(w for (c, k), w in coincidence.items() if c != k)
    expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if expected == 0:
        return math.nan
    return 1.0 - (n - 1) * observed / expected


def field_agreement(labels: Mapping[str, Mapping[str, Hashable]]) -> tuple[str, float, int]:
    """Agreement on one field: labels[unit][annotator] -> (method, value, units used).

    Exactly two annotators overall: Cohen's kappa over units both labelled. More: Krippendorff's
    alpha over all pairable units.
    """
    annotators = sorted({a for per_unit in labels.values() for a in per_unit})
    if len(annotators) < 2:
        return ("none", math.nan, 0)
    if len(annotators) == 2:
        x, y = annotators
        pairs = [(u[x], u[y]) for u in labels.values() if x in u and y in u]
        return ("cohen_kappa", cohen_kappa([p[0] for p in pairs], [p[1] for p in pairs]), len(pairs))
    units = [list(u.values()) for u in labels.values() if len(u) >= 2]
    return ("krippendorff_alpha", krippendorff_alpha_nominal(units), len(units))
