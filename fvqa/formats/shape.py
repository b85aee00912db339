"""Record shapes checked at the door: one pydantic model per record layout, one way to say what is wrong.

Every reader of an outside file (the ``infoseek`` stage, ``import-upstream``, the eval loaders)
validates each record against a small strict model before touching it, so a wrong-typed field
becomes a reject naming the field (:data:`WRONG_TYPE` and a detail such as ``question: expected a
string, got integer 5``), never a ``TypeError`` three calls later or an ``ArrowTypeError`` at commit.
The models ignore fields they do not declare and accept ``None`` where the format allows a field to
be absent; whether a present value is *empty* is the caller's rule, as before.

Each field's ``description`` is the expected shape in words; :func:`shape_problem` turns a
``ValidationError`` into ``(reason, detail)`` with the path to the offending value and what was found.
It imports nothing from fvqa.
"""

from __future__ import annotations

import reprlib
import types
import typing
from collections.abc import Callable
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError

WRONG_TYPE = "wrong_type"
"""The reason code of a record whose field has the wrong type (the detail names the field)."""

MALFORMED_JSON = "malformed_json"
"""The reason code of a JSON text inside a record (a parquet cell) that does not parse."""

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 2, 40, 40, 4, 3


class Shape(BaseModel):
    """Base of the record models: strict types, undeclared fields ignored, never mutated."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


def kind(value: Any) -> str:
    """What a value is, in JSON words (``null``, ``boolean``, ``integer``, ``array``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def found(value: Any) -> str:
    """``integer 5``, ``array [[[[...]]]]``: the kind and a short preview (safe for any depth or size)."""
    if value is None:
        return "null"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"bytes (length {len(value)})"
    try:
        preview = _repr.repr(value)
    except RecursionError:  # pragma: no cover - reprlib caps the depth
        preview = "..."
    return f"{kind(value)} {preview}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, tuple, dict) or origin is not None:
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _where(model: type[BaseModel], record: Any, loc: tuple[Any, ...]) -> tuple[str, str, Any]:
    """(path like ``reward_model.ground_truth`` or ``images[0].bytes``, expected, the value found)."""
    path, expected, value = "", "", record
    models = [model]
    for part in loc:
        if isinstance(part, str) and isinstance(value, dict) and part in value:
            info = next((m.model_fields[part] for m in models if part in m.model_fields), None)
            if info is None:
                break
            path = f"{path}.{part}" if path else part
            expected = info.description or expected
            models = _models_in(info.annotation)
            value = value[part]
        elif isinstance(part, int) and isinstance(value, list | tuple) and 0 <= part < len(value):
            path, value = f"{path}[{part}]", value[part]
        # anything else is a union member's tag (``str``, ``list[str]``): it names no value
    return path or "record", expected, value


def shape_problem(model: type[BaseModel], record: Any, exc: ValidationError) -> tuple[str, str]:
    """``(WRONG_TYPE, "field: expected ..., got ...")`` for the first field a record gets wrong."""
    errors = exc.errors(include_url=False)
    # the deepest location first: a union reports its members' errors, the longest path is the real one
    first = max(errors, key=lambda e: len(e["loc"])) if errors else {"loc": ()}
    path, expected, value = _where(model, record, tuple(first["loc"]))
    if not isinstance(record, dict):
        return WRONG_TYPE, f"record: expected an object, got {found(record)}"
    return WRONG_TYPE, f"{path}: expected {expected or 'another type'}, got {found(value)}"


M = typing.TypeVar("M", bound=BaseModel)


def validate(model: type[M], record: Any) -> M | tuple[str, str]:
    """The record as `model`, or ``(reason, detail)`` naming the first field whose type is wrong."""
    try:
        return model.model_validate(record)
    except ValidationError as exc:
        return shape_problem(model, record, exc)
    except RecursionError:
        return WRONG_TYPE, "record nested too deeply to check"


# -- a fast path for million-line files: the same verdicts, found sooner ------------------------------

_JSON_SCALARS = (str, int, float, type(None))


def _exact(annotation: Any) -> Callable[[Any], bool] | None:
    """A predicate true only for values of exactly the JSON types `annotation` names (`json.loads`
    gives exact types; a bool is not an int here), or None for `Any`. An annotation outside these
    shapes gets a predicate that is always false, so pydantic decides."""
    if annotation is Any:
        return None
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) \
        else (annotation,)
    scalars = frozenset(m for m in members if m in _JSON_SCALARS)
    lists = [m for m in members if typing.get_origin(m) is list]
    inner = frozenset(typing.get_args(typing.get_args(lists[0])[0]) or typing.get_args(lists[0])) \
        if len(lists) == 1 else frozenset()
    if len(scalars) + len(lists) != len(members) or len(lists) > 1 or not inner <= set(_JSON_SCALARS):
        return lambda v: False
    if not lists:
        return lambda v: type(v) in scalars
    return lambda v: type(v) in scalars or (type(v) is list and all(type(x) in inner for x in v))


def shape_checker(shape: type[Shape]) -> Callable[[dict[str, Any]], tuple[str, str] | None]:
    """`validate(shape, obj)` reduced to its verdict: None when the line has the shape (its dict's
    values are then the model's), else ``(reason, detail)``. A line whose declared fields hold exactly
    the JSON types the shape names is accepted without building the model; any other line gets
    pydantic's verdict and message. At 1M lines per file the model costs more than parsing the JSON."""
    fields = shape.model_fields
    if any(f.is_required() or f.default is not None for f in fields.values()):
        checks: list[tuple[str, Callable[[Any], bool]]] = [("", lambda v: False)]  # defaults: the model's job
    else:
        checks = [(name, ok) for name, f in fields.items() if (ok := _exact(f.annotation)) is not None]

    def problem(obj: dict[str, Any]) -> tuple[str, str] | None:
        for name, ok in checks:
            if not ok(obj.get(name)):
                checked = validate(shape, obj)
                return checked if isinstance(checked, tuple) else None
        return None

    return problem
