"""`match` on Ray (executor: ray) gives the local executor's tables row for row, also when a Ray
worker is killed mid-stage (restarted, its shard re-run) and when the build itself is killed."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from fvqa.config import RunConfig
from fvqa.pipelines.match import pool_shards
from fvqa.store import Workspace

WORDS = ["dog", "cat", "red", "car", "sky", "new", "york", "tree", "blue", "house"]
ENTRIES = [*WORDS, "red car", "new york", "blue sky", 7, "dog", "x.y"]


def _pool(n: int, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    rows = [dict(url=f"http://p/{i}.jpg", caption=" ".join(rng.choices(WORDS, k=5)) + rng.choice([".", "", ", x.y"]),
                 page_url=f"http://p/{i}" if i % 3 else None) for i in range(n)]
    rows[5]["url"] = ""  # unusable rows, rejected with their row number
    rows[n // 2]["caption"] = None
    return rows


def _config(tmp_path: Path, name: str, pool: list[dict], *, executor: str, row_group: int = 250,
            **match: object) -> RunConfig:
    meta, path = tmp_path / "metadata.json", tmp_path / "pool.parquet"
    if not path.exists():
        meta.write_text(json.dumps(ENTRIES))
        pq.write_table(pa.Table.from_pylist(pool), path, row_group_size=row_group)
    return RunConfig.model_validate({
        "workspace": str(tmp_path / name), "executor": executor,
        "concepts": {"metadata_path": str(meta), "threshold": 40},
        "match": {"enabled": True, "pool": str(path), "processes": 1, "candidates_per_concept": 3,
                  "shard_rows": 300, **match}})


def _run(config: RunConfig) -> None:
    from fvqa.pipelines.runner import run_build

    run_build(config, only=["match"], console=Console(file=io.StringIO()))


def _tables(config: RunConfig) -> dict[str, list]:
    with Workspace(config.workspace) as ws:
        return {
            "counts": ws.execute("SELECT entry_id, entry, count, balanced_count FROM entry_counts ORDER BY 1"),
            "candidates": ws.execute("SELECT * FROM match_candidates ORDER BY entry_id, rank"),
            "rejects": ws.execute("SELECT key, reason, detail FROM rejects WHERE stage = 'match' ORDER BY key"),
            "runs": ws.execute("SELECT n_in, n_out, n_rejected FROM runs WHERE stage = 'match' AND status = 'done'"),
        }


def test_shards_cover_the_pool_across_row_groups(tmp_path: Path) -> None:
    _config(tmp_path, "ws", _pool(1000), executor="local", row_group=170)
    path = tmp_path / "pool.parquet"
    shards = pool_shards(path, 300)
    assert shards == [(0, 300), (300, 600), (600, 900), (900, 1000)]
    from fvqa.pipelines.match import _pool_range, _pool_rows

    assert [r for lo, hi in shards for r in _pool_range(path, lo, hi)] == list(_pool_rows(path))


@pytest.mark.parametrize("balance", [False, True])
def test_ray_match_equals_local_row_for_row(tmp_path: Path, ray_cluster: object, balance: bool) -> None:
    pool = _pool(2_000)
    local = _config(tmp_path, "local", pool, executor="local", balance=balance, processes=2)
    remote = _config(tmp_path, "ray", pool, executor="ray", balance=balance)
    _run(local)
    _run(remote)
    want, got = _tables(local), _tables(remote)
    assert got == want
    assert len(want["rejects"]) == 3 and want["counts"][0][2] > 0  # an entry of the wrong type, two bad rows
    if balance:
        assert any(c[3] is not None and c[3] < c[2] for c in want["counts"])  # balancing dropped head pairs


def _actors() -> list[psutil.Process]:
    """The Ray Data actors running stage workers (their process title names the actor class)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            title = " ".join(proc.info["cmdline"] or []) + (proc.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "_RayShardActor" in title:
            found.append(proc)
    return found


def test_killed_ray_worker_is_restarted_and_its_shard_rerun(tmp_path: Path, ray_cluster: object) -> None:
    pool = _pool(40_000, seed=9)
    local = _config(tmp_path, "local", pool, executor="local", row_group=1_000)
    remote = _config(tmp_path, "ray", pool, executor="ray", shard_rows=500)  # 80 shards: the stage takes seconds
    _run(local)
    killed: list[int] = []
    restarted: list[int] = []
    done = threading.Event()

    def kill_one() -> None:
        while not done.is_set() and not killed:
            actors = _actors()
            if actors:
                time.sleep(0.5)  # let it finish a few shards: the kill lands mid-stage
                before = {p.pid for p in _actors()}
                try:
                    actors[0].send_signal(signal.SIGKILL)
                    killed.append(actors[0].pid)
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.05)
        while not done.is_set():  # Ray starts a new actor in its place, so the stage was still running
            restarted.extend(p.pid for p in _actors() if p.pid not in before)
            if restarted:
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    try:
        _run(remote)
    finally:
        done.set()
        killer.join()
    assert killed, "no Ray worker was seen running the stage"
    assert restarted, "the killed worker was not replaced: the kill did not land mid-stage"
    assert _tables(remote) == _tables(local)


def test_killed_build_on_ray_resumes_to_the_same_tables(tmp_path: Path) -> None:
    """`fvqa build --set executor=ray` killed (SIGKILL) mid-match, then run again: the local tables."""
    pool = _pool(60_000, seed=4)
    local = _config(tmp_path, "local", pool, executor="local", row_group=2_000)
    _run(local)
    (tmp_path / "build.yaml").write_text(json.dumps({
        "workspace": str(tmp_path / "ray"),
        "concepts": {"metadata_path": str(tmp_path / "metadata.json"), "threshold": 40},
        "match": {"enabled": True, "pool": str(tmp_path / "pool.parquet"), "candidates_per_concept": 3,
                  "shard_rows": 500}}))
    cmd = [sys.executable, "-m", "fvqa", "build", "--config", str(tmp_path / "build.yaml"), "--stages", "match",
           "--set", "executor=ray", "--set", "ray.num_cpus=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    progress = tmp_path / "ray" / "build-progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _actors() and progress.exists() and json.loads(progress.read_text()).get("stage") == "match":
            time.sleep(1.0)
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
    os.killpg(proc.pid, signal.SIGKILL)  # the build and the Ray it started
    proc.wait()
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    remote = RunConfig.model_validate({**local.model_dump(), "workspace": str(tmp_path / "ray")})
    got, want = _tables(remote), _tables(local)
    assert got["counts"] == want["counts"] and got["candidates"] == want["candidates"]
    assert got["rejects"] == want["rejects"]
    assert got["runs"] == want["runs"]  # the killed run never finished; the re-run did, once
