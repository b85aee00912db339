"""The five eval benchmarks as small files in their official layouts, written from a demo world.

DEMO STAND-IN data: the questions are about the world's fictional entities ("Who created this
lantern?"), not the real benchmarks' questions; only the file layouts are the official ones, so the
loaders, workflows, judge and report run exactly as on the real files. Every `hint_every`-th question
carries its answer as a hint ("(hint: MAKER)"), so a scripted or tiny model can answer some without
search: that makes direct accuracy and the on-demand search ratio predictable in tests.

Layouts (the loader that reads each names the official file in `fvqa.eval.benchmarks`):
FVQA-test as upstream's veRL parquet (``fvqa_test.parquet``; the demo build's own test split when
`fvqa_test` is given), InfoSeek's val jsonl + ``_qtype`` companion + image folder, MMSearch's
end-to-end json, SimpleVQA's json with base64 images, LiveVQA Research-Preview's ``qa.json`` +
``qa_detailed.json`` + ``image/``. `bad_rows` adds malformed rows, the hostile inputs that must
become rejects.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

LIVEVQA_RELEASED_ROOT = "/mnt/livevqa/bench/image"
"""The released qa.json names images by the authors' absolute paths; the loader finds them in image/."""


def entities(world: Path) -> list[dict[str, Any]]:
    """The demo world's entities, in file order."""
    return [json.loads(line) for line in (world / "entities.jsonl").read_text().splitlines() if line.strip()]


def image_of(world: Path, e: dict[str, Any]) -> bytes:
    return (world / "web" / "images" / f"{e['entity_id']}_0.jpg").read_bytes()


def question(e: dict[str, Any], hint: bool) -> str:
    q = f"Who created this {e['noun']}?"
    return f"{q} (hint: {e['maker']})" if hint else q


def write_demo_benchmarks(world: Path, root: Path, *, n: int = 3, hint_every: int = 2, bad_rows: bool = False,
                          fvqa_test: Path | None = None) -> dict[str, dict[str, Any]]:
    """Write one benchmark per official layout (n items each) under `root`; returns the benchmark
    specs (kind -> dict, as an eval config's `benchmarks:` entries)."""
    root.mkdir(parents=True, exist_ok=True)
    ents = entities(world)[:n]
    hints = [i % hint_every == 0 for i in range(len(ents))]
    pairs = list(zip(ents, hints, strict=True))
    return {
        "fvqa": _fvqa(world, root, pairs, bad_rows, fvqa_test, n),
        "infoseek": _infoseek(world, root, pairs, bad_rows),
        "mmsearch": _mmsearch(world, root, pairs, bad_rows),
        "simplevqa": _simplevqa(world, root, pairs, bad_rows),
        "livevqa": _livevqa(world, root, pairs, bad_rows),
    }


Pairs = list[tuple[dict[str, Any], bool]]


def _fvqa(world: Path, root: Path, pairs: Pairs, bad_rows: bool, fvqa_test: Path | None, n: int) -> dict[str, Any]:
    """Upstream's / lmms-lab's FVQA test parquet layout."""
    path = root / "fvqa_test.parquet"
    if fvqa_test is not None:  # the build's own test split, exported in upstream's layout
        table = pq.read_table(fvqa_test)
        pq.write_table(table.slice(0, n), path)
        return {"name": "fvqa_test", "kind": "fvqa", "path": str(path)}
    rows = [{
        "prompt": [{"role": "user", "content": "<image>" + question(e, h)}],
        "images": [{"bytes": image_of(world, e), "path": None}],
        "reward_model": {"ground_truth": e["maker"], "candidate_answers": json.dumps([e["maker"]]), "style": "rule"},
        "data_source": "fvqa_test", "image_urls": [f"http://demo.fvqa.local/{e['entity_id']}.jpg"],
        "data_id": f"fvqa_{i}", "category": "search_free" if h else "search_required",
    } for i, (e, h) in enumerate(pairs)]
    if bad_rows:
        rows.append({**rows[0], "data_id": "fvqa_noanswer",
                     "reward_model": {"ground_truth": "", "candidate_answers": "[]", "style": "rule"}})
        rows.append({**rows[0], "data_id": "fvqa_badimage", "images": [{"bytes": b"not an image", "path": None}]})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return {"name": "fvqa_test", "kind": "fvqa", "path": str(path)}


