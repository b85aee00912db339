"""Benchmark loaders: local files in each benchmark's official format -> validated `EvalItem`s.

Every row either becomes an item or a `Reject` with a reason a person can act on (a field of the wrong
type: reason ``wrong_type``, the detail naming the field and what was found, checked before anything
is allocated from it; an unparsable JSON text in a cell: ``malformed JSON``); rows left out on
purpose (another split, a non-English SimpleVQA item, a text-only MMSearch query) are counted in
`filtered` with the reason, so the numbers always add up. Every image goes through the image gate
(`fvqa.vision.gate`: format sniffed, pixel budget, full decode, minimum side); one it refuses makes its
row a reject with the gate's reason (e.g. ``image undecodable``), never a question scored as wrong.
Formats:

* ``fvqa``: the released ``lmms-lab/FVQA`` test parquet (upstream's veRL layout: ``prompt``,
  ``images``, ``reward_model``, ``data_id``, ``image_urls``, ``category``), or fvqa's native export
  (``fvqa_items.parquet``; images by sha256 under ``image_dir``, the workspace's ``images/``).
* ``infoseek``: the official annotation files (``infoseek_val.jsonl`` / ``infoseek_test.jsonl``:
  ``data_id, image_id, question, answer, answer_eval, data_split``) with the ``_qtype`` companion
  (``infoseek_val_qtype.jsonl``: ``data_id, question_type``); images ``<image_dir>/<image_id>.jpg``
  (OVEN's); an optional subset file of data ids (the paper's 2k test subset). The Human split
  (``infoseek_human.jsonl``) ships the same fields without public answers: give its re-annotated
  answers with ``answers:`` (jsonl/json of ``data_id, answer`` [``answer_eval``, ``question_type``]),
  merged over the official lines by ``data_id``; a Human line with no answer is a ``no_answer`` reject.
* ``mmsearch``: MMSearch's end-to-end set (``end2end.parquet`` / json / jsonl: ``sample_id, query,
  query_image, gt_answer, alternative_gt_answers, area, subfield``); image questions only by default.
* ``simplevqa``: SimpleVQA's release (``data_id, image, question, answer, language``; image as an HF
  image, base64 or a path); English only by default, as the paper.
* ``livevqa``: LiveVQA Research-Preview's ``qa.json`` (``sample_id, query, query_image, gt_answer``;
  ``query_image`` is the authors' absolute path, found by its name in ``image/`` beside the file;
  topics from ``qa_detailed.json`` when it is there), or the older ``id, image, question, answer``
  records (json/jsonl/parquet; ``img_path``/``image_path`` accepted; a list answer gives aliases).
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError
from fvqa.eval.config import BenchmarkSpec
from fvqa.eval.metrics import infoseek_gold_range, infoseek_question_type
from fvqa.formats.infoseek import (
    QTYPE_SUFFIX,
    MainLine,
    aliases_of,
    check_answer_eval,
    companion,
    find_image,
)
from fvqa.formats.jsonl import BadLine, read_jsonl
from fvqa.formats.shape import MALFORMED_JSON, WRONG_TYPE, found, validate
from fvqa.formats.verl import RewardModel, UpstreamRow
from fvqa.vision.gate import ImageReject, check_image

IMAGE_IN_PROMPT = "<image>"


@dataclass
class EvalItem:
    """One benchmark question ready for a workflow and its scorers."""

    item_id: str
    benchmark: str
    kind: str
    question: str
    image: bytes
    answer: str
    aliases: list[str]  # every accepted answer, the ground truth first
    answer_eval: Any = None  # InfoSeek's official gold (strings, or a numeric range)
    question_type: str | None = None  # InfoSeek: string | numerical | time
    image_url: str | None = None
    data_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # knowledge_type, search_label, split, area...


@dataclass(frozen=True)
class Reject:
    key: str
    reason: str
    detail: str = ""


@dataclass
class LoadResult:
    items: list[EvalItem]
    rejects: list[Reject]
    n_rows: int
    filtered: Counter[str] = field(default_factory=Counter)  # reason -> rows left out on purpose
    sampled_out: int = 0  # valid items not drawn by --limit


class RowError(ValueError):
    """A row is unusable; the message is the reject reason, `detail` (if any) what was found where."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


class ImageRowError(RowError):
    """A row whose image the gate refuses: the message is the gate's reason, `detail` what it found."""


def _wrong(field: str, expected: str, value: Any) -> RowError:
    """The one "field X has the wrong type" reject of the loaders (reason code WRONG_TYPE)."""
    return RowError(WRONG_TYPE, f"{field}: expected {expected}, got {found(value)}")


