"""Leakage guards for splitting: which items must land on the same side of a train/test split.

Items are linked when they share an entity or concept (by Wikidata id or normalised name, across
sources: an InfoSeek entity and a MetaCLIP concept of the same name are one thing), when their
images are near duplicates (perceptual hash within a Hamming distance), or when their normalised
questions collide. Linked items form one group (union-find), and the splitter assigns a group to one
side only, so no link can cross the split. Benchmark contamination is checked here too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fvqa.answers import normalize_answer
from fvqa.errors import ConfigError
from fvqa.formats.jsonl import BadLine, read_jsonl

QuestionKey = Literal["question_answer", "question"]


class UnionFind:
    """Disjoint sets over string keys (path halving, union by size)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.parent: dict[str, str] = {}
        self.size: dict[str, int] = {}
        for k in keys:
            self.add(k)

    def add(self, key: str) -> None:
        if key not in self.parent:
            self.parent[key] = key
            self.size[key] = 1

    def find(self, key: str) -> str:
        parent = self.parent
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def question_key(question: str, answer: str | None, mode: QuestionKey) -> str:
    """The duplicate key of a question.

    `question_answer` (default): the same normalised question *with the same normalised answer* is a
    duplicate; templated questions ("Which country is this tower from?") asked of different images
    with different answers are not, since memorising one teaches nothing about the other.
    `question`: any identical normalised question is a duplicate (strict; may hold out many items).
    """
    q = normalize_answer(question or "")
    if mode == "question":
        return q
    return q + "\x1f" + normalize_answer(answer or "")


def entity_keys(row: dict[str, Any]) -> list[str]:
    """Keys naming what an item is about: entity id and normalised entity/concept names."""
    keys = []
    if row.get("entity_id"):
        keys.append("id:" + str(row["entity_id"]).strip().lower())
    for field in ("entity_text", "concept"):
        name = normalize_answer(str(row.get(field) or ""))
        if name:
            keys.append("name:" + name)
    return keys


def phash_of_file(path: Path) -> str:
    """The stored image's perceptual hash, by the same rule as crawl's dedup (`fvqa.vision.dedup`)."""
    from PIL import Image

    from fvqa.vision.dedup import phash_hex

    with Image.open(path) as im:
        return phash_hex(im)


def near_duplicate_pairs(hashes: Sequence[str], max_distance: int) -> list[tuple[int, int, int]]:
    """(i, j, distance) for every pair of 64-bit hex hashes within `max_distance` bits (i < j).

    Vectorised XOR + popcount: one row of comparisons at a time, so 10k images take about a second.
    """
    if max_distance < 0 or len(hashes) < 2:
        return []
    values = np.array([int(h, 16) for h in hashes], dtype=np.uint64)
    pairs: list[tuple[int, int, int]] = []
    for i in range(len(values) - 1):
        dist = np.bitwise_count(np.bitwise_xor(values[i + 1:], values[i]))
        for j in np.nonzero(dist <= max_distance)[0]:
            pairs.append((i, i + 1 + int(j), int(dist[j])))
    return pairs


# -- benchmark contamination -------------------------------------------------------------------

def _question_of(record: dict[str, Any]) -> str | None:
    """The question text of a benchmark record (plain `question`, or upstream's chat `prompt`)."""
    q = record.get("question")
    if isinstance(q, str):
        return q
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | np.ndarray):
        for msg in prompt:
            if isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str):
                return msg["content"].replace("<image>", "").strip()
    return None


def _answer_of(record: dict[str, Any]) -> str | None:
    for field in ("answer", "ground_truth"):
        if isinstance(record.get(field), str):
            return record[field]
    reward = record.get("reward_model")
    if isinstance(reward, dict) and isinstance(reward.get("ground_truth"), str):
        return reward["ground_truth"]
    if isinstance(record.get("answer"), list) and record["answer"] and isinstance(record["answer"][0], str):
        return record["answer"][0]
    return None


def read_benchmark(path: Path) -> list[dict[str, Any]]:
    """Records of a benchmark file (.jsonl, .json list, .parquet or .csv); a clear error otherwise."""
    if not path.is_file():
        raise ConfigError(f"split.contamination_files: {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for rec in read_jsonl(path):
                if isinstance(rec, BadLine):
                    raise ConfigError(f"split.contamination_files: cannot read {path}: {rec}")
                rows.append(rec[1])
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):
                rows = next((v for v in rows.values() if isinstance(v, list)), [])
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif suffix == ".csv":
            import pandas as pd

            rows = pd.read_csv(path).to_dict("records")
        else:
            raise ConfigError(f"split.contamination_files: {path} has unsupported type (use jsonl/json/parquet/csv)")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise ConfigError(f"split.contamination_files: cannot read {path}: {exc}") from exc
    rows = [r for r in rows if isinstance(r, dict)]
    if rows and not any(_question_of(r) for r in rows):
        raise ConfigError(f"split.contamination_files: {path} has no 'question' (or chat 'prompt') field")
    return rows


def benchmark_index(paths: Sequence[Path], mode: QuestionKey) -> dict[str, str]:
    """Question key -> benchmark file name. Records without an answer match on the question alone."""
    index: dict[str, str] = {}
    for path in paths:
        for rec in read_benchmark(path):
            q = _question_of(rec)
            if not q:
                continue
            answer = _answer_of(rec)
            index.setdefault(question_key(q, answer, mode if answer is not None else "question"), path.name)
    return index


def contamination_match(question: str, answer: str, index: dict[str, str], mode: QuestionKey) -> str | None:
    """The benchmark file that contains this item's question (with its answer in the default mode)."""
    for key in (question_key(question, answer, mode), question_key(question, None, "question")):
        if key in index:
            return index[key]
    return None
