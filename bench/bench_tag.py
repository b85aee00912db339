"""Offline knowledge-type tagger: accuracy and speed on the demo world, where every entity's true type is known.

Anchor for accuracy: always answering the most frequent type (what a tagger without signal scores).
Anchor for speed: the bare sentence-transformers encode of the same texts (our overhead on top of it),
once on all texts in one call and once in calls of 8 texts (where a per-call cost would show).

Speed is timed after one untimed pass over all texts (the first pass at each padded shape is slower
and would be charged to whichever side ran first). Each of 3 rounds then runs every call on both
sides back to back, alternating which goes first, so a load spike from other processes hits both;
each side's median round is reported. Quick and full differ only in the world's size, so both
measure the same thing (a single timed call of a small run was mostly noise and warm-up).

    python bench/bench_tag.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller world (fewer items)")
    args = parser.parse_args()

    from fvqa.demo.world import make_world
    from fvqa.tagging.minilm import MiniLMTagger, item_text
    from fvqa.tagging.taxonomy import build_taxonomy
    from fvqa.textgen.qa import template_question

    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(Path(tmp) / "world", seed=1, n_entities=80 if args.quick else 240)
        entities = [json.loads(line) for line in (world / "entities.jsonl").read_text().splitlines()]
        by_id = {e["entity_id"]: e for e in entities}
        items, truth = [], []
        for line in (world / "infoseek" / "infoseek_train_withkb.jsonl").read_text().splitlines():
            row = json.loads(line)
            items.append({"question": row["question"], "answer": row["answer"][0], "entity_text": row["entity_text"]})
            truth.append(by_id[row["entity_id"]]["knowledge_type"])
        for e in entities:  # generated (template) items about each concept
            items.append({"question": template_question(e["entity_id"], e["knowledge_type"]),
                          "answer": e["name"], "concept": e["name"]})
            truth.append(e["knowledge_type"])

    texts = [item_text(i) for i in items]
    tagger = MiniLMTagger(build_taxonomy(None, None))
    reps = 3

    def ours(batch: list[str]) -> list[Any]:
        return tagger.tag(batch)

    def anchor(batch: list[str]) -> Any:
        return tagger.model.encode(batch, batch_size=tagger.batch_size, normalize_embeddings=True,
                                   show_progress_bar=False)

    anchor(texts)  # warm-up at every shape both sides will use (same model, so it counts for both)
    tags = ours(texts)
    acc = sum(t.knowledge_type == y for t, y in zip(tags, truth, strict=True)) / len(truth)
    majority = Counter(truth).most_common(1)[0][1] / len(truth)
    print(f"n_items: {len(texts)}")
    print(f"tag_accuracy: ours={acc:.3f} anchor={majority:.3f} ratio={acc / majority:.2f}")

    print(f"# medians of {reps} rounds; each round interleaves ours and anchor call by call")
    ours_s, anchor_s = timed(ours, anchor, chunks(texts, tagger.batch_size), reps)
    ours_rate, anchor_rate = len(texts) / ours_s, len(texts) / anchor_s
    print(f"tag_items_per_s: ours={ours_rate:.0f} anchor={anchor_rate:.0f} ratio={ours_rate / anchor_rate:.2f}")
    small = chunks(texts[:128], 8)
    ours_s, anchor_s = timed(ours, anchor, small, reps)
    ours_rate, anchor_rate = len(small) / ours_s, len(small) / anchor_s
    print(f"tag_8_item_calls_per_s: ours={ours_rate:.1f} anchor={anchor_rate:.1f} "
          f"ratio={ours_rate / anchor_rate:.2f}")


def chunks(texts: list[str], size: int) -> list[list[str]]:
    """Consecutive calls of `size` texts."""
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def timed(ours: Callable[[list[str]], Any], anchor: Callable[[list[str]], Any], batches: list[list[str]],
          reps: int) -> tuple[float, float]:
    """Median seconds of each side over all batches. Each batch runs on both sides back to back,
    alternating which goes first: the machine's load drifts, and this way both sides see the same."""
    times: dict[str, list[float]] = {"ours": [], "anchor": []}
    for rep in range(reps):
        total = {"ours": 0.0, "anchor": 0.0}
        for i, batch in enumerate(batches):
            order = [("ours", ours), ("anchor", anchor)]
            for name, fn in order if (rep + i) % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                fn(batch)
                total[name] += time.perf_counter() - t0
        for name, t in total.items():
            times[name].append(t)
    print("#   per-round ratios: " + " ".join(f"{a / o:.2f}" for o, a in zip(times["ours"], times["anchor"],
                                                                         strict=True)), flush=True)
    return statistics.median(times["ours"]), statistics.median(times["anchor"])


if __name__ == "__main__":
    main()