# ------------------------------------------------------------------------------------ file reading


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | RowError]]:
    """(position, row) per record of a jsonl, json (list, or {"data": [...]}) or parquet file."""
    if not path.is_file():
        raise ConfigError(f"benchmark file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for non-parquet input
            raise ConfigError(f"{path}: not a readable parquet file ({exc})") from exc
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row
        return
    if suffix == ".jsonl":
        for rec in read_jsonl(path):
            if isinstance(rec, BadLine):
                yield f"line {rec.line_no}", RowError(rec.code, rec.reason)
            else:
                yield f"line {rec[0]}", rec[1]
        return
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ConfigError(f"{path}: not a readable JSON file ({str(exc)[:200]})") from exc
        if isinstance(data, dict):
            data = data.get("data", data.get("test"))
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
        for i, row in enumerate(data):
            yield f"record {i}", row if isinstance(row, dict) else RowError(WRONG_TYPE, f"record: expected an object, got {found(row)}")
        return
    raise ConfigError(f"{path}: unsupported benchmark file type {suffix!r} (use .jsonl, .json or .parquet)")


def _text(row: dict[str, Any], *names: str, required: bool = True) -> str | None:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return f"{value:g}" if isinstance(value, float) else str(value)
        if value is not None and not isinstance(value, str):
            raise _wrong(name, "a string or number", value)
    if required:
        raise RowError("field_missing", f"missing or empty {' / '.join(names)}")
    return None


META_MAX_CHARS = 500
"""Longer descriptive fields are cut: they are reported per item, never scored."""


def _meta(row: dict[str, Any], **fields: tuple[str, ...]) -> dict[str, str | int | float | bool | None]:
    """Descriptive fields (`name=(source keys, first non-empty wins)`): each a JSON scalar, else the
    row is a `wrong_type` reject naming the field (a nested or huge value never reaches a report)."""
    out: dict[str, str | int | float | bool | None] = {}
    for name, keys in fields.items():
        value = next((row[k] for k in keys if row.get(k) not in (None, "")), None)
        if value is not None and not isinstance(value, str | int | float | bool):
            raise _wrong(next(k for k in keys if row.get(k) is value), "a string or number", value)
        out[name] = value[:META_MAX_CHARS] if isinstance(value, str) else value
    return out


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON-encoded list (upstream's candidate_answers)
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RowError(MALFORMED_JSON, f"{what}: {exc.msg} at column {exc.colno}") from exc
            except RecursionError as exc:
                raise RowError(MALFORMED_JSON, f"{what}: JSON nested too deeply to read") from exc
        else:
            return [text] if text else []
    if not isinstance(value, list | tuple):
        raise _wrong(what, "a list of strings", value)
    out = []
    for i, v in enumerate(value):
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = f"{v:g}"
        if not isinstance(v, str):
            raise _wrong(f"{what}[{i}]", "a string", v)
        if v.strip():
            out.append(v.strip())
    return out


def _dedupe(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


# ------------------------------------------------------------------------------------------ images


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long to be a path: base64 text
        return False


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RowError("bad_image_reference", f"image is neither an existing file nor valid base64 ({exc})") from exc


def image_bytes(value: Any, base: Path) -> bytes:
    """Image bytes from an HF image dict, raw bytes, a data URL, base64 text or a path under `base`."""
    if isinstance(value, list | tuple):
        if not value:
            raise RowError("image_missing", "empty image list")
        value = value[0]
    data: bytes | None = None
    # types first, before anything is allocated: bytes(10**12) would ask for a terabyte
    if isinstance(value, dict):
        raw, where = value.get("bytes"), value.get("path")
        if raw is not None and not isinstance(raw, bytes | bytearray):
            raise _wrong("image.bytes", "the image's bytes", raw)
        if where is not None and not isinstance(where, str):
            raise _wrong("image.path", "a string", where)
        if raw:
            data = bytes(raw)
        elif where:
            value = where
        else:
            raise RowError("image_missing", "image entry has neither bytes nor path")
    elif value is not None and not isinstance(value, str | bytes | bytearray):
        raise _wrong("image", "bytes, a path, base64 text or {bytes, path}", value)
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    if data is None:
        if not isinstance(value, str) or not value.strip():
            raise RowError("image_missing", "no image field")
        text = value.strip()
        path = Path(text) if len(text) < 1024 else None
        if path is not None and not path.is_absolute():
            path = base / text
        if text.startswith("data:"):
            data = _b64(text.split(",", 1)[-1])
        elif path is not None and _is_file(path):
            data = path.read_bytes()
        elif len(text) > 256:  # SimpleVQA's json ships images as base64 text
            data = _b64(text)
        else:
            raise RowError("image_missing", f"image file not found: {path}")
    try:
        check_image(data)  # the one image gate: a bad image is a load reject, never a wrong prediction
    except ImageReject as exc:
        raise ImageRowError(exc.reason, exc.detail) from exc
    return data


# ----------------------------------------------------------------------------------------- loaders


def _fvqa(spec: BenchmarkSpec, row: dict[str, Any], base: Path, filtered: Counter[str]) -> EvalItem | None:
    if "reward_model" in row or "prompt" in row:  # upstream / lmms-lab layout
        checked = validate(UpstreamRow, row)  # the declared shape first: a wrong type names its field
        if isinstance(checked, tuple):
            raise RowError(*checked)
        user = next((m.content for m in checked.prompt or [] if m.role == "user"), None)
        if not isinstance(user, str) or not user.replace(IMAGE_IN_PROMPT, "").strip():
            raise RowError("no_question", "no user question in prompt")
        reward = (checked.reward_model or RewardModel()).model_dump()
        answer = _text(reward, "ground_truth")
        aliases = _str_list(reward.get("candidate_answers"), "reward_model.candidate_answers")
        data_id = _text(row, "data_id", required=False)
        urls = checked.image_urls or []
        return EvalItem(
            item_id=data_id or "", benchmark=spec.name, kind="fvqa",
            question=user.replace(IMAGE_IN_PROMPT, "").strip(), image=image_bytes(row.get("images"), base),
            answer=answer or "", aliases=_dedupe([answer or "", *aliases]), data_id=data_id,
            image_url=urls[0] if isinstance(urls, list) and urls and isinstance(urls[0], str) else None,
            meta=_meta(row, search_label=("category",), data_source=("data_source",)),
        )
    # fvqa's native export
    split = spec.split or "test"
    if row.get("split") is not None and row["split"] != split:
        filtered[f"split is not {split}"] += 1
        return None
    sha = _text(row, "image_sha256")
    ext = row.get("image_ext")
    candidates = [base / sha[:2] / f"{sha}.{ext}"] if ext else sorted((base / sha[:2]).glob(f"{sha}.*"))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise RowError("image_missing", f"image {sha} not found under {base} (point image_dir at the workspace's images/)")
    answer = _text(row, "answer")
    return EvalItem(
        item_id=_text(row, "item_id") or "", benchmark=spec.name, kind="fvqa", question=_text(row, "question") or "",
        image=image_bytes(str(path), base), answer=answer or "",
        aliases=_dedupe([answer or "", *_str_list(row.get("aliases"), "aliases")]),
        image_url=row.get("image_url"), data_id=_text(row, "data_id", required=False),
        meta=_meta(row, **{k: (k,) for k in ("knowledge_type", "search_label", "source", "concept_tier")}),
    )


def _id_set(path: Path) -> set[str]:
    if not path.is_file():
        raise ConfigError(f"subset file not found: {path}")
    if path.suffix.lower() == ".txt":
        return {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()}
    ids = set()
    for pos, row in read_rows(path):
        if isinstance(row, RowError):  # a lost id would silently shrink the subset
            raise ConfigError(f"subset file {path}, {pos}: {row}")
        if isinstance(row, dict):
            try:
                value = _text(row, "data_id", "sample_id", "id", required=False)
            except RowError as exc:
                raise ConfigError(f"subset file {path}, {pos}: {exc.detail}") from None
            if value:
                ids.add(value)
    return ids


def _qtypes(spec: BenchmarkSpec) -> dict[str, str]:
    path = spec.qtype or companion(spec.path, QTYPE_SUFFIX)
    if not path.is_file():
        if spec.qtype is not None:
            raise ConfigError(f"InfoSeek qtype file not found: {path}")
        return {}
    out = {}
    for pos, row in read_rows(path):
        if isinstance(row, RowError):
            raise ConfigError(f"InfoSeek qtype file {path}, {pos}: {row}")
        if isinstance(row, dict) and row.get("data_id") is not None and row.get("question_type"):
            out[str(row["data_id"])] = str(row["question_type"])
    return out


REANNOTATED_FIELDS = ("answer", "answer_eval", "question_type")


def _reannotated(path: Path) -> dict[str, dict[str, Any]]:
    """data_id -> re-annotated fields (the InfoSeek Human split's answers), from a jsonl/json file."""
    out: dict[str, dict[str, Any]] = {}
    for pos, row in read_rows(path):
        if isinstance(row, RowError):  # a lost answer would silently turn an item into a reject
            raise ConfigError(f"answers file {path}, {pos}: {row}")
        key = _key(row)
        if key is None:
            raise ConfigError(f"answers file {path}, {pos}: no data_id")
        out[key] = {k: row[k] for k in REANNOTATED_FIELDS if row.get(k) not in (None, "", [])}
    return out


def _infoseek(spec: BenchmarkSpec, row: dict[str, Any], base: Path, qtypes: dict[str, str]) -> EvalItem:
    checked = validate(MainLine, row)  # the official line's declared shape first
    if isinstance(checked, tuple):
        raise RowError(*checked)
    data_id = _text(row, "data_id") or ""
    question = _text(row, "question") or ""
    image_id = _text(row, "image_id") or ""
    answers = _str_list(row.get("answer"), "answer")
    if not answers:
        if "answer" not in row and "answer_eval" not in row:  # the Human split's lines
            raise RowError("no_answer", "no answer in the line (InfoSeek's Human split ships none: "
                                        "give its re-annotated answers with `answers:`)")
        raise RowError("field_missing", "missing or empty answer")
    answer_eval = row.get("answer_eval")
    if answer_eval is None or answer_eval == []:
        answer_eval = answers
    problem = check_answer_eval(answer_eval)
    if problem:
        raise RowError("malformed_answer_eval", problem)
    raw_type = _text(row, "question_type", required=False) or qtypes.get(data_id)
    if not raw_type:
        raise RowError("no_question_type", "give the _qtype file: data_id, question_type")
    try:
        qtype = infoseek_question_type(raw_type).value
    except ValueError as exc:
        raise RowError("unknown_question_type", str(exc)) from exc
    try:
        if qtype == "numerical":
            infoseek_gold_range(answer_eval)
    except ValueError as exc:
        raise RowError("malformed_answer_eval", str(exc)) from exc
    path = find_image(base, "{image_id}.jpg", image_id)
    if path is None:
        raise RowError("image_missing", f"image {image_id} not found in {base}")
    return EvalItem(
        item_id=data_id, benchmark=spec.name, kind="infoseek", question=question, image=image_bytes(str(path), base),
        answer=answers[0], aliases=aliases_of(answers, answer_eval), answer_eval=answer_eval,
        question_type=qtype, data_id=data_id,
        meta=_meta(row, split=("data_split",), entity_id=("entity_id",)),
    )


def _mmsearch(spec: BenchmarkSpec, row: dict[str, Any], base: Path, filtered: Counter[str]) -> EvalItem | None:
    sample_id = _text(row, "sample_id", "id")
    image = row.get("query_image")
    if spec.image_only and (image is None or image == "" or (isinstance(image, dict) and not any(image.values()))):
        filtered["text-only query (image_only)"] += 1
        return None
    answer = _text(row, "gt_answer")
    alts = _str_list(row.get("alternative_gt_answers"), "alternative_gt_answers")
    return EvalItem(
        item_id=sample_id or "", benchmark=spec.name, kind="mmsearch", question=_text(row, "query") or "",
        image=image_bytes(image, base), answer=answer or "", aliases=_dedupe([answer or "", *alts]),
        meta=_meta(row, area=("area",), subfield=("subfield",)),
    )


def _simplevqa(spec: BenchmarkSpec, row: dict[str, Any], base: Path, filtered: Counter[str]) -> EvalItem | None:
    language = (spec.language or "EN").lower()
    row_lang = (_text(row, "language", required=False) or "").lower()
    if language != "all" and row_lang and row_lang != language:
        filtered[f"language is not {language.upper()}"] += 1
        return None
    answer = _text(row, "answer")
    return EvalItem(
        item_id=_text(row, "data_id", "id") or "", benchmark=spec.name, kind="simplevqa",
        question=_text(row, "question") or "", image=image_bytes(row.get("image"), base), answer=answer or "",
        aliases=[answer or ""],
        meta=_meta(row, language=("language",), category=("vqa_category", "original_category")),
    )


LIVEVQA_IMAGE_DIR = "image"
LIVEVQA_DETAILS = "qa_detailed.json"


def _released_image(value: Any, base: Path) -> Any:
    """LiveVQA's qa.json names each image by the authors' absolute path (``/mnt/.../image/X.jpg``):
    when that path is not here, the same name in ``<base>/image/`` or ``<base>/`` is the image."""
    if not isinstance(value, str) or not value.strip() or len(value) >= 1024:
        return value
    path = Path(value.strip())
    if _is_file(path if path.is_absolute() else base / path):
        return value
    for candidate in (base / LIVEVQA_IMAGE_DIR / path.name, base / path.name):
        if _is_file(candidate):
            return str(candidate)
    return value


def _livevqa_details(spec: BenchmarkSpec) -> dict[str, str]:
    """sample_id -> topic from ``qa_detailed.json`` beside the qa.json (descriptive only)."""
    path = spec.path.parent / LIVEVQA_DETAILS
    if spec.path.name == LIVEVQA_DETAILS or not path.is_file():
        return {}
    topics = {}
    for pos, row in read_rows(path):
        if isinstance(row, RowError):
            raise ConfigError(f"LiveVQA details file {path}, {pos}: {row}")
        sid, topic = row.get("sample_id"), row.get("topic")
        if isinstance(sid, str | int) and isinstance(topic, str):
            topics[str(sid)] = topic[:META_MAX_CHARS]
    return topics


def _livevqa(spec: BenchmarkSpec, row: dict[str, Any], base: Path, topics: dict[str, str]) -> EvalItem:
    answers = _str_list(next((row[k] for k in ("gt_answer", "answer", "answers") if k in row), None), "answer")
    if not answers:
        raise RowError("field_missing", "missing or empty gt_answer / answer")
    image = next((row[k] for k in ("query_image", "image", "img_path", "image_path", "images") if row.get(k)), None)
    item_id = _text(row, "sample_id", "id", "data_id", "question_id") or ""
    meta = _meta(row, topic=("topic", "category"), level=("level",))
    if not meta.get("topic") and item_id in topics:
        meta["topic"] = topics[item_id]
    return EvalItem(
        item_id=item_id, benchmark=spec.name, kind="livevqa",
        question=_text(row, "query", "question") or "", image=image_bytes(_released_image(image, base), base),
        answer=answers[0], aliases=_dedupe(answers + _str_list(row.get("aliases"), "aliases")), meta=meta,
    )


def _key(row: dict[str, Any]) -> str | None:
    """The row's id for its reject, if it has one that is text (never raises: the row may be hostile)."""
    for name in ("data_id", "sample_id", "id", "item_id"):
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
    return None


def load_benchmark(spec: BenchmarkSpec, *, limit: int | None = None, seed: int = 0) -> LoadResult:
    """Read, validate and (with `limit`) sample a benchmark file. Bad rows become rejects."""
    base = spec.image_dir or spec.path.parent
    if spec.image_dir is not None and not spec.image_dir.is_dir():
        raise ConfigError(f"benchmark {spec.name}: image_dir not found: {spec.image_dir}")
    keep = _id_set(spec.subset) if spec.subset else None
    qtypes = _qtypes(spec) if spec.kind == "infoseek" else {}
    answers = _reannotated(spec.answers) if spec.answers else {}
    topics = _livevqa_details(spec) if spec.kind == "livevqa" else {}
    items: list[EvalItem] = []
    rejects: list[Reject] = []
    filtered: Counter[str] = Counter()
    seen: set[str] = set()
    n_rows = 0
    for pos, row in read_rows(spec.path):
        n_rows += 1
        if isinstance(row, RowError):
            rejects.append(Reject(pos, str(row), row.detail))
            continue
        try:
            if keep is not None:
                rid = _text(row, "data_id", "sample_id", "id", required=False)
                if rid not in keep:
                    filtered["not in subset"] += 1
                    continue
            if spec.kind == "fvqa":
                item = _fvqa(spec, row, base, filtered)
            elif spec.kind == "infoseek":
                item = _infoseek(spec, {**row, **answers.get(_key(row) or "", {})}, base, qtypes)
            elif spec.kind == "mmsearch":
                item = _mmsearch(spec, row, base, filtered)
            elif spec.kind == "simplevqa":
                item = _simplevqa(spec, row, base, filtered)
            else:
                item = _livevqa(spec, row, base, topics)
        except RowError as exc:
            key = _key(row) or pos
            detail = f"{pos}: {exc.detail}" if exc.detail else pos
            rejects.append(Reject(key, str(exc), detail))
            continue
        if item is None:
            continue
        if not item.item_id:
            item.item_id = f"{spec.name}-{pos.replace(' ', '')}"
        if item.item_id in seen:
            rejects.append(Reject(item.item_id, "duplicate_id", pos))
            continue
        seen.add(item.item_id)
        items.append(item)
    sampled_out = 0
    if limit is not None and len(items) > limit:
        chosen = set(random.Random(seed).sample(range(len(items)), limit))
        sampled_out = len(items) - limit
        items = [it for i, it in enumerate(items) if i in chosen]
    return LoadResult(items, rejects, n_rows, filtered, sampled_out)
