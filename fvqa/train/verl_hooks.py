"""The one way fvqa changes veRL code it has no extension point for: patch a module when it loads.

veRL 0.9.1 has registries for platforms and rollout engines but none for LR schedules or trainer
metrics. For those, fvqa wraps one function, and only after veRL itself imports the module that
defines it: importing veRL's FSDP engine or trainer inside ``import verl`` would load them (and
transformers' model code) in every Ray process, including ones that never train. Every hook is
pinned to the veRL release it was read from; another release is one clear error naming what to
re-check.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

VERL_VERSION = "0.9.1"
"""The veRL release every fvqa hook into veRL was read from and tested with."""


class UnsupportedVerlError(RuntimeError):
    """The installed veRL is not the release a hook was written against."""


def verl_version() -> str:
    import verl

    return str(getattr(verl, "__version__", "unknown"))


def require_verl(what: str, recheck: str) -> None:
    """Raise :class:`UnsupportedVerlError` unless veRL is :data:`VERL_VERSION`."""
    found = verl_version()
    if found != VERL_VERSION:
        raise UnsupportedVerlError(
            f"{what} was checked against verl=={VERL_VERSION}, found {found}: install verl=={VERL_VERSION}, "
            f"or re-check {recheck}"
        )


_PATCHES: dict[str, list[Callable[[ModuleType], None]]] = {}


class _PatchAfterImport:
    """A ``sys.meta_path`` finder: Python's own finders locate the module, this one only wraps the
    loader's ``exec_module`` so the registered patches run right after the module's code."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        patches = _PATCHES.get(fullname)
        if not patches:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            raise UnsupportedVerlError(f"cannot hook the import of {fullname} (loader {loader!r})")
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            for patch in list(patches):
                patch(module)

        loader.exec_module = exec_and_patch  # this loader object belongs to this one spec
        return spec


def patch_on_import(module_name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` now if the module is loaded, else right after it is first imported.

    A patch must be idempotent (it may see a module it already patched).
    """
    patches = _PATCHES.setdefault(module_name, [])
    if patch not in patches:
        patches.append(patch)
    if module_name in sys.modules:
        patch(sys.modules[module_name])
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
