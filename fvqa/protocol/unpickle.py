"""Load untrusted pickles (upstream's prompt files and released search caches) without running code.

A pickle can name any importable callable and call it (`os.system`, `subprocess.Popen`...). This
unpickler resolves only an allow-list: plain builtin containers/scalars, `collections.OrderedDict`,
the two helpers old pickle protocols use to rebuild objects and bytes, and PIL image classes (the
caches may embed thumbnails). Anything else is refused *before* it is called, with an error naming
the refused global.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import copyreg
import io
import pickle
import re
from pathlib import Path
from typing import Any

from fvqa.errors import FvqaError

_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
             "complex", "bool", "object"}
_PIL_MODULE = re.compile(r"^PIL\.(Image|[A-Za-z0-9]+ImagePlugin)$")


class UnsafePickleError(FvqaError):
    """The pickle names a global outside the allow-list (it could run code), or is not a pickle."""


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` admits only the allow-list described in the module doc."""

    def find_class(self, module: str, name: str) -> Any:
        # protocols 0-2 spell some modules the Python 2 way (copy_reg, __builtin__)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "builtins" and name in _BUILTINS:
            return getattr(builtins, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "copyreg" and name == "_reconstructor":
            return copyreg._reconstructor  # rebuilds objects of admitted classes only (protocol 0/1)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if _PIL_MODULE.match(module):
            from PIL import Image

            obj = getattr(pickle.Unpickler.find_class(self, module, name), "__mro__", None)
            if obj is not None and issubclass(obj[0], Image.Image):
                return obj[0]
        raise UnsafePickleError(
            f"refused to load global {module}.{name}: this pickle may only hold plain data and PIL images "
            "(a pickle that names other callables can run code when loaded)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id: only self-contained pickles are accepted")


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What protocol-2 pickles use to rebuild `bytes`; restricted to the codecs they actually use."""
    if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafePickleError(f"refused _codecs.encode with codec {encoding!r}")
    return text.encode(encoding, errors)


def safe_loads(data: bytes) -> Any:
    """Unpickle `data` with the allow-list; UnsafePickleError on a refused global or corrupt data."""
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
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
