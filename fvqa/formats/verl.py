"""The veRL row, upstream's layout: the one writer of a training / released-dataset row and its rules.

Two files carry this row. ``fvqa export --format upstream`` writes the **released** layout of
``lmms-lab/FVQA`` (``prompt``, ``images``, ``reward_model``, ``data_source``, ``image_urls``,
``data_id``, ``category``); ``fvqa train prepare`` writes the **training** layout veRL's
``RLHFDataset`` and our agent loop read (``prompt``, ``images``, ``reward_model``, ``data_source``,
``ability``, ``extra_info``, ``agent_name``). Both are built by :func:`verl_row`, so the prompt
message, the image entries, ``reward_model`` (ground truth and the candidate answers under
:func:`candidate_answers`), ``data_source`` and ``data_id`` are written one way.

Upstream's released FVQA parquet and fvqa's `train prepare` rows carry the same ``data_source``
(upstream's reward and reporting key on it); the agent loop registers under the name the rows ask
for in ``agent_name``. Nothing here knows about workspaces or configs.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from fvqa.formats.shape import MALFORMED_JSON, WRONG_TYPE, Shape, found

AGENT_NAME = "fvqa_search_agent"
"""The veRL agent loop every prepared row asks for (``agent_name``), registered by fvqa.train.agent_loop."""

DATA_SOURCE = "mmsearch_r1/fvqa_{split}"
"""``data_source`` of an FVQA row: upstream's name, so its tooling recognises the rows."""

ABILITY = "fvqa"
"""``ability`` of a training row (veRL groups metrics by it)."""

REWARD_STYLE = "rule"
"""``reward_model.style``: upstream's rows are scored by a rule (EM/SubEM), not a reward model."""

Layout = Literal["released", "training"]

EXTRA_INFO_TYPE = pa.struct(
    [
        pa.field("index", pa.int64()),
        pa.field("item_id", pa.string()),
        pa.field("data_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("question", pa.string()),
        pa.field("candidate_answers", pa.list_(pa.string())),
        pa.field("knowledge_type", pa.string()),
        pa.field("search_label", pa.string()),
        pa.field("source", pa.string()),
        pa.field("image_sha256", pa.string()),
    ]
)
VERL_SCHEMA = pa.schema(
    [
        pa.field("data_source", pa.string()),
        pa.field(
            "prompt", pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))
        ),
        pa.field("images", pa.list_(pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())]))),
        pa.field("ability", pa.string()),
        pa.field(
            "reward_model",
            pa.struct(
                [
                    pa.field("style", pa.string()),
                    pa.field("ground_truth", pa.string()),
                    pa.field("candidate_answers", pa.string()),
                ]
            ),
        ),
        pa.field("extra_info", EXTRA_INFO_TYPE),
        pa.field("agent_name", pa.string()),
    ]
)
"""Arrow schema of the training layout (the released layout's schema is inferred, as upstream's is)."""


class Message(Shape):
    """One chat message of a row's ``prompt``."""

    role: str | None = Field(None, description="a string")
    content: str | None = Field(None, description="a string")


class ImageEntry(Shape):
    """One ``images`` entry: the encoded image and where it came from."""

    bytes: builtins.bytes | None = Field(None, description="the image's bytes")
    path: str | None = Field(None, description="a string")


class RewardModel(Shape):
    """``reward_model``: the ground truth and the candidates (a JSON-encoded list, or a list)."""

    ground_truth: str | int | float | None = Field(None, description="a string")
    candidate_answers: str | list[str | int | float | None] | None = Field(
        None, description="a JSON list of strings (or a list)")
    style: str | None = Field(None, description="a string")


class UpstreamRow(Shape):
    """The declared shape of a row in upstream's layout (released or mini_data), as read from parquet."""

    prompt: list[Message] | None = Field(None, description="a list of {role, content} messages")
    images: list[ImageEntry | None] | None = Field(None, description="a list of {bytes, path} entries")
    reward_model: RewardModel | None = Field(
        None, description="an object {ground_truth, candidate_answers, style}")
    data_source: str | None = Field(None, description="a string")
    data_id: str | int | None = Field(None, description="a string or integer id")
    image_urls: list[str | None] | None = Field(None, description="a list of strings")
    category: str | None = Field(None, description="a string")


def parse_candidates(raw: str | list[Any] | None) -> list[Any] | tuple[str, str]:
    """``reward_model.candidate_answers`` as a list, or (reason, detail): upstream stores a JSON text."""
    if raw is None or isinstance(raw, list):
        return list(raw or [])
    try:
        value = json.loads(raw or "[]")
    except ValueError as exc:
        return MALFORMED_JSON, f"reward_model.candidate_answers: {str(exc)[:200]}"
    except RecursionError:
        return MALFORMED_JSON, "reward_model.candidate_answers: JSON nested too deeply to read"
    if not isinstance(value, list):
        return WRONG_TYPE, f"reward_model.candidate_answers: expected a JSON list, got {found(value)}"
    return value


