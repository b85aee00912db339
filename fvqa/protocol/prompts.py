"""The prompt texts of the three workflows, and loading them from fvqa's defaults or upstream's files.

Upstream ships its prompts as pickles; they are read with the one restricted unpickler, so a prompt
file can only ever hold a plain string.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fvqa.errors import ConfigError
from fvqa.protocol.unpickle import UnsafePickleError, safe_loads
from fvqa.protocol.wire import IMAGE_PLACEHOLDER

PromptName = Literal[
    "round_1", "after_image_search", "after_text_search", "direct_answer", "rag_query", "rag_answer"
]
_OPENING_PROMPTS = ("round_1", "direct_answer", "rag_query")
UPSTREAM_PROMPT_FILES = {
    "round_1_user_prompt_qwenvl.pkl": "round_1",
    "after_image_search_prompt_qwenvl.pkl": "after_image_search",
    "after_text_search_prompt_qwenvl.pkl": "after_text_search",
}


class PromptFileError(ConfigError):
    """A prompt file is missing, malformed, or (for pickles) holds anything but a plain string."""


class Prompts(BaseModel):
    """The six prompt texts of the three workflows (on-demand search, direct answer, fixed RAG).

    Opening prompts (``round_1``, ``direct_answer``, ``rag_query``) contain exactly one ``<image>``
    placeholder and are followed directly by the question. ``source`` says where each text came
    from, so a run records whether it used upstream's exact prompts or ours.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    round_1: str
    after_image_search: str
    after_text_search: str
    direct_answer: str
    rag_query: str
    rag_answer: str
    source: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_placeholders(self) -> Prompts:
        for name in _OPENING_PROMPTS:
            n = getattr(self, name).count(IMAGE_PLACEHOLDER)
            if n != 1:
                raise ValueError(
                    f"prompt {name!r} must contain exactly one {IMAGE_PLACEHOLDER} placeholder (found {n}); "
                    "it marks where the user's image goes"
                )
        return self


def load_pickled_str(path: str | Path) -> str:
    """Load a pickle that must hold one ``str`` (upstream's prompt files) without executing anything.

    Read with the one restricted unpickler (`fvqa.protocol.unpickle`), which refuses every global
    outside its plain-data allow-list before it can be called.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt pickle {path}: {exc}") from exc
    try:
        obj = safe_loads(data)
    except UnsafePickleError as exc:
        raise PromptFileError(f"prompt pickle {path} rejected: {exc}") from exc
    if not isinstance(obj, str):
        raise PromptFileError(
            f"prompt pickle {path} holds a {type(obj).__name__}, only a plain str is allowed"
        )
    return obj


def _read_prompt_file(path: Path) -> str:
    if path.suffix == ".pkl":
        return load_pickled_str(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {path}: {exc}") from exc


def _parse_sectioned_text(text: str, path: Path) -> dict[str, str]:
    """Plain-text prompt file: ``=== name ===`` header lines, each followed by that prompt's text.

    The newline that ends a section's last line belongs to the file layout and is dropped; any other
    white space is kept exactly.
    """
    header = re.compile(r"^=== *([a-z0-9_]+) *===[ \t]*$", re.MULTILINE)
    matches = list(header.finditer(text))
    if not matches:
        raise PromptFileError(f"{path}: no '=== name ===' section headers found")
    if text[: matches[0].start()].strip():
        raise PromptFileError(f"{path}: text before the first '=== name ===' header")
    out: dict[str, str] = {}
    for m, nxt in itertools.zip_longest(matches, matches[1:]):
        body = text[m.end() + 1 : nxt.start() if nxt else len(text)]
        out[m.group(1)] = body[:-1] if body.endswith("\n") else body
    return out


def _mapping_from_yaml(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(_read_prompt_file(path))
    except yaml.YAMLError as exc:
        raise PromptFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected a mapping of prompt name -> text")
    out: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, dict) and set(value) == {"file"}:
            value = _read_prompt_file((path.parent / str(value["file"])).resolve())
        if not isinstance(value, str):
            raise PromptFileError(f"{path}: prompt {name!r} must be a string or {{file: PATH}}")
        out[str(name)] = value
    return out


def _mapping_from_path(path: Path) -> dict[str, str]:
    if path.is_dir():
        out: dict[str, str] = {}
        for fname, name in UPSTREAM_PROMPT_FILES.items():
            if (path / fname).is_file():
                out[name] = load_pickled_str(path / fname)
        for cand in ("prompts.yaml", "prompts.yml"):
            if (path / cand).is_file():
                out.update(_mapping_from_yaml(path / cand))
        if not out:
            raise PromptFileError(
                f"{path}: no prompt files found (expected upstream's {sorted(UPSTREAM_PROMPT_FILES)} "
                "or prompts.yaml)"
            )
        return out
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        return _mapping_from_yaml(path)
    if path.suffix == ".txt":
        return _parse_sectioned_text(_read_prompt_file(path), path)
    if path.suffix == ".pkl":
        name = UPSTREAM_PROMPT_FILES.get(path.name)
        if name is None:
            raise PromptFileError(
                f"{path}: cannot tell which prompt a pickle holds from its name; use upstream's file "
                f"names {sorted(UPSTREAM_PROMPT_FILES)} or a YAML file with {{file: PATH}} entries"
            )
        return {name: load_pickled_str(path)}
    raise PromptFileError(f"{path}: unsupported prompt file type (use .yaml, .txt, .pkl or a folder)")


def default_prompts() -> Prompts:
    """fvqa's own prompt texts (``fvqa/prompts/default.yaml``)."""
    text = resources.files("fvqa").joinpath("prompts", "default.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return Prompts(**data, source=dict.fromkeys(data, "fvqa-default"))


def load_prompts(paths: str | Path | Iterable[str | Path] | None = None) -> Prompts:
    """Prompts from fvqa's defaults, overridden by each given file or folder in order.

    Accepted: a YAML file (``name: text`` or ``name: {file: PATH}``), a plain-text file with
    ``=== name ===`` sections, one of upstream's pickled prompt files (by its upstream file name),
    or a folder holding upstream's pickles and/or ``prompts.yaml``. Pickles are read with an
    unpickler that admits only a plain ``str``; anything else is refused before it can run.
    Prompts a source does not define (upstream ships no direct-answer or RAG prompt) keep fvqa's.
    """
    base = default_prompts()
    if paths is None:
        return base
    if isinstance(paths, str | Path):
        paths = [paths]
    values = base.model_dump(exclude={"source"})
    source = dict(base.source)
    for raw in paths:
        path = Path(raw).expanduser()
        for name, text in _mapping_from_path(path).items():
            if name not in values:
                raise PromptFileError(f"{path}: unknown prompt name {name!r}; known: {sorted(values)}")
            values[name], source[name] = text, str(path)
    try:
        return Prompts(**values, source=source)
    except ValueError as exc:
        raise PromptFileError(f"prompts from {[str(p) for p in paths]} are invalid: {exc}") from exc
