"""Exports: native Parquet, upstream's veRL layout (as `lmms-lab/FVQA`), a Hugging Face dataset in the
Hub's layout (`hf`: Parquet shards under `data/` and a card, `fvqa.pipelines.export_hf`), and the
distilled SFT trajectories (`sft`, veRL's multi-turn SFT format).

Every image the export references is checked to be in the store first (a missing one is an
`ExportError` naming it, before anything is written). The formats are then written into a fresh
staging folder next to their destination (`exports/.staging-*`) and each format folder is renamed
into place only once all of them are complete, so a crash or an error never leaves a half-written
export, and a failed export leaves the previous one as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fvqa.errors import FvqaError
from fvqa.formats.verl import candidate_answers, data_source, verl_row
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.export_hf import CardOptions, export_hf
from fvqa.schema import ITEM_ARROW_SCHEMA, SearchLabel
from fvqa.store import Workspace


class ExportError(FvqaError):
    """An export that cannot be written completely (nothing was written)."""


def dataset_rows(ws: Workspace, include_unassigned: bool = True) -> list[dict[str, Any]]:
    """The `dataset` view as dicts, sorted by item id (the order every export uses)."""
    where = "" if include_unassigned else "WHERE split <> 'unassigned'"
    cur = ws.con.execute(f"SELECT * FROM dataset {where} ORDER BY item_id")
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _image_shas(row: dict[str, Any], prov: dict[str, Any] | None = None) -> list[str]:
    """The store images a dataset row references (an imported row may carry several)."""
    if prov is None:
        prov = json.loads(row.get("provenance") or "{}")
    imported = prov.get("import", {}) if isinstance(prov, dict) else {}
    return list(imported.get("image_sha256s") or ([row["image_sha256"]] if row.get("image_sha256") else []))


def missing_images(ws: Workspace, rows: list[dict[str, Any]]) -> list[str]:
    """'<item_id>: <what>' for every referenced image without a catalog row or a file in the store."""
    missing = []
    for row in rows:
        for sha in _image_shas(row):
            try:
                path = ws.find_image(sha)
            except KeyError:
                missing.append(f"{row['item_id']}: image {sha} not in the images table")
                continue
            if not path.is_file():
                missing.append(f"{row['item_id']}: image file {path} missing")
    return missing


def export_native(ws: Workspace, rows: list[dict[str, Any]], root: Path | None = None) -> Path:
    """All items with lineage in fvqa's own schema (images by content hash), under `root`/native
    (default: the workspace's exports folder)."""
    table = pa.Table.from_pylist(rows, schema=ITEM_ARROW_SCHEMA)
    path = (root or ws.exports_dir) / "native" / "fvqa_items.parquet"
    _write_parquet(table, path)
    return path


def _category(row: dict[str, Any], imported: dict[str, Any]) -> str | None:
    if row.get("search_label") and row["search_label"] != SearchLabel.unanswerable:
        return SearchLabel(row["search_label"]).coarse
    return imported.get("category")


def upstream_record(ws: Workspace, row: dict[str, Any]) -> dict[str, Any]:
    """One row in upstream's released layout; imported rows keep their original prompt, images,
    data_source and image_urls (so an imported file exports back unchanged)."""
    prov = json.loads(row.get("provenance") or "{}")
    imported = prov.get("import", {})
    prompt = imported.get("prompt")
    user_text = next((m["content"] for m in prompt or [] if m.get("role") == "user"), None)
    if prompt is None or user_text != row["question"]:
        prompt = row["question"]
    images = []
    shas = _image_shas(row, prov)
    paths = imported.get("image_paths") or [None] * len(shas)
    for sha, path in zip(shas, paths, strict=False):
        images.append({"bytes": ws.find_image(sha).read_bytes(), "path": path})
    image_urls = imported["image_urls"] if "image_urls" in imported else (
        [row["image_url"]] if row.get("image_url") else None)
    return verl_row(
        layout="released", prompt=prompt, images=images, ground_truth=row["answer"],
        candidates=candidate_answers(row.get("aliases")),
        data_source=imported.get("data_source") or data_source(row["split"]),
        data_id=row.get("data_id"), item_id=row["item_id"], image_urls=image_urls,
        category=_category(row, imported),
    )


def export_upstream(ws: Workspace, rows: list[dict[str, Any]], root: Path | None = None) -> list[Path]:
    """One parquet per split in upstream's layout (what veRL and upstream tooling read), under
    `root`/upstream (default: the workspace's exports folder)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(upstream_record(ws, row))
    out = []
    for split, records in sorted(by_split.items()):
        path = (root or ws.exports_dir) / "upstream" / f"fvqa_{split}.parquet"
        _write_parquet(pa.Table.from_pylist(records), path)
        out.append(path)
    return out


def _export_sft(ws: Workspace, root: Path, val_fraction: float) -> list[Path]:
    from fvqa.pipelines.distill_sft import SFTExportError, export_sft

    try:
        return export_sft(ws, root, val_fraction=val_fraction)
    except SFTExportError as exc:
        raise ExportError(str(exc)) from exc


def _publish(staged: Path, final: Path, trash: Path) -> None:
    """Rename the complete folder `staged` to `final`, the previous `final` (if any) moved to `trash`."""
    if final.exists():
        os.replace(final, trash)
    os.replace(staged, final)


FORMATS = ("native", "upstream", "hf", "sft")
"""Every export format, in the order they are written (`sft` only has rows after the distill stage)."""


def export_all(ws: Workspace, formats: list[str], include_unassigned: bool = True, *,
               sft_val_fraction: float = 0.0, card: CardOptions | None = None) -> dict[str, list[Path]]:
    """Write the requested formats; returns the paths written per format.

    `card`: what the `hf` dataset card says beyond the rows (license, name, demo world; default:
    `CardOptions()`, cc-by-4.0).

    `sft`: the distill stage's kept trajectories in veRL's multi-turn SFT format
    (`fvqa.formats.sft`, written by `fvqa.pipelines.distill_sft`), staged and renamed like the others.

    Raises ExportError (writing nothing) when an image the rows reference is not in the store."""
    rows = dataset_rows(ws, include_unassigned)
    missing = missing_images(ws, rows)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ExportError(f"cannot export: {len(missing)} referenced image(s) missing from the store: "
                          f"{'; '.join(missing[:3])}{more}; nothing was written")
    exports = ws.exports_dir
    exports.mkdir(parents=True, exist_ok=True)
    staging = exports / f".staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    writers = {"native": lambda: [export_native(ws, rows, staging)],
               "upstream": lambda: export_upstream(ws, rows, staging),
               "hf": lambda: [export_hf(ws, rows, staging, card)],
               "sft": lambda: _export_sft(ws, staging, sft_val_fraction)}
    try:
        staged = {fmt: writers[fmt]() for fmt in FORMATS if fmt in formats}
        (staging / "previous").mkdir()
        for fmt in staged:  # every format complete: now rename each into place
            (staging / fmt).mkdir(exist_ok=True)  # e.g. upstream with no rows: an empty folder
            _publish(staging / fmt, exports / fmt, staging / "previous" / fmt)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {fmt: [exports / p.relative_to(staging) for p in paths] for fmt, paths in staged.items()}


class ExportStage(Stage):
    """Last stage of a build: write the exports named in `export.formats`."""

    name = "export"
    inputs = ("items",)
    outputs = ()
    description = "native / upstream / Hugging Face exports"

    def run(self, ctx: StageContext) -> None:
        written = export_all(ctx.ws, list(ctx.cfg.formats), ctx.cfg.include_unassigned,
                             sft_val_fraction=ctx.cfg.sft_val_fraction, card=CardOptions.from_config(ctx.config))
        ctx.stats.n_in = ctx.ws.count("dataset")
        ctx.stats.n_out = ctx.stats.n_in
        for fmt, paths in written.items():
            for p in paths:
                ctx.stats.notes.append(f"{fmt}: {p}")