def data_source(split: str) -> str:
    """``data_source`` for a split (``train`` / ``test``)."""
    return DATA_SOURCE.format(split=split)


def candidate_answers(values: Iterable[Any] | None) -> list[str]:
    """The candidate-answer rule: every accepted answer once, white space normalised, in given order.

    Each value is stripped and its inner runs of white space collapsed to one space; empty values and
    values that are not text are dropped (integers and floats become their text: InfoSeek and
    upstream files hold numeric answers); exact duplicates (after that normalisation) keep their
    first position. The ground truth is neither added nor removed.

    Why this rule, read against upstream's data and our reward:

    * Upstream's released rows keep the ground truth *inside* ``candidate_answers`` at no fixed
      position (mini_data: ``"Spain"`` is last of five), so dropping it would not match their data;
      and reordering it to the front would change every imported row on export.
    * Upstream's lists keep spellings that differ only in case or punctuation (``"Sakyamuni"`` and
      ``"Sakya-muni"`` in mini_data), so the only duplicates removed are exact ones. Case-folding or
      SQuAD-normalising them away would alter imported rows and buys nothing: the reward compares
      after SQuAD normalisation anyway.
    * The ground truth is not added, because the reward (``fvqa.train.reward``, like upstream's)
      always scores against ``ground_truth`` plus the candidates: a row whose list is empty stays
      empty, so an upstream file round-trips through ``import-upstream`` and ``export`` unchanged.
      Items fvqa builds already list their answer first (``fvqa.textgen.qa.clean_aliases``,
      ``fvqa.formats.infoseek.aliases_of``), as upstream's rows contain theirs.
    """
    out: list[str] = []
    for value in values or ():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            continue
        text = value if isinstance(value, str) else f"{value:g}" if isinstance(value, float) else str(value)
        text = " ".join(text.split())
        if text and text not in out:
            out.append(text)
    return out


def user_prompt(text: str) -> list[dict[str, str]]:
    """The ``prompt`` of a row: one user message (key order as upstream's files)."""
    return [{"content": text, "role": "user"}]


def verl_row(
    *,
    layout: Layout,
    prompt: str | Sequence[Mapping[str, Any]],
    images: Sequence[Mapping[str, Any]],
    ground_truth: str,
    candidates: Sequence[str],
    data_source: str,
    data_id: str | None,
    item_id: str,
    extra_info: Mapping[str, Any] | None = None,
    image_urls: list[str] | None = None,
    category: str | None = None,
) -> dict[str, Any]:
    """One row in upstream's veRL layout.

    Args:
        layout: ``released`` (as ``lmms-lab/FVQA``: ``image_urls``, ``data_id``, ``category`` as
            columns; candidates JSON-encoded with ASCII escapes, as upstream's files) or
            ``training`` (``train prepare``: ``ability``, ``extra_info`` with ``data_id`` and the
            candidates as a list again, ``agent_name``; candidates JSON-encoded as UTF-8).
        prompt: the user text (one user message) or the messages themselves (an imported row's).
        images: ``{bytes, path}`` per image placeholder.
        ground_truth: the answer, written as given.
        candidates: already passed through :func:`candidate_answers`.
        data_source: usually :func:`data_source` of the split (imported rows keep theirs).
        data_id: upstream's id (the key of its image-search cache); None falls back to ``item_id``.
        item_id: the workspace item the row comes from.
        extra_info: training layout only: the item's lineage (``index``, ``split``, ``question``...).
        image_urls, category: released layout only.
    """
    messages = user_prompt(prompt) if isinstance(prompt, str) else [dict(m) for m in prompt]
    cands = list(candidates)
    row: dict[str, Any] = {
        "prompt": messages,
        "images": [{"bytes": im["bytes"], "path": im.get("path")} for im in images],
        "reward_model": {
            "candidate_answers": json.dumps(cands, ensure_ascii=layout == "released"),
            "ground_truth": ground_truth,
            "style": REWARD_STYLE,
        },
        "data_source": data_source,
    }
    the_id = str(data_id) if data_id else item_id
    if layout == "released":
        row.update(image_urls=image_urls, data_id=the_id, category=category)
    elif layout == "training":
        info = {"item_id": item_id, **(extra_info or {}), "data_id": the_id, "candidate_answers": cands}
        row.update(ability=ABILITY, extra_info=info, agent_name=AGENT_NAME)
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'released' or 'training'")
    return row
