"""Reading config files: one loader for every typed config tree (the build's `RunConfig`, `EvalConfig`).

`load_yaml_config(Model, path, overrides)` reads the YAML file, applies `--set key=value` overrides,
validates with pydantic and resolves relative paths. Every problem is one `ConfigError` line that
names the key by the dotted path the user wrote: `unknown key 'crawl.max_sid'`,
`'benchmarks.0.kind': Input should be ...`.

Relative paths. A relative value of a Path-typed field (`Path`, `Path | None`, `list[Path]`, at any
depth) *written in the config file* resolves against that file's folder and becomes absolute. A value
given with `--set`, and every default, stays relative to the current working directory; with no
config file everything is relative to the working directory. `~` is expanded everywhere. Fields
marked `HubIdOrPath` (a model folder that may instead be a hub id such as `Qwen/Qwen2.5-VL-7B`)
resolve against the file's folder only when that path exists.

The resolution runs inside validation (the top-level model's `mode="after"` validator calls
`resolve_paths(self, info.context)`), so later validators, such as the build's demo-world defaults,
see final paths. This module imports nothing of fvqa but `fvqa.errors`, so any config module
(`fvqa.config`, `fvqa.eval.config`, `fvqa.search.config`) can use it without an import circle.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fvqa.errors import ConfigError

Key = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

DEFAULT_WORKSPACE = Path("fvqa-work")
"""Workspace of every config that sets none (relative to the working directory)."""

CONTEXT_KEY = "fvqa_config_file"
"""Key of the `PathContext` in the pydantic validation context."""


class HubIdOrPath:
    """Field marker (`Annotated[Path | None, HUB_ID_OR_PATH]`): resolve against the file only if it exists."""


HUB_ID_OR_PATH = HubIdOrPath()


@dataclass(frozen=True)
class PathContext:
    """Where the config file is (None: no file) and which keys `--set` gave (left cwd-relative)."""

    base: Path | None = None
    cli_keys: frozenset[Key] = field(default_factory=frozenset)


def read_yaml(path: Path | str, what: str = "config file") -> dict[str, Any]:
    """The file's top-level mapping (an empty file is `{}`); a clear one-line ConfigError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def apply_override(data: dict[str, Any], assignment: str) -> Key:
    """Apply one `--set dotted.key=value` (value parsed as YAML) to `data`; return the key path set.

    A numeric part indexes a list (`benchmarks.0.limit=5`, `models.1.name=x`); an index out of range,
    an index into something that is not a list, or a key under a scalar is a ConfigError naming the key.
    Missing sections along the way are created.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got '{assignment}'")
    dotted, raw = assignment.split("=", 1)
    dotted = dotted.strip()
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"--set {dotted}: empty key part")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    node: Any = data
    key: Key = ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i]) or "(top level)"
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"--set {dotted}: '{here}' is a list; index it with a number, not '{part}'")
            index = int(part)
            if index >= len(node):
                raise ConfigError(f"--set {dotted}: '{here}' has {len(node)} item(s), so no item {index}")
            step: str | int = index
        elif isinstance(node, dict):
            step = part
            if not last and part not in node:
                if parts[i + 1].isdigit():
                    raise ConfigError(f"--set {dotted}: '{'.'.join(parts[: i + 1])}' is not set, so it has no "
                                      f"item {parts[i + 1]} (set the whole list: {'.'.join(parts[: i + 1])}=[...])")
                node[part] = {}
        else:
            kind = "a list" if part.isdigit() else "a section"
            raise ConfigError(f"--set {dotted}: '{here}' is {type(node).__name__} {node!r}, not {kind}")
        key += (step,)
        if last:
            node[step] = value
        else:
            node = node[step]
    return key


def format_validation(exc: ValidationError, source: str, prefix: str = "") -> str:
    """One line naming every bad key by its dotted path (`unknown key 'crawl.max_sid'`)."""
    parts: list[str] = []
    for err in exc.errors():
        # union members add a tag to the location (`function-after[...]`, `list[...]`): not a user key
        path = prefix + ".".join(str(p) for p in err["loc"] if "[" not in str(p))
        path = path.rstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            line = f"unknown key '{path}'"
        else:
            line = f"'{path}': {msg}" if path else msg
        if line not in parts:
            parts.append(line)
    return f"{source}: " + "; ".join(parts)


def load_yaml_config(model: type[M], path: Path | str | None, overrides: list[str] | None = None, *,
                     what: str = "config file") -> M:
    """Read `path` (None: defaults only), apply `--set` overrides, validate as `model`.

    Relative paths in the file resolve against its folder, `--set` ones against the working directory
    (see the module docstring); `model`'s top-level validator must call `resolve_paths`.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    base = None
    if path is not None:
        path = Path(path)
        data = read_yaml(path, what)
        source = str(path)
        base = path.parent.absolute()
    cli_keys = frozenset(apply_override(data, assignment) for assignment in overrides or [])
    try:
        return model.model_validate(data, context={CONTEXT_KEY: PathContext(base, cli_keys)})
    except ValidationError as exc:
        raise ConfigError(format_validation(exc, source)) from exc


def resolve_paths(model: BaseModel, context: Any) -> None:
    """Resolve every Path field set in `model`'s tree, in place, per the validation `context`.

    Without a `PathContext` in the context (a model built in code) nothing changes. Sections whose
    class lists `merged_sections` (keys a validator merges into the section, such as the deprecated
    `search.options`) have those keys dropped from `--set` key paths before they are matched.
    """
    ctx = context.get(CONTEXT_KEY) if isinstance(context, dict) else None
    if isinstance(ctx, PathContext):
        _walk(model, ctx.base, set(ctx.cli_keys))


def _walk(model: BaseModel, base: Path | None, cli: set[Key]) -> None:
    merged = getattr(type(model), "merged_sections", frozenset())
    cli = {k[1:] if k and k[0] in merged else k for k in cli}
    if () in cli:  # the whole section came from --set: relative to the working directory
        base, cli = None, set()
    for name, info in type(model).model_fields.items():
        if name not in model.model_fields_set:
            continue
        sub = {k[1:] for k in cli if k and k[0] == name}
        here = None if () in sub else base
        value = getattr(model, name)
        kind = _path_kind(info.annotation)
        only_if_exists = any(isinstance(m, HubIdOrPath) for m in info.metadata)
        if kind == "one" and isinstance(value, PurePath):
            setattr(model, name, _resolve(value, here, only_if_exists))
        elif kind == "list" and isinstance(value, list):
            setattr(model, name, [_resolve(v, None if (i,) in sub else here, only_if_exists)
                                  if isinstance(v, PurePath) else v for i, v in enumerate(value)])
        elif isinstance(value, BaseModel):
            _walk(value, here, sub)
        elif isinstance(value, list | dict):
            items = enumerate(value) if isinstance(value, list) else value.items()
            for k, v in items:
                if isinstance(v, BaseModel):
                    _walk(v, here, {c[1:] for c in sub if c and c[0] == k})


def _resolve(value: PurePath, base: Path | None, only_if_exists: bool) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute() or base is None:
        return path
    joined = Path(os.path.normpath(base / path))
    return path if only_if_exists and not joined.exists() else joined


def _path_kind(annotation: Any) -> str | None:
    """'one' for Path / Path | None, 'list' for list[Path] (| None), else None."""
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "one"
    origin = get_origin(annotation)
    if origin is list:
        args = get_args(annotation)
        return "list" if args and _path_kind(args[0]) == "one" else None
    if origin is Union or origin is types.UnionType:
        kinds = {_path_kind(a) for a in get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else None
    return None
