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

YAML is read with `load_yaml_text`: safe tags only, a key given twice in one mapping is an error
naming the key and both lines (PyYAML would silently keep the last), and anchors/aliases are allowed
only while the document they expand to stays small (`MAX_EXPANDED_NODES`): a few hundred bytes of
nested aliases ("billion laughs") would otherwise expand to billions of values downstream.
"""

from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from fvqa.errors import ConfigError

Key = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

DEFAULT_WORKSPACE = Path("fvqa-work")
"""Workspace of every config that sets none (relative to the working directory)."""

CONTEXT_KEY = "fvqa_config_file"
"""Key of the `PathContext` in the pydantic validation context."""

MAX_EXPANDED_NODES = 200_000
"""Values a config document may hold once its aliases are expanded (real configs hold a few hundred)."""

_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_INDEX = re.compile(r"\[\d+\]")  # `a[0].b`: OmegaConf's bracket index
_STRAY_BRACKET = re.compile(r"[\[\]]")


class _ConfigLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader that refuses a key repeated within one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:
                continue  # unhashable key: the base constructor reports it
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first given at line {first[key]})", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """Number of nodes in the document with every alias expanded (computed without expanding them)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk: deep nesting cannot overflow the Python stack
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        kids = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if children_done:
            active.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in kids), 10 * MAX_EXPANDED_NODES)
            continue
        if key in active:
            raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it",
                                              node.start_mark)
        active.add(key)
        stack.append((node, True))
        for child in kids:
            if id(child) in active:
                raise yaml.composer.ComposerError(None, None, "an alias refers to a node that contains it",
                                                  child.start_mark)
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def load_yaml_text(text: str) -> Any:
    """Parse one YAML document with the rules in the module docstring; yaml.YAMLError if refused."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # an undecodable byte of argv (surrogate escape)
        raise yaml.YAMLError(f"character {exc.start + 1} is not text (a byte that is not UTF-8)") from None
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_EXPANDED_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"its aliases expand to more than {MAX_EXPANDED_NODES} values (an alias bomb?)",
                node.start_mark)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where (line, column) and what."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return f"{where}: {problem}"


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
        loaded = load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"malformed YAML in {path}{_yaml_problem(exc)}") from exc
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _dotlist_parts(dotted: str) -> list[str]:
    """The key's parts by OmegaConf's dotlist grammar: `a.0.b` and `a[0].b` are both `a`, `0`, `b`."""
    if _STRAY_BRACKET.search(_INDEX.sub("", dotted)):
        raise ConfigError(f"--set {dotted}: a list index is written [number] or .number")
    try:
        node: Any = OmegaConf.to_container(OmegaConf.from_dotlist([dotted]), resolve=False)
    except OmegaConfBaseException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--set {dotted}: not a dotted key ({first})") from exc
    parts: list[str] = []
    while isinstance(node, dict) and len(node) == 1:  # `a.b` with no value parses to {'a': {'b': None}}
        (part, node), = node.items()
        parts.append(str(part))
    return parts


def _dotlist_value(dotted: str, raw: str, parts: list[str]) -> Any:
    """`raw` parsed as OmegaConf's dotlist parses it (YAML 1.2-style floats such as 1e-3, dates stay text).

    The bounded loader reads it first, so an undecodable argv byte or an alias bomb is refused the
    same way as in a config file."""
    try:
        load_yaml_text(raw)
        tree: Any = OmegaConf.to_container(OmegaConf.from_dotlist([f"{dotted}={raw}"]), resolve=False)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: the value is not valid YAML{_yaml_problem(exc)}") from exc
    except OmegaConfBaseException as exc:  # e.g. an unclosed `${`: OmegaConf reads it as interpolation
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--set {dotted}: not a valid OmegaConf value ({first}; `${{` opens an interpolation)") from exc
    for part in parts:
        tree = tree[part]
    return tree


def apply_override(data: dict[str, Any], assignment: str) -> Key:
    """Apply one `--set dotted.key=value` to `data`; return the key path set (as `PathContext.cli_keys`).

    Key and value follow OmegaConf's dotlist (`OmegaConf.from_dotlist`): a numeric part indexes a
    list (`benchmarks.0.limit=5`, also `benchmarks[0].limit=5`), the value is YAML. The walk stays
    here because OmegaConf would silently turn a scalar into a section and cannot say which part
    of a key is wrong: an index out of range, an index into something that is not a list, or a key
    under a scalar is a ConfigError naming the key. Missing sections along the way are created.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got '{assignment}'")
    dotted, raw = assignment.split("=", 1)
    dotted = dotted.strip()
    parts = _dotlist_parts(dotted)
    if not parts or not all(parts):
        raise ConfigError(f"--set {dotted}: empty key part")
    value = _dotlist_value(dotted, raw, parts)
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
