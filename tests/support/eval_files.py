"""Small benchmark files in the five official formats, written from a demo world (for eval tests).

Questions ask who created an entity. Every `hint_every`-th question carries the answer as a hint
("(hint: MAKER)"), so a scripted model can answer it without search: that makes direct accuracy and
the on-demand search ratio predictable.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def entities(world: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (world / "entities.jsonl").read_text().splitlines() if line.strip()]


def image_of(world: Path, e: dict[str, Any]) -> bytes:
    return (world / "web" / "images" / f"{e['entity_id']}_0.jpg").read_bytes()


def question(e: dict[str, Any], hint: bool) -> str:
    q = f"Who created this {e['noun']}?"
    return f"{q} (hint: {e['maker']})" if hint else q


def write_benchmarks(world: Path, root: Path, *, n: int = 3, hint_every: int = 2,
                     bad_rows: bool = False) -> dict[str, dict[str, Any]]:
    """Write one file per benchmark (n items each); returns benchmark specs (name -> dict)."""
    root.mkdir(parents=True, exist_ok=True)
    ents = entities(world)[:n]
    hints = [i % hint_every == 0 for i in range(len(ents))]
    specs: dict[str, dict[str, Any]] = {}

    # FVQA-test, upstream / lmms-lab layout
    rows = [{
        "prompt": [{"role": "user", "content": "<image>" + question(e, h)}],
        "images": [{"bytes": image_of(world, e), "path": None}],
        "reward_model": {"ground_truth": e["maker"], "candidate_answers": json.dumps([e["maker"]]), "style": "rule"},
        "data_source": "fvqa_test", "image_urls": [f"http://demo.fvqa.local/{e['entity_id']}.jpg"],
        "data_id": f"fvqa_{i}", "category": "search_free" if h else "search_required",
    } for i, (e, h) in enumerate(zip(ents, hints, strict=True))]
    if bad_rows:
        rows.append({**rows[0], "data_id": "fvqa_noanswer",
                     "reward_model": {"ground_truth": "", "candidate_answers": "[]", "style": "rule"}})
        rows.append({**rows[0], "data_id": "fvqa_badimage", "images": [{"bytes": b"not an image", "path": None}]})
    pq.write_table(pa.Table.from_pylist(rows), root / "fvqa_test.parquet")
    specs["fvqa"] = {"name": "fvqa_test", "kind": "fvqa", "path": str(root / "fvqa_test.parquet")}

    # InfoSeek val jsonl + qtype + image folder
    img_dir = root / "infoseek_images"
    img_dir.mkdir(exist_ok=True)
    lines, qtypes = [], []
    for i, (e, h) in enumerate(zip(ents, hints, strict=True)):
        (img_dir / f"oven_{e['entity_id']}.jpg").write_bytes(image_of(world, e))
        split = "val_unseen_question" if i % 2 == 0 else "val_unseen_entity"
        lines.append(json.dumps({"data_id": f"infoseek_val_{i:05d}", "image_id": f"oven_{e['entity_id']}",
                                 "question": question(e, h), "answer": [e["maker"]],
                                 "answer_eval": [e["maker"]], "data_split": split}))
        qtypes.append(json.dumps({"data_id": f"infoseek_val_{i:05d}", "question_type": "String"}))
    if bad_rows:
        lines.append('{"data_id": "infoseek_val_broken", "question": ')
        lines.append(json.dumps({"data_id": "infoseek_val_noimg", "image_id": "oven_missing", "question": "Q?",
                                 "answer": ["x"], "answer_eval": ["x"], "data_split": "val_unseen_entity"}))
        qtypes.append(json.dumps({"data_id": "infoseek_val_noimg", "question_type": "String"}))
        lines.append(json.dumps({"data_id": "infoseek_val_badrange", "image_id": f"oven_{ents[0]['entity_id']}",
                                 "question": "How tall?", "answer": ["5"],
                                 "answer_eval": [{"wikidata": 5, "range": [6, 4]}], "data_split": "val_unseen_entity"}))
        qtypes.append(json.dumps({"data_id": "infoseek_val_badrange", "question_type": "Numerical"}))
        lines.append(json.dumps({"data_id": "infoseek_val_notype", "image_id": f"oven_{ents[0]['entity_id']}",
                                 "question": "Q?", "answer": ["x"], "answer_eval": ["x"], "data_split": "val"}))
    (root / "infoseek_val.jsonl").write_text("\n".join(lines) + "\n")
    (root / "infoseek_val_qtype.jsonl").write_text("\n".join(qtypes) + "\n")
    specs["infoseek"] = {"name": "infoseek", "kind": "infoseek", "path": str(root / "infoseek_val.jsonl"),
                         "image_dir": str(img_dir)}

    # MMSearch end2end (json list; query_image as a file path; one text-only query filtered)
    mm_dir = root / "mmsearch_images"
    mm_dir.mkdir(exist_ok=True)
    recs: list[dict[str, Any]] = []
    for i, (e, h) in enumerate(zip(ents, hints, strict=True)):
        (mm_dir / f"{i}.jpg").write_bytes(image_of(world, e))
        recs.append({"sample_id": f"mm{i}", "query": question(e, h), "query_image": f"mmsearch_images/{i}.jpg",
                     "gt_answer": e["maker"], "alternative_gt_answers": [], "area": "news", "subfield": "art"})
    recs.append({"sample_id": "mm_text", "query": "Who won?", "query_image": None, "gt_answer": "x",
                 "alternative_gt_answers": [], "area": "sports", "subfield": "f1"})
    if bad_rows:
        recs.append({"sample_id": "mm_missing", "query": "Q?", "query_image": "mmsearch_images/none.jpg",
                     "gt_answer": "x", "alternative_gt_answers": [], "area": "a", "subfield": "b"})
    (root / "mmsearch_end2end.json").write_text(json.dumps(recs))
    specs["mmsearch"] = {"name": "mmsearch", "kind": "mmsearch", "path": str(root / "mmsearch_end2end.json")}

    # SimpleVQA (json, base64 images; one Chinese row filtered)
    recs = [{"data_id": 100 + i, "image": base64.b64encode(image_of(world, e)).decode(), "question": question(e, h),
             "answer": e["maker"], "language": "EN", "vqa_category": "art"}
            for i, (e, h) in enumerate(zip(ents, hints, strict=True))]
    recs.append({**recs[0], "data_id": 999, "language": "CN"})
    if bad_rows:
        recs.append({**recs[0], "data_id": 998, "image": "A" * 300 + "!!"})
    (root / "simplevqa.json").write_text(json.dumps(recs))
    specs["simplevqa"] = {"name": "simplevqa", "kind": "simplevqa", "path": str(root / "simplevqa.json")}

    # LiveVQA (jsonl with image paths)
    lv_dir = root / "livevqa_images"
    lv_dir.mkdir(exist_ok=True)
    lines = []
    for i, (e, h) in enumerate(zip(ents, hints, strict=True)):
        (lv_dir / f"{i}.jpg").write_bytes(image_of(world, e))
        lines.append(json.dumps({"id": f"lv{i}", "image": f"livevqa_images/{i}.jpg", "question": question(e, h),
                                 "answer": [e["maker"]], "topic": "culture"}))
    if bad_rows:
        lines.append(json.dumps({"id": "lv_noq", "image": "livevqa_images/0.jpg", "question": "", "answer": ["x"]}))
    (root / "livevqa.jsonl").write_text("\n".join(lines) + "\n")
    specs["livevqa"] = {"name": "livevqa", "kind": "livevqa", "path": str(root / "livevqa.jsonl")}
    return specs
