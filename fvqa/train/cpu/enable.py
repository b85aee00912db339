"""Importing this module enables fvqa's CPU backend in a veRL process.

veRL imports it itself, in every process of a run, when ``VERL_USE_EXTERNAL_MODULES`` names it (set
by ``fvqa train run`` for ``trainer.device=cpu``). Importing :mod:`fvqa.train.cpu` alone changes
nothing, so the launcher can check the installed veRL before starting a run.
"""

from __future__ import annotations

from fvqa.train.cpu import install

install()
