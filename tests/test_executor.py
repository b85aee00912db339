"""fvqa.executor: shards come back in order on both executors, a worker's FvqaError stays itself,
and `executor: ray` without Ray Data installed is a one-line config error before anything is written."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import pytest
from rich.console import Console

from fvqa.config import RunConfig
from fvqa.errors import ConfigError
from fvqa.executor import map_shards


class Squares:
    """A worker: built once per process, called per shard (pickled by value for the Ray workers)."""

    builds = 0

    def __init__(self, offset: int) -> None:
        type(self).builds += 1
        self.offset = offset

    def __call__(self, shard: list[int]) -> tuple[list[int], int]:
        if -1 in shard:
            raise ConfigError("shard holds -1: a config error raised in a worker")
        return [x * x + self.offset for x in shard], os.getpid()


SHARDS = [[i, i + 1] for i in range(0, 40, 2)]


def test_local_executor_builds_once_and_keeps_order() -> None:
    Squares.builds = 0
    out = list(map_shards(RunConfig(), Squares, {"offset": 1}, SHARDS, name="t"))
    assert [r for r, _ in out] == [[x * x + 1 for x in s] for s in SHARDS]
    assert Squares.builds == 1 and {pid for _, pid in out} == {os.getpid()}


def test_ray_executor_keeps_order_and_raises_worker_config_errors(ray_cluster: object) -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests/
    config = RunConfig(executor="ray", ray={"workers": 2})
    out = list(map_shards(config, Squares, {"offset": 1}, SHARDS, name="t"))
    assert [r for r, _ in out] == [[x * x + 1 for x in s] for s in SHARDS]
    assert os.getpid() not in {pid for _, pid in out}  # the work ran in Ray's worker processes
    with pytest.raises(ConfigError, match="shard holds -1"):
        list(map_shards(config, Squares, {"offset": 0}, [*SHARDS[:3], [-1], *SHARDS[3:]], name="t"))


def test_ray_without_ray_data_is_one_line_before_anything_is_written(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from fvqa.pipelines.runner import run_build

    monkeypatch.setitem(sys.modules, "ray.data", None)  # what `import ray.data` sees when it is not installed
    config = RunConfig.model_validate({"workspace": str(tmp_path / "ws"), "executor": "ray",
                                       "match": {"enabled": True, "pool": str(tmp_path / "p.parquet")}})
    with pytest.raises(ConfigError, match=r"executor: ray needs Ray Data .*pip install 'fvqa\[ray\]'"):
        run_build(config, only=["match"], console=Console(file=io.StringIO()))
    assert not (tmp_path / "ws").exists()


def test_ray_address_where_nothing_listens_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    import socket

    from fvqa.pipelines.runner import run_build

    with socket.socket() as sock:  # a loopback port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = RunConfig.model_validate({"workspace": str(tmp_path / "ws"), "executor": "ray",
                                       "ray": {"address": f"127.0.0.1:{port}"},
                                       "match": {"enabled": True, "pool": str(tmp_path / "p.parquet")}})
    with pytest.raises(ConfigError, match=rf"ray.address 127.0.0.1:{port}: no Ray cluster answers there"):
        run_build(config, only=["match"], console=Console(file=io.StringIO()))
    assert not (tmp_path / "ws").exists()
