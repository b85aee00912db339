"""Where a stage's map-shaped work runs: in this process (`executor: local`) or on Ray Data (`ray`).

A stage hands `map_shards` a worker class, the keyword arguments that build it, and its shards (small,
picklable descriptions of work: a row range of the caption pool, a chunk of candidates, a chunk of
items). Each worker is built once per process (a CLIP model, an automaton, a model client) and
called once per shard; results come back to the driver *in shard order*, and only the driver writes
the workspace. So the stage's exactly-once contract is the local one: rows are committed by the
driver in batches, completion is recorded last, and a shard that Ray re-runs after its worker died
returns the same result without having written anything. Work that pays (model calls) goes through
the workspace's one response cache inside the worker, so a re-run shard replays what it already paid.

On Ray the shards become a Ray Data pipeline (from_items -> map_batches on an actor pool -> the
driver iterating the results in order); a worker that dies is restarted and its shard retried
(`ray.max_retries`). An `FvqaError` raised in a worker (e.g. a config error) comes back to the
driver and is raised there as itself, so it stays one line.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from fvqa.config import RayConfig, RunConfig
from fvqa.errors import ConfigError, FvqaError

CONNECT_TIMEOUT_S = 5.0  # how long `ray.address` may take to accept a connection before the build stops

#: Environment variables a local Ray's workers get from the driver (a remote cluster's nodes set their own).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "HF_HOME")


class ShardWorker(Protocol):
    """Built once per worker process from keyword arguments; called once per shard."""

    def __call__(self, shard: Any) -> Any: ...


def uses_ray(config: RunConfig) -> bool:
    """Whether this build runs its map-shaped work on Ray."""
    return config.executor == "ray"


def check_executor(config: RunConfig) -> None:
    """Raise a one-line ConfigError when `executor: ray` cannot run here: Ray Data not installed, or
    nothing answering at `ray.address` (Ray itself would retry for minutes before giving up)."""
    if not uses_ray(config):
        return
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"executor: ray needs Ray Data ({exc}); install it with `pip install 'fvqa[ray]'`") from exc
    address = config.ray.address
    why = _unreachable(address) if address else None
    if why:
        raise ConfigError(f"ray.address {address}: no Ray cluster answers there ({why}); start one with "
                          "`ray start --head`, or leave ray.address unset to start Ray on this machine")


def _unreachable(address: str) -> str | None:
    """Why nothing listens at a `host:port` (or `ray://host:port`) address; None when something does,
    or for `auto` (which Ray resolves, and refuses quickly when there is no cluster)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not sep:
        return None
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except ValueError:
        return f"port {port!r} is not a number"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def map_shards(config: RunConfig, worker: Callable[..., ShardWorker], init: dict[str, Any],
               shards: Sequence[Any], *, name: str) -> Iterator[Any]:
    """`worker(**init)(shard)` for every shard, yielded in shard order, locally or on Ray."""
    if not shards:
        return iter(())
    if uses_ray(config):
        return _ray_map(config.ray, worker, init, shards, name)
    return _local_map(worker, init, shards)


def _local_map(worker: Callable[..., ShardWorker], init: dict[str, Any], shards: Sequence[Any]) -> Iterator[Any]:
    built = worker(**init)
    for shard in shards:
        yield built(shard)


def worker_count(cfg: RayConfig) -> int:
    """Workers per stage: `ray.workers`, else as many as the cluster's CPUs hold."""
    if cfg.workers is not None:
        return cfg.workers
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(1, int(cpus // cfg.cpus_per_worker))


_STARTED_HERE = False


def ensure_ray(cfg: RayConfig) -> None:
    """Connect to `ray.address`, or start a Ray instance on this machine (stopped when we exit).

    A Ray already initialised in this process (a notebook, a test's cluster) is used as it is."""
    global _STARTED_HERE
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                                  runtime_env={"env_vars": env} if env else None)
    try:
        if cfg.address:
            ray.init(address=cfg.address, **kwargs)
        else:
            # the session folder holds Unix sockets, whose paths must stay short (~107 bytes)
            temp = str(cfg.temp_dir) if cfg.temp_dir else tempfile.mkdtemp(prefix="fvqa-ray-", dir="/tmp")
            # "local": a new instance even where `ray start` left a cluster (a plain init would join it)
            ray.init(address="local", num_cpus=cfg.num_cpus, _temp_dir=temp, **kwargs)
            _STARTED_HERE = True
            atexit.register(ray.shutdown)
    except ConnectionError as exc:
        raise ConfigError(f"ray.address {cfg.address}: cannot connect to a Ray cluster ({exc})") from exc


def shutdown_ray() -> None:
    """Stop the Ray instance `ensure_ray` started here (one we joined or were given is left running)."""
    global _STARTED_HERE
    if _STARTED_HERE:
        import ray

        ray.shutdown()
        _STARTED_HERE = False


class _Failed:
    """A worker's `FvqaError`, carried back to the driver to be raised there: as itself when it
    survives pickling, else as the nearest plain class (ConfigError / FvqaError) with its message."""

    def __init__(self, error: FvqaError) -> None:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - e.g. keyword-only constructor arguments
            error = (ConfigError if isinstance(error, ConfigError) else FvqaError)(str(error))
        self.error = error


class _RayShardActor:
    """The Ray Data actor: builds the stage's worker once, runs it on each (pickled) shard."""

    def __init__(self, worker: Callable[..., ShardWorker], init: dict[str, Any]) -> None:
        self.worker = worker(**init)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = []
        for blob in batch["shard"]:
            try:
                result: Any = self.worker(pickle.loads(blob))
            except FvqaError as exc:
                result = _Failed(exc)
            out.append(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        return {"i": batch["i"], "result": out}


def _ray_map(cfg: RayConfig, worker: Callable[..., ShardWorker], init: dict[str, Any],
             shards: Sequence[Any], name: str) -> Iterator[Any]:
    import ray
    import ray.data

    ensure_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # results come back in shard order
    ctx.enable_progress_bars = False  # the stage shows its own progress
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    items = [{"i": i, "shard": pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)} for i, s in enumerate(shards)]
    n = min(worker_count(cfg), len(items))
    with warnings.catch_warnings():  # restarts and retries have no named parameter (yet): see Ray 2.60's map_batches
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _RayShardActor, fn_constructor_kwargs={"worker": worker, "init": init}, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n),
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None, batch_format="numpy",
            max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries)
    expected = 0
    for row in ds.iter_rows():
        if int(row["i"]) != expected:  # preserve_order guarantees it; a gap would lose a shard's rows
            raise FvqaError(f"{name}: Ray returned shard {row['i']} where shard {expected} was due")
        expected += 1
        result = pickle.loads(row["result"])
        if isinstance(result, _Failed):
            raise result.error
        yield result
    if expected != len(items):
        raise FvqaError(f"{name}: Ray returned {expected} of {len(items)} shards")
