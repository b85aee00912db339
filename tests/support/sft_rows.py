"""SFT rows in the exporter's contract, built from the demo world for tests of `fvqa train sft`.

The contract (``exports/sft/train.parquet``, written by ``fvqa.formats.sft``): ``messages`` is a list
of ``{role, content}`` with string contents (system/user/assistant; ``<image>`` where an image sits,
tool results as user turns rendered by the protocol), ``images`` is a list of ``{"bytes": ...}``
(one per ``<image>``, in order), plus ``item_id``, ``search_pattern``, ``search_label``, ``teacher``
and ``data_source``. Here the trajectories are scripted, not distilled: whole protocol-correct
episodes (answer / image search → answer / text search → answer / image → text → answer) with the
demo policy's stand-in tool turns, over rows `fvqa train prepare` wrote from demo-world items.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

N_ENTITIES = 24
LABELS = ["search_free", "image_search_required", "mixed_search_required", "text_search_required"]
PATTERN_BY_LABEL = {"search_free": "none", "image_search_required": "image",
                    "text_search_required": "text", "mixed_search_required": "mixed"}
SFT_COLUMNS = ("messages", "images", "item_id", "search_pattern", "search_label", "teacher", "data_source")


def prepared_train_parquet(root: Path, world: Path, n_entities: int = N_ENTITIES) -> Path:
    """`train prepare` over a workspace of `n_entities` demo-world items (all train, labels cycled)."""
    from fvqa.store import Workspace
    from fvqa.train.prepare import prepare

    entities = [json.loads(line) for line in (world / "entities.jsonl").read_text().splitlines()[:n_entities]]
    with Workspace(root / "ws") as ws:
        items, labels = [], []
        for i, ent in enumerate(entities):
            image = ws.put_image((world / "web" / "images" / f"{ent['entity_id']}_0.jpg").read_bytes())
            noun = ent["noun"]
            question, answer = [
                (f"What is the name of the {noun} in this picture?", ent["name"]),
                (f"Which country is this {noun} from?", ent["country"]),
                (f"In which year did this {noun} first appear?", str(ent["year"])),
            ][i % 3]
            item_id = f"demo-{ent['entity_id']}"
            items.append(dict(item_id=item_id, source="metaclip", question=question, answer=answer, aliases=[],
                              image_sha256=image.sha256))
            labels.append(dict(item_id=item_id, search_label=LABELS[i % len(LABELS)]))
        ws.insert("items", items)
        ws.insert("splits", [dict(item_id=it["item_id"], split="train") for it in items])
        ws.insert("labels", labels)
        return prepare(ws).files["train"]


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _flatten(message: dict[str, Any], images: list[dict[str, bytes]]) -> dict[str, str]:
    """A chat message with content parts as the contract's string content (`<image>` per image part)."""
    from fvqa.protocol import IMAGE_PLACEHOLDER

    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    text = []
    for part in content:
        if part.get("type") == "image":
            images.append({"bytes": _png(part["image"])})
            text.append(IMAGE_PLACEHOLDER)
        else:
            text.append(part["text"])
    return {"role": message["role"], "content": "".join(text)}


def trajectory(row: Any, pattern: str) -> tuple[list[dict[str, str]], list[dict[str, bytes]]]:
    """One whole protocol-correct episode for `row` with the given search pattern."""
    from PIL import Image

    from fvqa.demo.policy import _query, _user_parts, reasoned, tool_turn
    from fvqa.protocol import (
        ANSWER_CLOSE,
        ANSWER_OPEN,
        IMAGE_SEARCH_TAG,
        TEXT_SEARCH_CLOSE,
        TEXT_SEARCH_OPEN,
        load_prompts,
    )

    prompts = load_prompts()
    img = Image.open(io.BytesIO(row.image)).convert("RGB")
    chat: list[dict[str, Any]] = [{"role": "user", "content": _user_parts(row.content, img)}]
    answer = f"{ANSWER_OPEN}{row.answer}{ANSWER_CLOSE}"
    query = f"{TEXT_SEARCH_OPEN}{_query(row.question)}{TEXT_SEARCH_CLOSE}"
    if pattern in ("image", "mixed"):
        chat += [{"role": "assistant", "content": reasoned("image_search", IMAGE_SEARCH_TAG)},
                 tool_turn("image_search", row, img, prompts, n_hits=2)[0]]
    if pattern in ("text", "mixed"):
        kind = "text_after_image" if pattern == "mixed" else "text_search"
        chat += [{"role": "assistant", "content": reasoned(kind, query)},
                 tool_turn("text_search", row, img, prompts)[0]]
    last = {"none": "answer", "image": "answer_after_image", "text": "answer_after_text",
            "mixed": "answer_after_text"}[pattern]
    chat.append({"role": "assistant", "content": reasoned(last, answer)})
    images: list[dict[str, bytes]] = []
    return [_flatten(m, images) for m in chat], images


def sft_records(train_parquet: Path, n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """`n` contract rows: each prepared row's search label picks its pattern (every pattern appears)."""
    from fvqa.demo.policy import read_rows

    rows = read_rows(train_parquet)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        row = rows[i % len(rows)]
        pattern = PATTERN_BY_LABEL.get(row.search_label) or rng.choice(list(PATTERN_BY_LABEL.values()))
        messages, images = trajectory(row, pattern)
        records.append({"messages": messages, "images": images, "item_id": f"demo-row-{i}",
                        "search_pattern": pattern, "search_label": row.search_label,
                        "teacher": "scripted-demo-teacher", "data_source": "fvqa_demo"})
    return records


def write_sft_parquet(path: Path, train_parquet: Path, n: int = 24, seed: int = 0) -> Path:
    """Write the contract parquet at `path` and return it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sft_records(train_parquet, n, seed)), path)
    return path
