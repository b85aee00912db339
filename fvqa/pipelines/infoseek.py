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

It streams, so a 1M-line split fits in bounded memory: each file is read once, line by line, and
what survives the checks goes in batches to a scratch DuckDB file (data_id, line number, byte
offset; the companions' few fields); duplicates, the joins and the per-stratum order are SQL there.
The sampler (`fvqa.pipelines.sampling.round_robin`) then walks the strata in that order and reads
back only the lines it takes, by offset. A row whose image is unusable is rejected and replaced by
the next row of its stratum, so N are delivered whenever N usable rows with images exist; when
they do not, the stage says so (a note and a log warning). The order within a stratum is
md5(seed:data_id): the same seed and files always give the same sample, and a re-run replays it,
counting rows already in `items` and passing over rows already rejected, so it continues exactly
where a killed run stopped and emits nothing twice.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa

from fvqa.config import InfoseekConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.formats.infoseek import (
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
from fvqa.formats.jsonl import BadLine, parse_line, parse_line_fast, read_jsonl
from fvqa.formats.shape import Shape, shape_checker
from fvqa.pipelines.base import Stage, StageContext
from fvqa.pipelines.sampling import round_robin, stratum_counts
from fvqa.store import now
from fvqa.vision.gate import ImageReject, check_image

STAGE = "infoseek"
log = logging.getLogger(__name__)

FLUSH_ROWS = 50_000
"""Rows buffered in Python before they go to the scratch database (bounds the stage's memory)."""
SCRATCH_MEMORY = "256MB"
"""DuckDB's memory limit for the scratch database (it spills to its own folder beyond it)."""
CHUNK = 1024
"""Rows of one stratum fetched at a time while sampling."""

SideErrors = dict[str, tuple[str, str]]
"""data_id -> (reason, detail) of a companion line of the wrong shape (the last line for that id)."""


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


def _lines(path: Path) -> Iterator[tuple[int, int, dict[str, Any] | BadLine]]:
    """(byte offset, line number, object or BadLine) per non-blank line: `read_jsonl`'s policy
    (`parse_line_fast` gives `parse_line`'s verdicts), plus where each line starts, so a sampled
    line can be read again later instead of being kept."""
    with path.open("rb") as fh:
        offset = 0
        for line_no, raw in enumerate(fh, start=1):
            parsed = parse_line_fast(raw, line_no)
            if parsed is not None:
                yield offset, line_no, parsed
            offset += len(raw)


def answers_of(obj: dict[str, Any]) -> list[str]:
    """The line's answers as non-empty strings (InfoSeek holds one answer or a list; numbers too)."""
    answers = obj.get("answer")
    answers = [answers] if isinstance(answers, str | int | float) and not isinstance(answers, bool) else answers
    return [str(a) for a in answers if str(a).strip()] if isinstance(answers, list) else []


class _Table:
    """A scratch table filled in bounded batches (Arrow -> DuckDB every `FLUSH_ROWS` rows)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, name: str, columns: dict[str, pa.DataType]) -> None:
        self.con, self.name = con, name
        self.struct = pa.struct(list(columns.items()))
        sql_types = {pa.string(): "VARCHAR", pa.int64(): "BIGINT"}
        con.execute(f"CREATE TABLE {name} ({', '.join(f'{c} {sql_types[t]}' for c, t in columns.items())})")
        self.rows: list[tuple[Any, ...]] = []

    def add(self, *row: Any) -> None:
        self.rows.append(row)
        if len(self.rows) >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        batch = pa.RecordBatch.from_struct_array(pa.array(self.rows, type=self.struct))  # tuples: no transposing
        self.con.register("_batch", batch)
        try:
            self.con.execute(f"INSERT INTO {self.name} SELECT * FROM _batch")
        finally:
            self.con.unregister("_batch")
        self.rows = []


@dataclass
class _Unreadable:
    """Companion lines that name no main record (unreadable, or a data_id of the wrong type)."""

    count: int = 0
    first: str | None = None

    def add(self, where: str) -> None:
        self.count += 1
        self.first = self.first or where


def _read_companion(con: duckdb.DuckDBPyConnection, path: Path | None, table: str, fields: tuple[str, ...],
                    shape: type[Shape], unreadable: _Unreadable) -> SideErrors:
    """Stream a companion file into `table` (data_id, line_no, fields); return its wrong-shaped lines
    (the main record with that data_id is then rejected with it). The last line of a data_id wins."""
    out = _Table(con, table, {"data_id": pa.string(), "line_no": pa.int64(), **{f: pa.string() for f in fields}})
    errors: SideErrors = {}
    if path is not None:
        problem = shape_checker(shape)
        for _, line_no, obj in _lines(path):
            if isinstance(obj, BadLine):
                unreadable.add(f"{path.name}:{line_no}")
                continue
            data_id = obj.get("data_id")
            if data_id is None:
                continue
            if isinstance(data_id, bool) or not isinstance(data_id, str | int):
                unreadable.add(f"{path.name}:{line_no}")  # names no main record
                continue
            key = str(data_id)
            if why := problem(obj):
                errors[key] = (why[0], f"{path.name} line {line_no}: {why[1]}")
                continue
            if errors:
                errors.pop(key, None)  # a later good line replaces an earlier bad one
            out.add(key, line_no, *[v if (v := obj.get(f)) is None or type(v) is str else str(v) for f in fields])
    out.flush()
    return errors


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

    def run(self, ctx: StageContext) -> None:
        cfg: InfoseekConfig = ctx.cfg
        main, withkb, qtype, image_dir = resolve_paths(cfg, ctx.config)
        ctx.ws.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="infoseek-scratch-", dir=ctx.ws.cache_dir) as tmp:
            con = duckdb.connect(str(Path(tmp) / "scratch.duckdb"), config={"memory_limit": SCRATCH_MEMORY})
            try:
                unreadable = _Unreadable()
                kb_err = _read_companion(con, withkb, "withkb", WITHKB_FIELDS, WithkbLine, unreadable)
                qt_err = _read_companion(con, qtype, "qtype", QTYPE_FIELDS, QtypeLine, unreadable)
                if unreadable.count:
                    ctx.stats.notes.append(f"{unreadable.count} unreadable lines in companion files ignored "
                                           f"(first: {unreadable.first})")
                self._read(ctx, con, main, kb_err, qt_err)
                usable = self._candidates(ctx, con, main)
                kt_source = self._knowledge_types(ctx, con)
                self._sample(ctx, con, main, image_dir, usable, kt_source)
            finally:
                con.close()

    def _read(self, ctx: StageContext, con: duckdb.DuckDBPyConnection, main: Path, kb_err: SideErrors,
              qt_err: SideErrors) -> None:
        """Check every main line; what passes goes to the scratch table `main` (data_id, line_no,
        offset, and the reason a later check found, if any: see `_candidates`), the rest are rejects."""
        rows = _Table(con, "main", {"data_id": pa.string(), "line_no": pa.int64(), "off": pa.int64(),
                                    "reason": pa.string(), "detail": pa.string()})
        problem = shape_checker(MainLine)  # the declared shape first: a wrong type names its field
        for offset, line_no, obj in _lines(main):
            ctx.stats.n_in += 1
            if isinstance(obj, BadLine):
                ctx.reject(f"{main.name}:{obj.line_no}", obj.code, str(obj))
                continue
            if why := problem(obj):
                ctx.reject(f"{main.name}:{line_no}", why[0], f"line {line_no}: {why[1]}")
                continue
            data_id = str(obj.get("data_id") or f"{main.name}:{line_no}")
            if side := kb_err.get(data_id) or qt_err.get(data_id):
                ctx.reject(f"infoseek-{data_id}", side[0], f"line {line_no}: {side[1]}")
                continue
            missing = [k for k, v in (("question", obj.get("question")), ("answer", answers_of(obj)),
                                      ("image_id", obj.get("image_id"))) if not v]
            if missing:
                ctx.reject(f"infoseek-{data_id}", "answer_missing" if "answer" in missing else "field_missing",
                           f"line {line_no}: missing {', '.join(missing)}")
                continue
            # a duplicate is one of a data_id seen before (up to here); SQL finds them in `_candidates`
            image_id = str(obj["image_id"])
            if why_eval := check_answer_eval(obj.get("answer_eval")):
                rows.add(data_id, line_no, offset, "malformed_answer_eval", why_eval)
            elif "/" in image_id or "\\" in image_id or image_id.startswith("."):
                rows.add(data_id, line_no, offset, "bad_image_id", f"image_id {image_id!r} is not a plain name")
            else:
                rows.add(data_id, line_no, offset, None, None)
        rows.flush()

    def _candidates(self, ctx: StageContext, con: duckdb.DuckDBPyConnection, main: Path) -> int:
        """Reject duplicates (a data_id's later lines) and the first lines a later check refused;
        join the rest with the companions' last line per data_id into `cand`; return its size."""
        cur = con.execute(
            "SELECT data_id, line_no, reason, detail, rn FROM (SELECT *, row_number() OVER "
            "(PARTITION BY data_id ORDER BY line_no) AS rn FROM main) WHERE rn > 1 OR reason IS NOT NULL "
            "ORDER BY line_no")
        while chunk := cur.fetchmany(10_000):
            for data_id, line_no, reason, detail, rn in chunk:
                if rn > 1:
                    ctx.reject(f"{main.name}:{line_no}", "duplicate_id", f"line {line_no}: {data_id} seen before")
                else:
                    ctx.reject(f"infoseek-{data_id}", reason, f"line {line_no}: {detail}")
        last = "QUALIFY row_number() OVER (PARTITION BY data_id ORDER BY line_no DESC) = 1"
        con.execute(
            "CREATE TABLE cand AS SELECT m.data_id, m.line_no, m.off, k.entity_id, k.entity_text, q.question_type "
            "FROM (SELECT * FROM main QUALIFY row_number() OVER (PARTITION BY data_id ORDER BY line_no) = 1) m "
            f"LEFT JOIN (SELECT * FROM withkb {last}) k USING (data_id) "
            f"LEFT JOIN (SELECT * FROM qtype {last}) q USING (data_id) WHERE m.reason IS NULL")
        con.execute("DROP TABLE main")
        return int(con.execute("SELECT count(*) FROM cand").fetchone()[0])  # type: ignore[index]

    def _knowledge_types(self, ctx: StageContext, con: duckdb.DuckDBPyConnection) -> str | None:
        """Fill `cand.knowledge_type` for stratification; return where it came from."""
        cfg: InfoseekConfig = ctx.cfg
        con.execute("ALTER TABLE cand ADD COLUMN knowledge_type VARCHAR")
        if "knowledge_type" not in cfg.stratify:
            return None
        if cfg.knowledge_types is not None:
            table = read_knowledge_types(cfg.knowledge_types)
            self._set_types(con, "entity_id", table)
            return f"file {cfg.knowledge_types.name}"
        names = [r[0] for r in con.execute("SELECT DISTINCT entity_text FROM cand WHERE entity_text <> '' "
                                           "ORDER BY 1").fetchall()]
        if not names:
            ctx.stats.notes.append("no entity_text (withkb file) to stratify by knowledge type; "
                                   "sampled by question type only")
            return None
        from fvqa.pipelines.tag import taxonomy_of
        from fvqa.tagging.minilm import shared_tagger

        tags = shared_tagger(taxonomy_of(ctx.config.tag)).tag(names)
        self._set_types(con, "entity_text", {n: t.knowledge_type for n, t in zip(names, tags, strict=True)})
        return "minilm pre-tag of entity_text"

    @staticmethod
    def _set_types(con: duckdb.DuckDBPyConnection, column: str, types: dict[str, str]) -> None:
        kt = pa.table({"k": pa.array(list(types), pa.string()), "t": pa.array(list(types.values()), pa.string())})
        con.register("_kt", kt)
        try:
            con.execute(f"UPDATE cand SET knowledge_type = _kt.t FROM _kt WHERE cand.{column} = _kt.k")
        finally:
            con.unregister("_kt")

    def _sample(self, ctx: StageContext, con: duckdb.DuckDBPyConnection, main: Path, image_dir: Path,
                usable: int, kt_source: str | None) -> None:
        """Round-robin over the strata in md5(seed:data_id) order, emitting as it goes: a row whose
        image is unusable is rejected and the next row of its stratum is taken instead."""
        cfg: InfoseekConfig = ctx.cfg
        strata = list(dict.fromkeys(cfg.stratify))  # config names (a Literal): safe in SQL
        part = f"PARTITION BY {', '.join(strata)}" if strata else ""
        order = ", ".join(f"{c} NULLS LAST" for c in strata) or "1"
        con.execute(
            f"CREATE TABLE ranked AS SELECT *, dense_rank() OVER (ORDER BY {order}) AS sid, "
            f"row_number() OVER ({part} ORDER BY md5(? || ':' || data_id), data_id) AS rnk "
            "FROM cand ORDER BY sid, rnk", [str(cfg.seed)])
        con.execute("DROP TABLE cand")
        sids = [r[0] for r in con.execute("SELECT DISTINCT sid FROM ranked ORDER BY sid").fetchall()]
        # what `ctx.todo` would skip, told apart: rows already delivered count, rows rejected do not
        done = ctx.ws.keys("items", "item_id")
        rejected = ctx.ws.rejected_keys(STAGE)
        refused = 0
        with main.open("rb") as fh:

            def take(row: dict[str, Any]) -> bool:
                nonlocal refused
                item_id = f"infoseek-{row['data_id']}"
                ok = item_id in done or (item_id not in rejected
                                         and self._emit(ctx, self._reread(fh, main, row), item_id, main,
                                                        image_dir, kt_source))
                refused += not ok
                return ok

            queues = [self._queue(con, sid) for sid in sids]
            chosen = list(ctx.progress(round_robin(queues, cfg.n, cap_field="entity_id", cap=cfg.per_entity,
                                                   take=take), total=min(cfg.n, usable), description="infoseek"))
        ctx.stats.extra["strata"] = counts = stratum_counts(chosen, cfg.stratify)
        if counts:
            ctx.stats.notes.append(
                f"delivered {len(chosen)} of {cfg.n} asked from {usable} usable rows over {len(sids)} strata "
                f"({' x '.join(cfg.stratify)}; {min(counts.values())}-{max(counts.values())} per stratum)"
                + (f"; {refused} row(s) without a usable image replaced from their strata" if refused else "")
                + (f"; knowledge type from {kt_source}" if kt_source else ""))
        if len(chosen) < cfg.n:
            held = usable - len(chosen) - refused
            short = (f"asked {cfg.n}, delivered {len(chosen)}: every stratum is used up ({usable} usable rows, "
                     f"{refused} without a usable image, {held} held back by per_entity={cfg.per_entity})")
            ctx.stats.notes.append(short)
            log.warning("infoseek: %s", short)

    @staticmethod
    def _queue(con: duckdb.DuckDBPyConnection, sid: int) -> Iterator[dict[str, Any]]:
        """One stratum's rows in sampling order, fetched `CHUNK` at a time (only as far as needed)."""
        cols = ("data_id", "line_no", "off", "entity_id", "entity_text", "question_type", "knowledge_type")
        start = 0
        while True:
            rows = con.execute(f"SELECT {', '.join(cols)} FROM ranked WHERE sid = ? AND rnk > ? AND rnk <= ? "
                               "ORDER BY rnk", [sid, start, start + CHUNK]).fetchall()
            yield from (dict(zip(cols, r, strict=True)) for r in rows)
            if len(rows) < CHUNK:
                return
            start += CHUNK

    @staticmethod
    def _reread(fh: IO[bytes], main: Path, row: dict[str, Any]) -> dict[str, Any]:
        """The sampled line again, read at its offset, as the fields an item needs."""
        fh.seek(row["off"])
        obj = parse_line(fh.readline(), row["line_no"])
        if not isinstance(obj, dict) or str(obj.get("data_id") or f"{main.name}:{row['line_no']}") != row["data_id"]:
            raise RuntimeError(f"{main} changed while the infoseek stage read it (line {row['line_no']}); run it again")
        return {**row, "question": obj["question"], "answers": answers_of(obj), "answer_eval": obj.get("answer_eval"),
                "image_id": str(obj["image_id"]), "upstream_data_id": str(obj["data_id"]) if obj.get("data_id") else None}

    def _emit(self, ctx: StageContext, row: dict[str, Any], item_id: str, main: Path, image_dir: Path,
              kt_source: str | None) -> bool:
        """Check the row's image and emit its item with it; False (and a reject) when it is unusable."""
        cfg: InfoseekConfig = ctx.cfg
        image_path = find_image(image_dir, cfg.image_pattern, row["image_id"])
        if image_path is None:
            expected = image_dir / cfg.image_pattern.format(image_id=row["image_id"])
            ctx.reject(item_id, "image_missing", f"{expected} not found (image_id {row['image_id']})")
            return False
        try:
            data = image_path.read_bytes()
        except OSError as exc:
            ctx.reject(item_id, "image_unreadable", f"{image_path.name}: {exc}")
            return False
        try:
            checked = check_image(data)
        except ImageReject as exc:
            ctx.reject(item_id, exc.reason, f"{image_path.name}: {exc.detail}")
            return False
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
        return True
