"""Exports: native Parquet, upstream's veRL layout (as `lmms-lab/FVQA`), and a Hugging Face folder.

Files are written to a temporary name and renamed, so a crash never leaves a half-written export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fvqa.formats.verl import candidate_answers, data_source, verl_row
from fvqa.pipelines.base import Stage, StageContext
from fvqa.schema import ITEM_ARROW_SCHEMA, SearchLabel
from fvqa.store import Workspace


def dataset_rows(ws: Workspace, include_unassigned: bool = True) -> list[dict[str, Any]]:
    """The `dataset` view as dicts, sorted by item id (the order every export uses)."""
    where = "" if include_unassigned else "WHERE split <> 'unassigned'"
    cur = ws.con.execute(f"SELECT * FROM dataset {where} ORDER BY item_id")
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.part")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def export_native(ws: Workspace, rows: list[dict[str, Any]]) -> Path:
    """All items with lineage in fvqa's own schema (images by content hash)."""
    table = pa.Table.from_pylist(rows, schema=ITEM_ARROW_SCHEMA)
    path = ws.exports_dir / "native" / "fvqa_items.parquet"
    _atomic_parquet(table, path)
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
    shas = imported.get("image_sha256s") or ([row["image_sha256"]] if row.get("image_sha256") else [])
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


def export_upstream(ws: Workspace, rows: list[dict[str, Any]]) -> list[Path]:
    """One parquet per split in upstream's layout (what veRL and upstream tooling read)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_split.setdefault(row["split"], []).append(upstream_record(ws, row))
    out = []
    for split, records in sorted(by_split.items()):
        path = ws.exports_dir / "upstream" / f"fvqa_{split}.parquet"
        _atomic_parquet(pa.Table.from_pylist(records), path)
        out.append(path)
    return out


def _card(rows: list[dict[str, Any]]) -> str:
    splits = Counter(r["split"] for r in rows)
    labels = Counter(r.get("search_label") or "unlabelled" for r in rows)
    types = Counter(r.get("knowledge_type") or "untagged" for r in rows)
    sources = Counter(r["source"] for r in rows)

    def table(title: str, counts: Counter[str]) -> str:
        lines = [f"### {title}", "", "| value | items |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(counts.items())]
        return "\n".join(lines)

    header = "\n".join(
        ["---", "license: cc-by-4.0", "task_categories:", "- visual-question-answering",
         "language:", "- en", "pretty_name: FVQA (fvqa build)", "configs:", "- config_name: default",
         "  data_files:"]
        + [f"  - split: {s}\n    path: {s}/*" for s in sorted(splits)]
        + ["---"]
    )
    body = [
        "# FVQA — search-balanced visual question answering",
        "",
        "Built with `fvqa build`. Each item carries its lineage (source, concept and MetaCLIP tier, "
        "entity, knowledge type, probe statistics, the 4-way search label, split, annotation status).",
        "",
        f"Items: {len(rows)}",
        "",
        table("Items per split", splits),
        "",
        table("Items per search label", labels),
        "",
        table("Items per knowledge type", types),
        "",
        table("Items per source", sources),
    ]
    return header + "\n\n" + "\n".join(body) + "\n"


def export_hf(ws: Workspace, rows: list[dict[str, Any]]) -> Path:
    """A `datasets.DatasetDict` folder (`save_to_disk`) with images embedded and a dataset card."""
    import datasets

    features = datasets.Features.from_arrow_schema(ITEM_ARROW_SCHEMA)
    features["image"] = datasets.Image()
    by_split: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        image = {"bytes": ws.find_image(row["image_sha256"]).read_bytes(), "path": None} if row.get(
            "image_sha256") else None
        by_split.setdefault(row["split"], []).append({**row, "image": image})
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_list(r, features=features) for s, r in sorted(by_split.items())}
    )
    final = ws.exports_dir / "hf"
    tmp = ws.exports_dir / "hf.part"
    shutil.rmtree(tmp, ignore_errors=True)
    dd.save_to_disk(str(tmp))
    (tmp / "README.md").write_text(_card(rows), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def export_all(ws: Workspace, formats: list[str], include_unassigned: bool = True) -> dict[str, list[Path]]:
    """Write the requested formats; returns the paths written per format."""
    rows = dataset_rows(ws, include_unassigned)
    written: dict[str, list[Path]] = {}
    if "native" in formats:
        written["native"] = [export_native(ws, rows)]
    if "upstream" in formats:
        written["upstream"] = export_upstream(ws, rows)
    if "hf" in formats:
        written["hf"] = [export_hf(ws, rows)]
    return written


class ExportStage(Stage):
    """Last stage of a build: write the exports named in `export.formats`."""

    name = "export"
    inputs = ("items",)
    outputs = ()
    description = "native / upstream / Hugging Face exports"

    def run(self, ctx: StageContext) -> None:
        written = export_all(ctx.ws, list(ctx.cfg.formats), ctx.cfg.include_unassigned)
        ctx.stats.n_in = ctx.ws.count("dataset")
        ctx.stats.n_out = ctx.stats.n_in
        for fmt, paths in written.items():
            for p in paths:
                ctx.stats.notes.append(f"{fmt}: {p}")
