"""Shared fixtures: offline environment, one demo world per session, fresh workspaces."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
FVQA = [sys.executable, "-m", "fvqa.cli"]


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo world, generated once per test session."""
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("world") / "demo-world", seed=0, n_entities=240)


def write_demo_config(directory: Path, world: Path) -> Path:
    """configs/demo.yaml pointed at `world` and a workspace `directory/ws`."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["workspace"] = str(directory / "ws")
    data["world"]["path"] = str(world)
    data["search"]["options"]["local"]["index_dir"] = str(directory / "search-index")
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def demo_config(tmp_path: Path, demo_world: Path) -> Path:
    """configs/demo.yaml pointed at the session's world and a fresh workspace."""
    return write_demo_config(tmp_path, demo_world)
