"""InfoSeek sampling: official jsonl files -> FVQA items with images in the workspace store.

Reads `infoseek_{split}.jsonl` (data_id, image_id, question, answer, answer_eval, data_split), joins
`*_withkb.jsonl` (entity_id, entity_text) and `*_qtype.jsonl` (question_type) on data_id, and samples
N items evenly over question type x knowledge type, at most `per_entity` per entity, seeded. The
knowledge type of an entity comes from a user file (`knowledge_types`) or, failing that, from the
offline MiniLM tagger run on the entity's name (once per distinct name). Every line is first checked
against its declared shape (`MainLine`, and `WithkbLine` / `QtypeLine` for its companions' lines, in
`fvqa.formats.infoseek`): a wrong-typed field is a `wrong type` reject naming the field, file and line.
Bad lines (with their line number), missing images, images the gate refuses (`fvqa.vision.gate`: unknown format, undecodable,
too large, too small), rows without an answer and malformed numeric ranges become rejects; an image's
`images` row commits in the same batch as its item. The file format itself (fields, the line reader,
answer_eval checks) is `fvqa.formats.infoseek`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from fvqa.config import InfoseekConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.formats.infoseek import (
    MAIN_FIELDS,
    QTYPE_FIELDS,
    QTYPE_SUFFIX,
    WITHKB_FIELDS,
    WITHKB_SUFFIX,
    MainLine,
    QtypeLine,
    WithkbLine,
    aliases_of,
    check_answer_eval,
    companion,
    find_image,
)
from fvqa.formats.jsonl import BadLine, read_jsonl
from fvqa.formats.shape import Shape, validate
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.sampling import balanced_sample, stratum_counts
from fvqa.store import now
from fvqa.vision.gate import ImageReject, check_image

STAGE = "infoseek"


def resolve_paths(cfg: InfoseekConfig, config: RunConfig) -> tuple[Path, Path | None, Path | None, Path]:
    """Main jsonl, withkb, qtype and image dir (a demo world's are filled in at load, `fvqa.config`);
    companions default to the files beside the main jsonl, images to its `images/` folder."""
    main = cfg.jsonl
    if main is None:
        raise ConfigError("infoseek.jsonl is not set (and no demo world is configured)")
    if not main.is_file():
        raise ConfigError(f"infoseek.jsonl not found: {main}")
    for name, given in (("withkb", cfg.withkb), ("qtype", cfg.qtype), ("knowledge_types", cfg.knowledge_types)):
        if given is not None and not given.is_file():
            raise ConfigError(f"infoseek.{name} not found: {given}")
    withkb = cfg.withkb or companion(main, WITHKB_SUFFIX)
    qtype = cfg.qtype or companion(main, QTYPE_SUFFIX)
    image_dir = cfg.image_dir or main.parent / "images"
    if not image_dir.is_dir():
        raise ConfigError(f"infoseek.image_dir not found: {image_dir}")
    return main, withkb if withkb.is_file() else None, qtype if qtype.is_file() else None, image_dir


def _side_table(path: Path | None, fields: tuple[str, ...], bad: list[str],
                shape: type[Shape]) -> dict[str, dict[str, Any] | tuple[str, str]]:
    """data_id -> fields of a companion file, or (reason, detail) for a line of the wrong shape (the
    main record with that data_id is then rejected with it); unreadable lines are listed in `bad`."""
    out: dict[str, dict[str, Any] | tuple[str, str]] = {}
    if path is None:
        return out
    for rec in read_jsonl(path):
        if isinstance(rec, BadLine):
            bad.append(f"{path.name}:{rec.line_no}")
            continue
        line_no, obj = rec
        data_id = obj.get("data_id")
        if data_id is None:
            continue
        if isinstance(data_id, bool) or not isinstance(data_id, str | int):
            bad.append(f"{path.name}:{line_no}")  # names no main record
            continue
        checked = validate(shape, obj)
        if isinstance(checked, tuple):
            reason, detail = checked
            out[str(data_id)] = (reason, f"{path.name} line {line_no}: {detail}")
        else:
            out[str(data_id)] = {f: getattr(checked, f) for f in fields}
    return out


def read_knowledge_types(path: Path) -> dict[str, str]:
    """entity_id -> knowledge_type from a csv or jsonl file with those two columns."""
    out: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if not {"entity_id", "knowledge_type"} <= set(reader.fieldnames or []):
                raise ConfigError(f"{path}: needs the columns entity_id and knowledge_type")
            rows: Any = list(reader)
    else:
        rows = []
        for rec in read_jsonl(path):
            if isinstance(rec, BadLine):
                raise ConfigError(f"infoseek.knowledge_types {path}: {rec}")
            rows.append(rec[1])
    for row in rows:
        if row.get("entity_id") and row.get("knowledge_type"):
            out[str(row["entity_id"])] = str(row["knowledge_type"])
    return out


class InfoseekStage(Stage):
    """InfoSeek jsonl -> items (source `infoseek`)."""

    name = STAGE
    outputs = ("items",)
    description = "sample InfoSeek questions into items"

    def _read(self, ctx: StageContext, main: Path, kb: dict[str, dict[str, Any] | tuple[str, str]],
              qt: dict[str, dict[str, Any] | tuple[str, str]]) -> list[dict[str, Any]]:
        """Parse the main file into candidate rows; everything unusable becomes a reject."""
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for rec in read_jsonl(main):
            ctx.stats.n_in += 1
            if isinstance(rec, BadLine):
                ctx.reject(f"{main.name}:{rec.line_no}", rec.code, str(rec))
                continue
            line_no, obj = rec
            checked = validate(MainLine, obj)  # the declared shape first: a wrong type names its field
            if isinstance(checked, tuple):
                ctx.reject(f"{main.name}:{line_no}", checked[0], f"line {line_no}: {checked[1]}")
                continue
            data_id = str(obj.get("data_id") or f"{main.name}:{line_no}")
            key = f"infoseek-{data_id}"
            side = [s for s in (kb.get(data_id), qt.get(data_id)) if isinstance(s, tuple)]
            if side:
                ctx.reject(key, side[0][0], f"line {line_no}: {side[0][1]}")
                continue
            answers = obj.get("answer")
            answers = [answers] if isinstance(answers, str | int | float) and not isinstance(answers, bool) else answers
            answers = [str(a) for a in answers if str(a).strip()] if isinstance(answers, list) else []
            missing = [k for k, v in (("question", obj.get("question")), ("answer", answers),
                                      ("image_id", obj.get("image_id"))) if not v]
            if missing:
                ctx.reject(key, "answer_missing" if "answer" in missing else "field_missing",
                           f"line {line_no}: missing {', '.join(missing)}")
                continue
            if data_id in seen:
                ctx.reject(f"{main.name}:{line_no}", "duplicate_id", f"line {line_no}: {data_id} seen before")
                continue
            seen.add(data_id)
            if why := check_answer_eval(obj.get("answer_eval")):
                ctx.reject(key, "malformed_answer_eval", f"line {line_no}: {why}")
                continue
            image_id = str(obj["image_id"])
            if "/" in image_id or "\\" in image_id or image_id.startswith("."):
                ctx.reject(key, "bad_image_id", f"line {line_no}: image_id {image_id!r} is not a plain name")
                continue
            rows.append({**{k: obj.get(k) for k in MAIN_FIELDS}, "data_id": data_id, "image_id": image_id,
                         "upstream_data_id": str(obj["data_id"]) if obj.get("data_id") else None,
                         "answers": answers, "line_no": line_no,
                         **{k: v for s in (kb.get(data_id), qt.get(data_id)) if isinstance(s, dict)
                            for k, v in s.items()}})
        return rows

    def _knowledge_types(self, ctx: StageContext, rows: list[dict[str, Any]]) -> str | None:
        """Fill row['knowledge_type'] for stratification; return where it came from."""
        cfg: InfoseekConfig = ctx.cfg
        if "knowledge_type" not in cfg.stratify:
            return None
        if cfg.knowledge_types is not None:
            table = read_knowledge_types(cfg.knowledge_types)
            for row in rows:
                row["knowledge_type"] = table.get(str(row.get("entity_id")))
            return f"file {cfg.knowledge_types.name}"
        names = sorted({r["entity_text"] for r in rows if r.get("entity_text")})
        if not names:
            ctx.stats.notes.append("no entity_text (withkb file) to stratify by knowledge type; "
                                   "sampled by question type only")
            return None
        from fvqa.pipelines.tag import taxonomy_of
        from fvqa.tagging.minilm import shared_tagger

        tags = shared_tagger(taxonomy_of(ctx.config.tag)).tag(names)
        by_name = {n: t.knowledge_type for n, t in zip(names, tags, strict=True)}
        for row in rows:
            row["knowledge_type"] = by_name.get(row.get("entity_text") or "")
        return "minilm pre-tag of entity_text"

    def run(self, ctx: StageContext) -> None:
        cfg: InfoseekConfig = ctx.cfg
        main, withkb, qtype, image_dir = resolve_paths(cfg, ctx.config)
        side_bad: list[str] = []
        kb = _side_table(withkb, WITHKB_FIELDS, side_bad, WithkbLine)
        qt = _side_table(qtype, QTYPE_FIELDS, side_bad, QtypeLine)
        if side_bad:
            ctx.stats.notes.append(f"{len(side_bad)} unreadable lines in companion files ignored "
                                   f"(first: {side_bad[0]})")
        rows = self._read(ctx, main, kb, qt)
        kt_source = self._knowledge_types(ctx, rows)
        sample = balanced_sample(rows, cfg.n, strata=cfg.stratify, seed=cfg.seed, id_field="data_id",
                                 cap_field="entity_id", cap=cfg.per_entity)
        ctx.stats.extra["strata"] = counts = stratum_counts(sample, cfg.stratify)
        if counts:
            ctx.stats.notes.append(
                f"sampled {len(sample)} of {len(rows)} usable rows over {len(counts)} strata "
                f"({' x '.join(cfg.stratify)}; {min(counts.values())}-{max(counts.values())} per stratum)"
                + (f"; knowledge type from {kt_source}" if kt_source else ""))
        todo = set(ctx.todo([f"infoseek-{r['data_id']}" for r in sample]))
        for row in ctx.progress(sample, description="infoseek"):
            item_id = f"infoseek-{row['data_id']}"
            if item_id in todo:
                self._emit(ctx, row, item_id, main, image_dir, kt_source)

    def _emit(self, ctx: StageContext, row: dict[str, Any], item_id: str, main: Path, image_dir: Path,
              kt_source: str | None) -> None:
        cfg: InfoseekConfig = ctx.cfg
        image_path = find_image(image_dir, cfg.image_pattern, row["image_id"])
        if image_path is None:
            expected = image_dir / cfg.image_pattern.format(image_id=row["image_id"])
            ctx.reject(item_id, "image_missing", f"{expected} not found (image_id {row['image_id']})")
            return
        try:
            data = image_path.read_bytes()
        except OSError as exc:
            ctx.reject(item_id, "image_unreadable", f"{image_path.name}: {exc}")
            return
        try:
            checked = check_image(data)
        except ImageReject as exc:
            ctx.reject(item_id, exc.reason, f"{image_path.name}: {exc.detail}")
            return
        # the file now; its `images` row in the same batch as the item (StageContext.emit_together)
        ref, image_row = ctx.ws.store_image(data, provenance={"stage": STAGE, "file": image_path.name},
                                            checked=checked)
        answer_eval = row.get("answer_eval")
        prov: dict[str, Any] = {"backend": "files", "file": main.name, "line": row["line_no"],
                                "time": now().isoformat()}
        if kt_source:
            prov["stratum"] = {"knowledge_type": row.get("knowledge_type"), "source": kt_source}
        ctx.emit_together(("images", image_row), ("items", dict(
            item_id=item_id, source="infoseek", data_id=row.get("upstream_data_id"),
            question=row["question"], answer=row["answers"][0],
            aliases=aliases_of(row["answers"], answer_eval),
            answer_eval=json.dumps(answer_eval, ensure_ascii=False),
            question_type=row.get("question_type"), image_sha256=ref.sha256,
            entity_id=row.get("entity_id"), entity_text=row.get("entity_text"),
            provenance=json.dumps({STAGE: prov}, ensure_ascii=False),
        )))
