"""Benchmark: near-duplicate image pairs for the split's leakage guard.

ours   = fvqa.pipelines.split.leakage.near_duplicate_pairs (numpy XOR + popcount, one row at a time)
anchor = the same all-pairs scan in plain Python (int XOR + int.bit_count), the obvious alternative

Prints `near_dup_pairs_seconds: ours=<s> anchor=<s> ratio=<anchor/ours>` and checks both agree.
Usage: python bench/bench_split.py [--quick]
"""

from __future__ import annotations

import argparse
import random
import time

from fvqa.pipelines.split.leakage import near_duplicate_pairs


def python_pairs(hashes: list[str], max_distance: int) -> list[tuple[int, int, int]]:
    values = [int(h, 16) for h in hashes]
    out = []
    for i in range(len(values)):
        vi = values[i]
        for j in range(i + 1, len(values)):
            d = (vi ^ values[j]).bit_count()
            if d <= max_distance:
                out.append((i, j, d))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2,000 hashes instead of 8,000")
    args = parser.parse_args()
    n = 2_000 if args.quick else 8_000
    rng = random.Random(0)
    hashes = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
    for i in range(0, n, 50):  # plant near duplicates: flip 2 bits
        hashes[(i + 7) % n] = f"{int(hashes[i], 16) ^ 0b101:016x}"
    t0 = time.perf_counter()
    ours = near_duplicate_pairs(hashes, 4)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    anchor = python_pairs(hashes, 4)
    t_anchor = time.perf_counter() - t0
    assert sorted(ours) == sorted(anchor), "implementations disagree"
    print(f"near_dup_pairs_seconds: ours={t_ours:.3f} anchor={t_anchor:.3f} ratio={t_anchor / t_ours:.1f}")
    print(f"# n={n} hashes, {len(ours)} pairs within distance 4")


if __name__ == "__main__":
    main()
