"""Offline knowledge-type tagger: accuracy and speed on the demo world, where every entity's true type is known.

Anchor for accuracy: always answering the most frequent type (what a tagger without signal scores).
Anchor for speed: the bare sentence-transformers encode of the same texts (our overhead on top of it).

    python bench/bench_tag.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

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
    tagger.tag(texts[:8])  # warm up
    t0 = time.perf_counter()
    tags = tagger.tag(texts)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tagger.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    anchor_s = time.perf_counter() - t0

    acc = sum(t.knowledge_type == y for t, y in zip(tags, truth, strict=True)) / len(truth)
    majority = Counter(truth).most_common(1)[0][1] / len(truth)
    print(f"n_items: {len(texts)}")
    print(f"tag_accuracy: ours={acc:.3f} anchor={majority:.3f} ratio={acc / majority:.2f}")
    ours_rate, anchor_rate = len(texts) / ours_s, len(texts) / anchor_s
    print(f"tag_items_per_s: ours={ours_rate:.0f} anchor={anchor_rate:.0f} ratio={ours_rate / anchor_rate:.2f}")


if __name__ == "__main__":
    main()
