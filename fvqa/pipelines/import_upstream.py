"""Load a parquet in upstream's veRL layout (`lmms-lab/FVQA`, MMSearch-R1's mini_data) into a workspace.

Each row is first checked against the layout's declared shape (`fvqa.formats.verl.UpstreamRow`): a
wrong-typed field is a `wrong type` reject naming it (``reward_model.ground_truth: expected a string,
got array``), an unparsable ``candidate_answers`` text a `malformed JSON` one. Users can start from the
released dataset: its rows become `items` (source `import`), their images go
into the content-addressed store (each through the image gate, `fvqa.vision.gate`; a row with an image
it refuses is rejected with the gate's reason; the `images` rows commit in the one transaction that
writes the items), and the 2-way `category` is kept in provenance (the released data
lost the 4-way label, so no `labels` row is invented for it). `data_id` goes into the column
`items.data_id`; the candidate answers become the item's aliases under the one candidate rule
(`fvqa.formats.verl.candidate_answers`: an empty list stays empty); the original prompt, data_source
and image_urls are kept in provenance, so `fvqa export --format upstream` reproduces the file.

The split: `--split`, else `train` / `test` when the file name says so, else `unassigned`; the
result says which and why. An explicit split also moves rows already present to it (a re-run with
`--split train` after a first import that defaulted to `unassigned`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from fvqa.errors import FvqaError
from fvqa.formats.shape import validate
from fvqa.formats.verl import Message, RewardModel, UpstreamRow, candidate_answers, parse_candidates
from fvqa.store import Workspace, now
from fvqa.vision.gate import ImageReject, check_image

REQUIRED_COLUMNS = ("prompt", "images", "reward_model", "data_source")
STAGE = "import"
SPLITS = ("train", "test")  # what --split accepts; a file naming neither imports as `unassigned`


def _user_text(prompt: list[Message] | None) -> str | None:
    for msg in prompt or []:
        if msg.role == "user":
            return msg.content
    return None


def _as_text(value: str | int | float) -> str:
    return value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)


def _split_from_name(path: Path) -> str:
    name = path.name.lower()
    for split in SPLITS:
        if split in name:
            return split
    return "unassigned"


def choose_split(path: Path, split: str | None) -> tuple[str, str]:
    """(split, where it came from: `--split`, `file name` or `default`); an unknown split is an error."""
    if split is not None:
        if split not in SPLITS:
            raise FvqaError(f"--split {split!r}: choose {' or '.join(SPLITS)}")
        return split, "--split"
    named = _split_from_name(Path(path))
    return named, "file name" if named != "unassigned" else "default"


def read_upstream(path: Path) -> pa.Table:
    """The parquet at `path`, checked to be in upstream's layout (one-line `FvqaError` if not)."""
    path = Path(path)
    if not path.is_file():
        raise FvqaError(f"file not found: {path}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for non-parquet input
        raise FvqaError(f"{path}: not a readable parquet file ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FvqaError(f"{path}: missing column(s) {', '.join(missing)} required by the upstream layout")
    return table


def import_upstream(ws: Workspace, path: Path, split: str | None = None, *,
                    table: pa.Table | None = None) -> dict[str, int]:
    """Import rows; bad rows become `rejects`. Returns counts: imported, skipped (already present),
    moved (already present and moved to the explicit `split`; `choose_split` says which), rejected.

    `table`: the file as `read_upstream` already read it (the CLI checks the file before opening
    the workspace)."""
    path = Path(path)
    if table is None:
        table = read_upstream(path)
    split, split_from = choose_split(path, split)
    existing = ws.keys("items", "item_id")
    current = dict(ws.execute("SELECT item_id, split FROM splits WHERE item_id LIKE 'import-%'"))
    counts = {"imported": 0, "skipped": 0, "moved": 0, "rejected": 0}
    moves: list[dict[str, Any]] = []
    items, splits, images, rejects = [], [], [], []
    for index, row in enumerate(table.to_pylist()):
        checked = validate(UpstreamRow, row)  # the declared shape first: a wrong type names its field
        if isinstance(checked, tuple):
            rid = row.get("data_id")
            key = str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else f"{path.name}#{index}"
            rejects.append((STAGE, key, *checked))
            continue
        data_id = checked.data_id
        reward = checked.reward_model or RewardModel()
        question = _user_text(checked.prompt)
        ground_truth = None if reward.ground_truth is None else _as_text(reward.ground_truth)
        key = str(data_id) if data_id is not None else f"{path.name}#{index}"
        item_id = "import-" + (str(data_id) if data_id is not None else hashlib.sha256(
            f"{row.get('data_source')}|{question}|{reward.ground_truth}".encode()).hexdigest()[:16])
        if item_id in existing:
            counts["skipped"] += 1
            if split_from == "--split" and current.get(item_id) != split and item_id.startswith("import-"):
                moves.append(dict(item_id=item_id, split=split, provenance=json.dumps(
                    {"stage": STAGE, "moved_from": current.get(item_id), "by": "--split"})))
                current[item_id] = split
            continue
        if not question:
            rejects.append((STAGE, key, "no_question", "no user message in prompt"))
            continue
        if not ground_truth:
            rejects.append((STAGE, key, "answer_missing", "reward_model.ground_truth is empty"))
            continue
        candidates = parse_candidates(reward.candidate_answers)
        if isinstance(candidates, tuple):
            rejects.append((STAGE, key, *candidates))
            continue
        shas, paths, row_images = [], [], []
        try:
            for n, img in enumerate(checked.images or []):
                if img is None or not img.bytes:
                    raise ImageReject("image_missing", f"image {n}: entry without bytes")
                gated = check_image(img.bytes)
                # the file now (content-addressed: harmless if this import dies); its row with the item's
                ref, image_row = ws.store_image(img.bytes, provenance={"stage": STAGE, "file": path.name},
                                                checked=gated)
                shas.append(ref.sha256)
                paths.append(img.path)
                row_images.append(image_row)
        except ImageReject as exc:
            rejects.append((STAGE, key, exc.reason, exc.detail))
            continue
        provenance = {
            "import": {
                "file": path.name, "time": now().isoformat(), "prompt": row["prompt"],
                "data_source": row.get("data_source"),
                "image_urls": row.get("image_urls"), "category": row.get("category"),
                "image_sha256s": shas, "image_paths": paths,
            }
        }
        items.append(dict(
            item_id=item_id, source="import", data_id=str(data_id) if data_id is not None else None,
            question=question, answer=ground_truth, aliases=candidate_answers(candidates),
            image_sha256=shas[0] if shas else None,
            provenance=json.dumps(provenance, ensure_ascii=False, default=str),
        ))
        splits.append(dict(item_id=item_id, split=split, provenance=json.dumps({"stage": STAGE})))
        images.extend(row_images)
        existing.add(item_id)
    with ws.transaction():  # image rows, items, splits, moves and rejects: all or nothing
        ws.insert("images", images)
        ws.insert("items", items)
        ws.insert("splits", splits)
        ws.insert("splits", moves, replace=True)
        ws.add_rejects(rejects)
    counts["imported"] = len(items)
    counts["moved"] = len(moves)
    counts["rejected"] = len(rejects)
    return counts
