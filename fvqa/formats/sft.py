"""The SFT export: distilled search trajectories in veRL's multi-turn SFT format.

CONTRACT (read by `fvqa train sft`; change both sides together):

* Files: ``<workspace>/exports/sft/train.parquet`` and, when ``export.sft_val_fraction > 0``,
  ``<workspace>/exports/sft/val.parquet``; ``exports/sft/manifest.json`` lists them with row
  counts. Written by the build's export stage (format ``sft``) from the `distill` stage's kept
  trajectories, atomically (a staging folder renamed into place).
* One row per kept trajectory, loadable as is by
  ``verl.utils.dataset.multiturn_sft_dataset.MultiTurnSFTDataset`` (``messages_key=messages``,
  ``image_key=images``, with a processor):

  - ``messages``: list of ``{role: str, content: str}``; roles ``user`` / ``assistant``, alternating,
    user first, assistant last. No system message: the chat template adds its default one, exactly
    as it does for the GRPO agent loop's prompt. User contents carry one ``<image>`` placeholder per
    image: the opening turn the user image (the opening prompt + question, as training renders
    it), each tool-result turn one per thumbnail shown (upstream's ``Searched results:
    <information>...`` text, as the protocol renders it for the policy). Assistant contents are the
    teacher's turns verbatim (``<reason>...</reason>`` then a search call or ``<answer>``).
  - ``images``: list of ``{bytes: binary, path: str}``, one per ``<image>`` in message order (the
    user image bounded like ``fvqa train prepare``'s rows; thumbnails as the search showed them).
  - metadata: ``item_id``, ``attempt`` (int), ``search_pattern`` (none/image/text/mixed),
    ``search_label`` (the item's 4-way label), ``teacher`` (e.g. ``openai:gpt-4o``, or
    ``scripted-teacher:demo-world`` for the demo stand-in), ``data_source``, ``split`` (train/val).

* Loss: veRL's dataset puts loss on assistant messages only; user turns, and so every tool-result
  token, and the template's system turn get loss mask 0.

This module is a shared leaf (it imports nothing else of fvqa): it knows the row shape, not the
protocol; `fvqa.pipelines.distill_sft` renders trajectories into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

SFT_DIR = "sft"
TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"
MANIFEST_FILE = "manifest.json"
MESSAGES_KEY = "messages"
IMAGES_KEY = "images"
IMAGE_TOKEN = "<image>"
"""veRL's multi-turn SFT dataset splits user contents at this token (and at ``<video>``)."""
RESERVED_TOKENS = ("<image>", "<video>")
METADATA_COLUMNS = ("item_id", "attempt", "search_pattern", "search_label", "teacher", "data_source", "split")

SFT_SCHEMA = pa.schema([
    pa.field(MESSAGES_KEY, pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))),
    pa.field(IMAGES_KEY, pa.list_(pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))),
    pa.field("item_id", pa.string()),
    pa.field("attempt", pa.int32()),
    pa.field("search_pattern", pa.string()),
    pa.field("search_label", pa.string()),
    pa.field("teacher", pa.string()),
    pa.field("data_source", pa.string()),
    pa.field("split", pa.string()),
])


def flatten_messages(transcript: Sequence[dict[str, Any]]) -> tuple[list[dict[str, str]], list[str]]:
    """A stored transcript (content parts, images as ``{"type": "image", "sha256": ...}``) as SFT
    messages with ``<image>`` placeholders, and the image hashes in placeholder order.

    ValueError when a text already holds a reserved token (veRL would split it as an image)."""
    messages: list[dict[str, str]] = []
    shas: list[str] = []
    for msg in transcript:
        content = msg["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = ""
        for part in parts:
            if part.get("type") == "image":
                shas.append(str(part["sha256"]))
                text += IMAGE_TOKEN
                continue
            piece = str(part.get("text", ""))
            bad = [t for t in RESERVED_TOKENS if t in piece]
            if bad:
                raise ValueError(f"a {msg['role']} text contains {bad[0]}, which the SFT dataset reads as a placeholder")
            text += piece
        messages.append({"role": str(msg["role"]), "content": text})
    return messages, shas


def sft_row(messages: list[dict[str, str]], images: list[dict[str, Any]], **metadata: Any) -> dict[str, Any]:
    """One row; ValueError if the placeholders and images do not pair up or a column is missing."""
    n = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n != len(images):
        raise ValueError(f"{n} {IMAGE_TOKEN} placeholder(s) but {len(images)} image(s)")
    if not messages or messages[0]["role"] != "user" or messages[-1]["role"] != "assistant":
        raise ValueError("a trajectory must start with a user turn and end with an assistant turn")
    missing = [c for c in METADATA_COLUMNS if c not in metadata]
    if missing:
        raise ValueError(f"missing metadata column(s): {', '.join(missing)}")
    return {MESSAGES_KEY: messages, IMAGES_KEY: images, **{c: metadata[c] for c in METADATA_COLUMNS}}


__all__ = ["IMAGES_KEY", "IMAGE_TOKEN", "MANIFEST_FILE", "MESSAGES_KEY", "METADATA_COLUMNS", "SFT_DIR", "SFT_SCHEMA",
           "TRAIN_FILE", "VAL_FILE", "flatten_messages", "sft_row"]
