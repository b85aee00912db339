"""Shared fixtures: offline environment, one demo world per session, fresh workspaces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.paths import write_demo_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled demo world, generated once per test session."""
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("world") / "demo-world", seed=0, n_entities=240)


@pytest.fixture
def demo_config(tmp_path: Path, demo_world: Path) -> Path:
    """configs/demo.yaml pointed at the session's world and a fresh workspace."""
    return write_demo_config(tmp_path, demo_world)


@pytest.fixture(scope="session")
def ray_cluster() -> object:
    """A local Ray cluster of 2 CPUs (session folder in a short temp dir), shared by the Ray tests:
    `fvqa.executor.ensure_ray` uses a Ray already initialised in the process instead of starting one."""
    import shutil
    import tempfile

    import ray

    temp = tempfile.mkdtemp(prefix="fvqa-ray-test-", dir="/tmp")
    from fvqa.executor import FORWARDED_ENV

    ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}})
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
