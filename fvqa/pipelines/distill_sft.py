"""The `sft` export: the distill stage's kept trajectories as veRL multi-turn SFT parquet.

The row shape and file names are the contract in `fvqa.formats.sft`. Each kept trajectory's stored
transcript is what the policy is shown in GRPO: the opening user turn (opening prompt + question,
the user image at its place), the teacher's assistant turns verbatim, and each tool-result user turn
as the episode core rendered it (upstream's ``Searched results: <information>...`` text, one
thumbnail per placeholder). Image parts become ``<image>`` placeholders and the images go, in
order, into the `images` column: the user image bounded as `fvqa train prepare` bounds it (so SFT
and GRPO see the same pixels), the thumbnails as the search showed them (`distill_images`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fvqa.errors import FvqaError
from fvqa.formats.sft import (
    MANIFEST_FILE,
    SFT_DIR,
    SFT_SCHEMA,
    TRAIN_FILE,
    VAL_FILE,
    flatten_messages,
    sft_row,
)
from fvqa.formats.verl import data_source
from fvqa.store import Workspace
from fvqa.train.prepare import DEFAULT_IMAGE_MAX_PIXELS, bounded_image_bytes


class SFTExportError(FvqaError):
    """The SFT export cannot be written completely (nothing is written)."""


def _is_val(item_id: str, fraction: float, seed: int) -> bool:
    """Seeded, per item: all of an item's trajectories land in the same file."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def _kept(ws: Workspace) -> list[dict[str, Any]]:
    if not ws.count("distill_kept"):
        return []
    cols = ("item_id", "attempt", "teacher", "search_pattern", "search_label", "trajectory", "split")
    cur = ws.con.execute(
        "SELECT k.item_id, k.attempt, k.teacher, k.search_pattern, k.search_label, a.trajectory, d.split "
        "FROM distill_kept k JOIN distill_attempts a USING (item_id, attempt) "
        "LEFT JOIN dataset d USING (item_id) ORDER BY k.item_id, k.attempt")
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def sft_records(ws: Workspace, *, val_fraction: float = 0.0, seed: int = 0,
                image_max_pixels: int = DEFAULT_IMAGE_MAX_PIXELS) -> tuple[dict[str, list[dict[str, Any]]], Counter[str]]:
    """("train" / "val" -> rows, skipped trajectories by reason). SFTExportError when there is nothing
    to export or an image a kept trajectory showed is missing."""
    kept = _kept(ws)
    if not kept:
        raise SFTExportError("export format sft needs distilled trajectories: enable the distill stage "
                             "(distill.enabled: true) and run `fvqa build`; nothing was written")
    thumbs = dict(ws.execute("SELECT sha256, data FROM distill_images")) if ws.count("distill_images") else {}
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    skipped: Counter[str] = Counter()
    for k in kept:
        traj = json.loads(k["trajectory"])
        try:
            messages, shas = flatten_messages(traj["messages"])
        except ValueError:
            skipped["reserved token in text"] += 1
            continue
        images = []
        for n, sha in enumerate(shas):
            if n == 0:
                try:
                    data = ws.find_image(sha).read_bytes()
                except (KeyError, OSError) as exc:
                    raise SFTExportError(f"{k['item_id']}: user image {sha} missing from the store ({exc}); "
                                         "nothing was written") from exc
                data, _, _ = bounded_image_bytes(data, image_max_pixels)
            else:
                data = thumbs.get(sha)
                if data is None:
                    raise SFTExportError(f"{k['item_id']}: search thumbnail {sha} missing from distill_images; "
                                         "run `fvqa build --force distill`; nothing was written")
            images.append({"bytes": bytes(data), "path": f"{sha}.png" if n else f"{sha}.img"})
        part = "val" if _is_val(k["item_id"], val_fraction, seed) else "train"
        out[part].append(sft_row(
            messages, images, item_id=k["item_id"], attempt=int(k["attempt"]), search_pattern=k["search_pattern"],
            search_label=k["search_label"], teacher=k["teacher"], data_source=data_source(k["split"] or "train"),
            split=part))
    return out, skipped


def export_sft(ws: Workspace, root: Path, *, val_fraction: float = 0.0, seed: int = 0) -> list[Path]:
    """Write `root`/sft/train.parquet (+ val.parquet) and manifest.json; the paths written."""
    records, skipped = sft_records(ws, val_fraction=val_fraction, seed=seed)
    folder = root / SFT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, name in (("train", TRAIN_FILE), ("val", VAL_FILE)):
        if part == "val" and val_fraction <= 0:
            continue
        path = folder / name
        pq.write_table(pa.Table.from_pylist(records[part], schema=SFT_SCHEMA), path)
        paths.append(path)
    rows = [r for part in records.values() for r in part]
    manifest = {
        "format": "verl-multiturn-sft", "contract": "fvqa.formats.sft",
        "files": {p.stem: p.name for p in paths}, "rows": {k: len(v) for k, v in records.items()},
        "messages_key": "messages", "image_key": "images",
        "teachers": sorted({r["teacher"] for r in rows}),
        "search_patterns": dict(Counter(r["search_pattern"] for r in rows)),
        "search_labels": dict(Counter(r["search_label"] for r in rows)),
        "skipped": dict(skipped), "val_fraction": val_fraction,
    }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return [*paths, folder / MANIFEST_FILE]
