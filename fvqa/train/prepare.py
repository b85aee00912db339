"""`fvqa train prepare`: the workspace's train/test splits as veRL parquet files.

Each row is what veRL's ``RLHFDataset`` and our agent loop read: ``prompt`` (one user message whose
content is the opening prompt with its ``<image>`` placeholder, then the question), ``images`` (one
``{bytes, path}`` per placeholder, downscaled so the user image costs a bounded number of vision
tokens), ``data_source`` (``mmsearch_r1/fvqa_<split>`` so upstream tooling recognises it),
``reward_model`` (style, ground truth and candidate answers as upstream's JSON string),
``extra_info`` (``index`` unique per item, the item's lineage, the candidate answers again because
veRL hands a reward function only ``reward_model.ground_truth``, and the question our tool turns
repeat) and ``agent_name`` (our agent loop). Items that cannot become a row are recorded in
``rejects`` with a reason; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fvqa.errors import FvqaError
from fvqa.formats.verl import AGENT_NAME, VERL_SCHEMA, candidate_answers, data_source, verl_row
from fvqa.protocol import IMAGE_PLACEHOLDER, Prompts, load_prompts, opening_user_text
from fvqa.store import Workspace

STAGE = "train_prepare"
DEFAULT_IMAGE_MAX_PIXELS = 1024 * 28 * 28
"""Qwen2.5-VL spends one token per 28x28 patch: this bounds the user image at ~1024 vision tokens."""
SPLIT_FILES = {"train": "train.parquet", "test": "val.parquet"}

@dataclass
class PrepareResult:
    """What `prepare` wrote: parquet per split, row counts, and rejects by reason."""

    files: dict[str, Path] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    manifest: Path | None = None


def bounded_image_bytes(data: bytes, max_pixels: int) -> tuple[bytes, int, int]:
    """Downscale an image (keeping its aspect ratio) so that width * height <= ``max_pixels``.

    Bytes already within the bound are returned unchanged, so a re-run writes identical files.
    Raises ValueError for bytes that are not a decodable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            if width * height <= max_pixels:
                return data, width, height
            scale = math.sqrt(max_pixels / (width * height))
            size = (max(1, int(width * scale)), max(1, int(height * scale)))
            out = img.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a decodable image ({exc.__class__.__name__}: {exc})") from exc
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue(), size[0], size[1]


def prompt_fingerprint(prompts: Prompts) -> str:
    """Hash of the opening prompt baked into the rows; the launcher checks the rollout uses the same set."""
    return hashlib.sha256(prompts.round_1.encode("utf-8")).hexdigest()


class NotARow(ValueError):
    """Why an item cannot become a training row: a reason `code` (`fvqa.reasons`) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def build_row(
    ws: Workspace, row: dict[str, Any], index: int, prompts: Prompts, image_max_pixels: int
) -> dict[str, Any]:
    """One veRL row for one dataset item; `NotARow` says why an item cannot become a row."""
    question = (row.get("question") or "").strip()
    answer = (row.get("answer") or "").strip()
    if not question:
        raise NotARow("empty_question", "empty question")
    if not answer:
        raise NotARow("empty_answer", "empty answer")
    if IMAGE_PLACEHOLDER in question:
        raise NotARow("placeholder_in_question", f"question contains the image placeholder {IMAGE_PLACEHOLDER}")
    sha = row.get("image_sha256")
    if not sha:
        raise NotARow("image_missing", "item has no image")
    try:
        path = ws.find_image(sha)
        data = path.read_bytes()
    except (KeyError, OSError) as exc:
        raise NotARow("image_missing", f"image file missing from the workspace ({exc})") from exc
    try:
        data, _, _ = bounded_image_bytes(data, image_max_pixels)
    except ValueError as exc:
        raise NotARow("image_undecodable", str(exc)) from exc
    split = row["split"]
    return verl_row(
        layout="training", prompt=opening_user_text(prompts.round_1, question),
        images=[{"bytes": data, "path": f"{sha}.{row.get('image_ext') or 'img'}"}],
        ground_truth=answer, candidates=candidate_answers(row.get("aliases")), data_source=data_source(split),
        data_id=row.get("data_id"), item_id=row["item_id"],
        extra_info={
            "index": index,
            "split": split,
            "question": question,
            "knowledge_type": row.get("knowledge_type"),
            "search_label": row.get("search_label"),
            "source": row.get("source"),
            "image_sha256": sha,
        },
    )


def _write_atomic(records: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.part")
    pq.write_table(pa.Table.from_pylist(records, schema=VERL_SCHEMA), tmp)
    os.replace(tmp, path)


def prepare(
    ws: Workspace,
    out_dir: Path | None = None,
    *,
    prompts: Prompts | None = None,
    image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS,
    limit: int | None = None,
) -> PrepareResult:
    """Write ``train.parquet`` (split train) and ``val.parquet`` (split test) plus a manifest.

    ``index`` numbers items over both splits in item-id order, so it is unique per item (the key
    veRL's agent loop uses to group a prompt's n rollouts in traces) and stable across re-runs.
    """
    if image_max_pixels < 28 * 28:
        raise FvqaError(f"image_max_pixels must be at least {28 * 28} (one vision patch), got {image_max_pixels}")
    prompts = prompts or load_prompts()
    out_dir = Path(out_dir) if out_dir is not None else ws.exports_dir / "verl"
    cur = ws.con.execute(
        "SELECT * FROM dataset WHERE split IN ('train', 'test') ORDER BY split <> 'train', item_id"
    )
    cols = [d[0] for d in cur.description]
    items = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    if not items:
        raise FvqaError(
            f"workspace {ws.root} has no items in split train or test; run `fvqa build` (split stage) "
            "or `fvqa import-upstream` first"
        )
    result = PrepareResult()
    by_split: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    rejects: list[tuple[str, str, str, str]] = []
    for index, item in enumerate(items):
        if limit is not None and len(by_split[item["split"]]) >= limit:
            continue
        try:
            by_split[item["split"]].append(build_row(ws, item, index, prompts, image_max_pixels))
        except NotARow as exc:
            result.rejected[exc.code] += 1
            rejects.append((STAGE, item["item_id"], exc.code, str(exc)))
    with ws.transaction():  # a re-run replaces the previous run's rejects instead of repeating them
        ws.execute("DELETE FROM rejects WHERE stage = ?", [STAGE])
        ws.add_rejects(rejects)
    for split, records in by_split.items():
        path = out_dir / SPLIT_FILES[split]
        if not records:
            path.unlink(missing_ok=True)
            continue
        _write_atomic(records, path)
        result.files[split] = path
        result.rows[split] = len(records)
    manifest = {
        "files": {k: str(v) for k, v in result.files.items()},
        "rows": result.rows,
        "rejected": dict(result.rejected),
        "agent_name": AGENT_NAME,
        "image_max_pixels": image_max_pixels,
        "prompt_source": prompts.source.get("round_1", "fvqa-default"),
        "round_1_sha256": prompt_fingerprint(prompts),
    }
    result.manifest = out_dir / "manifest.json"
    result.manifest.parent.mkdir(parents=True, exist_ok=True)
    result.manifest.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return result
