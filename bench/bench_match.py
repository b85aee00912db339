"""Matching throughput (captions/s) over a MetaCLIP-sized vocabulary.

ours    fvqa.pipelines.match (daachorse's double-array Aho-Corasick over UTF-8, each chunk of captions
        normalised as one string, worker processes sharing one automaton)
anchors MetaCLIP's own Aho-Corasick version run as published: one process, a Python loop over
        `automaton.iter(spacing(text))` per caption; and MetaCLIP's naive reference (one `in` test
        per entry per caption), timed on a sample and extrapolated because it takes seconds per
        caption at 500k entries.
Matches are checked to be identical (all captions vs the Aho-Corasick anchor, the sample vs naive).

Usage: python bench/bench_match.py [--quick] [--processes N]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import time
from pathlib import Path

import ahocorasick

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fvqa.pipelines.match import EntryMatcher, spacing  # noqa: E402


def synth(n_entries: int, n_texts: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Zipf-distributed words; entries = unigrams + frequent 2-3 word phrases; captions with punctuation."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = sorted({"".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(80_000)})
    rng.shuffle(vocab)
    cum = list(itertools.accumulate(1 / (i + 1) for i in range(len(vocab))))
    entries = set(vocab[: min(60_000, n_entries // 2)])
    while len(entries) < n_entries:
        entries.add(" ".join(rng.choices(vocab, cum_weights=cum, k=rng.choice((2, 2, 2, 3)))))
    entry_list = sorted(entries)
    rng.shuffle(entry_list)
    texts = []
    for _ in range(n_texts):
        words = rng.choices(vocab, cum_weights=cum, k=rng.randint(5, 25))
        for _ in range(rng.randint(0, 3)):
            i = rng.randrange(len(words))
            words[i] += rng.choice(",.;:!?")
        texts.append(" ".join(words) + rng.choice(("", ".", "\n")))
    return entry_list, texts


def metaclip_ac_build(entries: list[str]) -> ahocorasick.Automaton:
    """The anchor's automaton, keyed and valued as MetaCLIP's Aho-Corasick script does."""
    automaton = ahocorasick.Automaton()
    for idx, key in enumerate(f" {e} " for e in entries):
        automaton.add_word(key, (idx, key))
    automaton.make_automaton()
    return automaton


def metaclip_ac_match(automaton: ahocorasick.Automaton, text: str) -> list[int]:
    """One caption, as MetaCLIP's Aho-Corasick script matches it (returns an unordered list)."""
    text = spacing(text)
    matched = set()
    for _end, (entry_id, _key) in automaton.iter(text):
        matched.add(entry_id)
    return list(matched)


def naive_match(spaced_entries: list[str], text: str) -> list[int]:
    """MetaCLIP's reference definition: one substring test per entry."""
    text = spacing(text)
    return [i for i, e in enumerate(spaced_entries) if e in text]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer entries and captions")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    n_entries, n_texts, n_naive = (200_000, 20_000, 10) if args.quick else (500_000, 100_000, 20)

    t0 = time.perf_counter()
    entries, texts = synth(n_entries, n_texts)
    print(f"# {n_entries} entries, {n_texts} captions generated in {time.perf_counter() - t0:.1f}s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")

    t0 = time.perf_counter()
    matcher = EntryMatcher(entries)
    build_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    anchor_automaton = metaclip_ac_build(entries)
    build_anchor = time.perf_counter() - t0

    t0, c0 = time.perf_counter(), os.times()
    ours = list(matcher.iter_matches(texts, processes=args.processes))
    ours_tps = n_texts / (time.perf_counter() - t0)
    c1 = os.times()
    ours_parent_cpu = (c1.user + c1.system) - (c0.user + c0.system)
    ours_cpu = ours_parent_cpu + (c1.children_user + c1.children_system) - (c0.children_user + c0.children_system)

    t0, c0 = time.perf_counter(), os.times()
    anchor = [metaclip_ac_match(anchor_automaton, t) for t in texts]
    anchor_tps = n_texts / (time.perf_counter() - t0)
    anchor_cpu = (os.times().user + os.times().system) - (c0.user + c0.system)

    t0, c0 = time.perf_counter(), time.process_time()
    ours_single = list(matcher.iter_matches(texts[: n_texts // 5], processes=1))
    single_tps = (n_texts // 5) / (time.perf_counter() - t0)
    single_per_cpu = (n_texts // 5) / max(time.process_time() - c0, 1e-9)

    spaced_entries = [f" {e} " for e in entries]
    sample = random.Random(1).sample(range(n_texts), n_naive)
    t0 = time.perf_counter()
    naive = {i: naive_match(spaced_entries, texts[i]) for i in sample}
    naive_tps = n_naive / (time.perf_counter() - t0)

    identical = [sorted(a) for a in anchor] == ours and ours_single == ours[: n_texts // 5]
    identical_naive = all(naive[i] == ours[i] for i in sample)
    n_matches = sum(map(len, ours))
    print(f"# matches per caption {n_matches / n_texts:.1f}; automaton build ours {build_ours:.1f}s, "
          f"anchor {build_anchor:.1f}s; ours with 1 process {single_tps:.0f} captions/s")
    print(f"# identical to Aho-Corasick anchor on all {n_texts}: {identical}; "
          f"to naive on {n_naive} sampled: {identical_naive}")
    print(f"# CPU seconds: ours {ours_cpu:.2f} (all processes; parent {ours_parent_cpu:.2f}), anchor {anchor_cpu:.2f}; "
          f"load average now {os.getloadavg()[0]:.2f} (wall-clock ratios need an otherwise idle machine)")
    ours_per_cpu, anchor_per_cpu = n_texts / max(ours_cpu, 1e-9), n_texts / max(anchor_cpu, 1e-9)
    print(f"match_texts_per_cpu_s_vs_metaclip_ahocorasick: ours={ours_per_cpu:.0f} anchor={anchor_per_cpu:.0f} "
          f"ratio={ours_per_cpu / anchor_per_cpu:.2f}")
    print(f"match_texts_per_cpu_s_1proc_vs_metaclip_ahocorasick: ours={single_per_cpu:.0f} "
          f"anchor={anchor_per_cpu:.0f} ratio={single_per_cpu / anchor_per_cpu:.2f}")
    usable = min(args.processes, len(os.sched_getaffinity(0)))
    print(f"# projection for an idle machine (not a measurement): {usable} x CPU ratio = "
          f"{usable * ours_per_cpu / anchor_per_cpu:.2f}x the single-process anchor")
    print(f"match_texts_per_s_vs_metaclip_ahocorasick_1proc: ours={ours_tps:.0f} anchor={anchor_tps:.0f} "
          f"ratio={ours_tps / anchor_tps:.2f}")
    print(f"match_texts_per_s_vs_metaclip_naive: ours={ours_tps:.0f} anchor={naive_tps:.2f} "
          f"ratio={ours_tps / naive_tps:.0f}")
    return 0 if identical and identical_naive else 1


if __name__ == "__main__":
    raise SystemExit(main())
