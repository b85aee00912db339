"""Load untrusted pickles (upstream's prompt files and released search caches) without running code.

A pickle can name any importable callable and call it (`os.system`, `subprocess.Popen`...). This
unpickler resolves only an allow-list: plain builtin containers/scalars, `collections.OrderedDict`,
the two helpers old pickle protocols use to rebuild objects and bytes, and PIL images (the caches may
embed thumbnails). Anything else is refused *before* it is called, with an error naming the refused
global.

Even admitted callables are not handed out as they are, because a few bytes of pickle can make them
do expensive or unwanted work:

* every PIL image class (`PIL.Image.Image`, `PngImageFile`...) resolves to `SafeImage`, which is
  built from the pickled pixel bytes only: its constructor takes no arguments (an `ImageFile(path)`
  would open a local file), and its state is checked (mode, size, pixel bytes) before any pixel
  buffer is allocated;
* `bytes`, `bytearray`, `str` and the containers resolve to guarded versions: no `bytes(n)` /
  `bytearray(n)` from an int, no `str(obj)` of anything but text or bytes (the `str` of a list that
  shares itself through the memo is exponentially long), a size cap per object, and one budget for
  everything these constructors build, proportional to the input's size;
* `copyreg._reconstructor` only rebuilds `object`-based instances.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copyreg
import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from fvqa.errors import FvqaError

_SCALARS = {"int", "float", "complex", "bool", "object"}
_GUARDED = {"bytes", "bytearray", "str", "list", "tuple", "set", "frozenset", "dict"}
_PIL_MODULE = re.compile(r"^PIL\.(Image|[A-Za-z0-9]+ImagePlugin)$")

MAX_OBJECT_BYTES = 256 * 2**20
"""Largest single string, bytes object or container (8 bytes per item) a constructor may build."""
MIN_BUDGET_BYTES = 64 * 2**20
BUDGET_PER_INPUT_BYTE = 16
"""Everything the guarded constructors build together: max(64 MiB, 16 x the pickle's size)."""
MAX_IMAGE_PIXELS = 64_000_000
_IMAGE_MODES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3,
                "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2}


class UnsafePickleError(FvqaError):
    """The pickle names a global outside the allow-list (it could run code), builds far more than it
    holds, or is not a pickle."""


class SafeImage(Image.Image):
    """What every pickled PIL image class becomes: an image rebuilt from its pickled pixel bytes."""

    def __new__(cls, *args: Any, **kwargs: Any) -> SafeImage:
        if args or kwargs:
            raise UnsafePickleError("refused a PIL image constructor call with arguments "
                                    "(images are rebuilt from their pixel bytes only)")
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, list | tuple) or len(state) < 4:
            raise UnsafePickleError("refused a PIL image whose pickled state is not (info, mode, size, ..., data)")
        mode, size = state[1], state[2]
        data = state[4] if len(state) >= 5 else state[3]  # Pillow < 9: (info, mode, size, data)
        if mode not in _IMAGE_MODES:
            raise UnsafePickleError(f"refused a PIL image with mode {str(mode)[:20]!r}")
        if not (isinstance(size, list | tuple) and len(size) == 2
                and all(type(v) is int and 0 <= v <= 2**16 for v in size)):
            raise UnsafePickleError(f"refused a PIL image with size {str(size)[:40]}")
        if not isinstance(data, bytes | bytearray):
            raise UnsafePickleError("refused a PIL image whose pixels are not bytes")
        pixels = size[0] * size[1]
        needed = (-(-size[0] // 8)) * size[1] if mode == "1" else pixels * _IMAGE_MODES[mode]
        if pixels > MAX_IMAGE_PIXELS or len(data) < needed:
            raise UnsafePickleError(f"refused a {size[0]}x{size[1]} {mode} PIL image with {len(data)} bytes of "
                                    f"pixels (needs {needed}, at most {MAX_IMAGE_PIXELS} pixels)")
        palette = state[3] if len(state) >= 5 and isinstance(state[3], list | bytes | bytearray) else None
        info = state[0] if isinstance(state[0], dict) else {}
        super().__setstate__([info, mode, tuple(size), palette, bytes(data)])


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only the allow-list described in the module doc."""

    def __init__(self, file: io.BytesIO, *, input_size: int) -> None:
        super().__init__(file)
        self.budget = max(MIN_BUDGET_BYTES, BUDGET_PER_INPUT_BYTE * input_size)
        self.built = 0

    def find_class(self, module: str, name: str) -> Any:
        # protocols 0-2 spell some modules the Python 2 way (copy_reg, __builtin__)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "builtins" and name in _SCALARS:
            return getattr(builtins, name)
        if module == "builtins" and name in _GUARDED:
            return self._guarded(getattr(builtins, name))
        if module == "collections" and name == "OrderedDict":
            return self._guarded(collections.OrderedDict)
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        if module == "_codecs" and name == "encode":
            return self._guarded(_latin1_encode)
        if _PIL_MODULE.match(module):
            obj = getattr(pickle.Unpickler.find_class(self, module, name), "__mro__", None)
            if obj is not None and issubclass(obj[0], Image.Image):
                return SafeImage
        raise UnsafePickleError(
            f"refused to load global {module}.{name}: this pickle may only hold plain data and PIL images "
            "(a pickle that names other callables can run code when loaded)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id: only self-contained pickles are accepted")

    def _guarded(self, make: Callable[..., Any]) -> Callable[..., Any]:
        """`make` with its arguments checked, and the size of what it would build booked, before the call."""
        label = getattr(make, "__name__", "constructor").lstrip("_")
        per_item = 1 if make in (bytes, bytearray, str, _latin1_encode) else 8  # containers: a pointer per item

        def call(*args: Any, **kwargs: Any) -> Any:
            if kwargs:
                raise UnsafePickleError(f"refused {label}() with keyword arguments")
            if args:
                first = args[0]
                allowed: tuple[type, ...] = (str, bytes, bytearray) if make is str else (
                    (str, bytes, bytearray, list, tuple) if make in (bytes, bytearray) else (object,))
                if not isinstance(first, allowed) or isinstance(first, int | float | complex | bool):
                    raise UnsafePickleError(f"refused {label}() of a {type(first).__name__} value"
                                            + (" (it would allocate that many bytes)" if isinstance(first, int) else ""))
                if not hasattr(first, "__len__"):
                    raise UnsafePickleError(f"refused {label}() of a {type(first).__name__} (not a sized value)")
                self._book(label, len(first) * per_item * (4 if make is _latin1_encode else 1))
            return make(*args)

        call.__name__ = label
        return call

    def _book(self, label: str, size: int) -> None:
        if size > MAX_OBJECT_BYTES:
            raise UnsafePickleError(f"refused {label}() building {size} bytes (at most {MAX_OBJECT_BYTES} per object)")
        self.built += size
        if self.built > self.budget:
            raise UnsafePickleError(f"refused a pickle that builds more than {self.budget} bytes "
                                    f"({BUDGET_PER_INPUT_BYTE}x its size, at least {MIN_BUDGET_BYTES})")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """Protocol 0/1's `copyreg._reconstructor`, for `object`-based instances only (no `base(state)` call)."""
    if base is not object or state is not None or not isinstance(cls, type):
        raise UnsafePickleError(f"refused copyreg._reconstructor with base {getattr(base, '__name__', base)!r}")
    return copyreg._reconstructor(cls, object, None)


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What protocol-2 pickles use to rebuild `bytes`; restricted to the codecs they actually use."""
    if not isinstance(text, str):
        raise UnsafePickleError(f"refused _codecs.encode of a {type(text).__name__}")
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(f"refused _codecs.encode with codec {encoding!r}")
    return text.encode(encoding, errors)


def safe_loads(data: bytes) -> Any:
    """Unpickle `data` with the allow-list; UnsafePickleError on a refused global or corrupt data."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), input_size=len(data)).load()
    except UnsafePickleError:
        raise
    except MemoryError as exc:
        raise UnsafePickleError("not a readable pickle: it asks for more memory than there is") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt/truncated pickles raise many types
        raise UnsafePickleError(f"not a readable pickle: {type(exc).__name__}: {exc}") from exc


def safe_load(path: Path | str) -> Any:
    """`safe_loads` of a file, naming the file in any error."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnsafePickleError(f"cannot read {path}: {exc}") from exc
    try:
        return safe_loads(data)
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc}") from exc
