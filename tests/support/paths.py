"""The repository, the CLI as a subprocess, and the demo config pointed at a test's folders."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FVQA = [sys.executable, "-m", "fvqa.cli"]


def write_demo_config(directory: Path, world: Path) -> Path:
    """configs/demo.yaml pointed at `world` and a workspace `directory/ws`."""
    import yaml

    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["workspace"] = str(directory / "ws")
    data["world"]["path"] = str(world)
    data["search"]["local"]["index_dir"] = str(directory / "search-index")
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
