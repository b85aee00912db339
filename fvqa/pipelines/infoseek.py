"""InfoSeek sampling: official jsonl files -> FVQA items with images in the workspace store.

Reads `infoseek_{split}.jsonl` (data_id, image_id, question, answer, answer_eval, data_split), joins
`*_withkb.jsonl` (entity_id, entity_text) and `*_qtype.jsonl` (question_type) on data_id, and samples
N items stratified by question type, at most `per_entity` per entity, seeded. Bad lines, missing or
unreadable images and rows without an answer become rejects with the line number or image id.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fvqa.config import InfoseekConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.base import Stage, StageContext
from fvqa.store import ImageError, now

STAGE = "infoseek"


@dataclass
class BadLine:
    """A line that is not a JSON object (kept with its number for the reject)."""

    line_no: int
    error: str


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]] | BadLine]:
    """Yield (line number, object) per line, or BadLine for lines that do not parse."""
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadLine(line_no, f"{exc.msg} at column {exc.colno}")
                continue
            if not isinstance(obj, dict):
                yield BadLine(line_no, "line is not a JSON object")
                continue
            yield line_no, obj


def _companion(main: Path, suffix: str) -> Path:
    return main.with_name(main.stem + suffix + main.suffix)


def resolve_paths(cfg: InfoseekConfig, config: RunConfig) -> tuple[Path, Path | None, Path | None, Path]:
    """Main jsonl, withkb, qtype and image dir, defaulting to the demo world's files."""
    world = config.world.path / "infoseek" if config.world else None
    main = cfg.jsonl or (world / "infoseek_train.jsonl" if world else None)
    if main is None:
        raise ConfigError("infoseek.jsonl is not set (and no demo world is configured)")
    if not main.is_file():
        raise ConfigError(f"infoseek.jsonl not found: {main}")
    withkb = cfg.withkb or _companion(main, "_withkb")
    qtype = cfg.qtype or _companion(main, "_qtype")
    image_dir = cfg.image_dir or (world / "images" if world else main.parent / "images")
    return main, withkb if withkb.is_file() else None, qtype if qtype.is_file() else None, image_dir


def _side_table(path: Path | None, fields: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path is None:
        return out
    for rec in read_jsonl(path):
        if isinstance(rec, BadLine):
            continue  # the main file's rejects are what users act on; side files only enrich
        _, obj = rec
        if "data_id" in obj:
            out[str(obj["data_id"])] = {f: obj.get(f) for f in fields}
    return out


def stratified_sample(
    rows: list[dict[str, Any]], n: int, per_entity: int, seed: int, strata: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Round-robin over strata (e.g. question type), at most `per_entity` rows per entity, seeded."""
    rng = random.Random(seed)
    rows = sorted(rows, key=lambda r: r["data_id"])
    rng.shuffle(rows)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(s) for s in strata)].append(row)
    per_entity_count: dict[Any, int] = defaultdict(int)
    queues = [groups[k] for k in sorted(groups, key=str)]
    chosen: list[dict[str, Any]] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            while queue:
                row = queue.pop()
                ent = row.get("entity_id") or row["data_id"]
                if per_entity_count[ent] < per_entity:
                    per_entity_count[ent] += 1
                    chosen.append(row)
                    break
            if len(chosen) >= n:
                break
    return chosen


class InfoseekStage(Stage):
    """InfoSeek jsonl -> items (source `infoseek`)."""

    name = STAGE
    outputs = ("items",)
    description = "sample InfoSeek questions into items"

    def run(self, ctx: StageContext) -> None:
        cfg: InfoseekConfig = ctx.cfg
        main, withkb, qtype, image_dir = resolve_paths(cfg, ctx.config)
        kb = _side_table(withkb, ("entity_id", "entity_text"))
        qt = _side_table(qtype, ("question_type",))
        rows = []
        for rec in read_jsonl(main):
            ctx.stats.n_in += 1
            if isinstance(rec, BadLine):
                ctx.reject(f"{main.name}:{rec.line_no}", "bad JSON line", f"line {rec.line_no}: {rec.error}")
                continue
            line_no, obj = rec
            data_id = str(obj.get("data_id") or f"{main.name}:{line_no}")
            answer = obj.get("answer")
            if isinstance(answer, list):
                answer = answer[0] if answer else None
            if not answer or not obj.get("question") or not obj.get("image_id"):
                missing = [k for k in ("question", "answer", "image_id") if not obj.get(k)]
                ctx.reject(f"infoseek-{data_id}", "answer missing" if "answer" in missing else "field missing",
                           f"line {line_no}: missing {', '.join(missing)}")
                continue
            rows.append({**obj, "data_id": data_id, "answer": str(answer), "line_no": line_no,
                         **kb.get(data_id, {}), **qt.get(data_id, {})})
        sample = stratified_sample(rows, cfg.n, cfg.per_entity, cfg.seed, ("question_type",))
        todo = set(ctx.todo([f"infoseek-{r['data_id']}" for r in sample]))
        for row in ctx.progress(sample, description="infoseek"):
            item_id = f"infoseek-{row['data_id']}"
            if item_id not in todo:
                continue
            image_path = image_dir / cfg.image_pattern.format(image_id=row["image_id"])
            if not image_path.is_file():
                ctx.reject(item_id, "missing image", f"{image_path} not found (image_id {row['image_id']})")
                continue
            try:
                ref = ctx.ws.put_image(image_path.read_bytes(), provenance={"stage": STAGE, "file": image_path.name})
            except ImageError as exc:
                ctx.reject(item_id, "unreadable image", f"{image_path.name}: {exc}")
                continue
            answer_eval = row.get("answer_eval")
            aliases = [str(a) for a in answer_eval] if isinstance(answer_eval, list) and all(
                isinstance(a, str) for a in answer_eval) else []
            if row["answer"] not in aliases:
                aliases.insert(0, row["answer"])
            ctx.emit("items", dict(
                item_id=item_id, source="infoseek", question=row["question"], answer=row["answer"],
                aliases=aliases, answer_eval=json.dumps(answer_eval, ensure_ascii=False),
                question_type=row.get("question_type"), image_sha256=ref.sha256,
                entity_id=row.get("entity_id"), entity_text=row.get("entity_text"),
                provenance=json.dumps({STAGE: {"backend": "files", "file": main.name,
                                               "line": row["line_no"], "time": now().isoformat()}}),
            ))
