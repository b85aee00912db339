"""Session helper: a real Label Studio server from its own venv on a free loopback port.

The venv is $FVQA_LS_VENV, else `.venv-ls` in the repo root, created on first use (pip install,
a few minutes once). A migrated template database cached next to it makes later starts take seconds.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fvqa.annotation import server
from fvqa.errors import FvqaError

REPO = Path(__file__).resolve().parents[2]  # tests/support/ -> the repo root


@dataclass
class LiveServer:
    """What tests need to talk to the session's server."""

    info: server.ServerInfo
    api_key: str
    document_root: Path

    @property
    def url(self) -> str:
        return self.info.url


def ls_venv() -> Path:
    """The Label Studio venv tests use."""
    return Path(os.environ.get("FVQA_LS_VENV") or REPO / ".venv-ls")


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Start Label Studio once per session; stop it at the end."""
    venv = ls_venv()
    try:
        server.ensure_venv(venv, log=lambda m: print(m))
    except (FvqaError, OSError) as exc:  # only an uninstallable venv may skip; a failing server must fail
        pytest.skip(f"cannot create the Label Studio venv at {venv}: {exc}")
    root = tmp_path_factory.getbasetemp().resolve()
    data_dir = tmp_path_factory.mktemp("ls-data")
    key = secrets.token_hex(20)
    info = server.start(data_dir, root, key, venv=venv, timeout=600, log=lambda m: print(m))
    try:
        yield LiveServer(info, key, root)
    finally:
        server.stop(data_dir)