def _infoseek(world: Path, root: Path, pairs: Pairs, bad_rows: bool) -> dict[str, Any]:
    """InfoSeek's ``infoseek_val.jsonl`` + ``infoseek_val_qtype.jsonl`` + ``<image_id>.jpg`` folder."""
    img_dir = root / "infoseek_images"
    img_dir.mkdir(exist_ok=True)
    lines, qtypes = [], []
    for i, (e, h) in enumerate(pairs):
        (img_dir / f"oven_{e['entity_id']}.jpg").write_bytes(image_of(world, e))
        split = "val_unseen_question" if i % 2 == 0 else "val_unseen_entity"
        lines.append(json.dumps({"data_id": f"infoseek_val_{i:05d}", "image_id": f"oven_{e['entity_id']}",
                                 "question": question(e, h), "answer": [e["maker"]],
                                 "answer_eval": [e["maker"]], "data_split": split}))
        qtypes.append(json.dumps({"data_id": f"infoseek_val_{i:05d}", "question_type": "String"}))
    if bad_rows:
        first = pairs[0][0]["entity_id"]
        lines.append('{"data_id": "infoseek_val_broken", "question": ')
        lines.append(json.dumps({"data_id": "infoseek_val_noimg", "image_id": "oven_missing", "question": "Q?",
                                 "answer": ["x"], "answer_eval": ["x"], "data_split": "val_unseen_entity"}))
        qtypes.append(json.dumps({"data_id": "infoseek_val_noimg", "question_type": "String"}))
        lines.append(json.dumps({"data_id": "infoseek_val_badrange", "image_id": f"oven_{first}",
                                 "question": "How tall?", "answer": ["5"],
                                 "answer_eval": [{"wikidata": 5, "range": [6, 4]}], "data_split": "val_unseen_entity"}))
        qtypes.append(json.dumps({"data_id": "infoseek_val_badrange", "question_type": "Numerical"}))
        lines.append(json.dumps({"data_id": "infoseek_val_notype", "image_id": f"oven_{first}",
                                 "question": "Q?", "answer": ["x"], "answer_eval": ["x"], "data_split": "val"}))
    (root / "infoseek_val.jsonl").write_text("\n".join(lines) + "\n")
    (root / "infoseek_val_qtype.jsonl").write_text("\n".join(qtypes) + "\n")
    return {"name": "infoseek", "kind": "infoseek", "path": str(root / "infoseek_val.jsonl"), "image_dir": str(img_dir)}


def _mmsearch(world: Path, root: Path, pairs: Pairs, bad_rows: bool) -> dict[str, Any]:
    """MMSearch's end-to-end records (json list; query_image a path; one text-only query, filtered)."""
    mm_dir = root / "mmsearch_images"
    mm_dir.mkdir(exist_ok=True)
    recs: list[dict[str, Any]] = []
    for i, (e, h) in enumerate(pairs):
        (mm_dir / f"{i}.jpg").write_bytes(image_of(world, e))
        recs.append({"sample_id": f"mm{i}", "query": question(e, h), "query_image": f"mmsearch_images/{i}.jpg",
                     "gt_answer": e["maker"], "alternative_gt_answers": [], "area": "news", "subfield": "art"})
    recs.append({"sample_id": "mm_text", "query": "Who won?", "query_image": None, "gt_answer": "x",
                 "alternative_gt_answers": [], "area": "sports", "subfield": "f1"})
    if bad_rows:
        recs.append({"sample_id": "mm_missing", "query": "Q?", "query_image": "mmsearch_images/none.jpg",
                     "gt_answer": "x", "alternative_gt_answers": [], "area": "a", "subfield": "b"})
    (root / "mmsearch_end2end.json").write_text(json.dumps(recs))
    return {"name": "mmsearch", "kind": "mmsearch", "path": str(root / "mmsearch_end2end.json")}


def _simplevqa(world: Path, root: Path, pairs: Pairs, bad_rows: bool) -> dict[str, Any]:
    """SimpleVQA's json (base64 images; one Chinese row, filtered as the paper's English subset)."""
    recs = [{"data_id": 100 + i, "image": base64.b64encode(image_of(world, e)).decode(), "question": question(e, h),
             "answer": e["maker"], "language": "EN", "vqa_category": "art"} for i, (e, h) in enumerate(pairs)]
    recs.append({**recs[0], "data_id": 999, "language": "CN"})
    if bad_rows:
        recs.append({**recs[0], "data_id": 998, "image": "A" * 300 + "!!"})
    (root / "simplevqa.json").write_text(json.dumps(recs))
    return {"name": "simplevqa", "kind": "simplevqa", "path": str(root / "simplevqa.json")}


def _livevqa(world: Path, root: Path, pairs: Pairs, bad_rows: bool) -> dict[str, Any]:
    """LiveVQA Research-Preview: ``qa.json`` (sample_id, query, query_image, gt_answer), the images in
    ``image/`` beside it, topics in ``qa_detailed.json``."""
    lv = root / "livevqa"
    (lv / "image").mkdir(parents=True, exist_ok=True)
    recs, details = [], []
    for i, (e, h) in enumerate(pairs):
        name = f"{e['entity_id']}_{i}.jpg"
        (lv / "image" / name).write_bytes(image_of(world, e))
        sample_id = f"Culture_{i}_1"
        recs.append({"sample_id": sample_id, "query": question(e, h), "query_image": f"{LIVEVQA_RELEASED_ROOT}/{name}",
                     "gt_answer": e["maker"]})
        details.append({"sample_id": sample_id, "topic": f"The {e['noun']} of {e['maker']}", "context": ""})
    if bad_rows:
        recs.append({**recs[0], "sample_id": "Culture_noq", "query": ""})
    (lv / "qa.json").write_text(json.dumps(recs, indent=1))
    (lv / "qa_detailed.json").write_text(json.dumps(details, indent=1))
    return {"name": "livevqa", "kind": "livevqa", "path": str(lv / "qa.json")}
