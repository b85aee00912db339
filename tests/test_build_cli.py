"""End-to-end: the CLI builds the demo, survives SIGKILL, and reports bad input as exit code 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.paths import FVQA, REPO, write_demo_config

from fvqa.store import Workspace


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FVQA, *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=600)


def _native_rows(ws: Path) -> list[dict]:
    rows = pq.read_table(ws / "exports" / "native" / "fvqa_items.parquet").to_pylist()
    for row in rows:  # wall-clock times differ between runs; everything else must not
        prov = json.loads(row["provenance"])
        for stage in prov.values():
            if isinstance(stage, dict):
                stage.pop("time", None)
        row["provenance"] = prov
    return sorted(rows, key=lambda r: r["item_id"])


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory: pytest.TempPathFactory, demo_world: Path) -> tuple[Path, Path, str]:
    """One uninterrupted demo build (config, workspace, stdout), shared by the tests below."""
    directory = tmp_path_factory.mktemp("demo-build")
    config = write_demo_config(directory, demo_world)
    res = _run("build", "--config", str(config))
    assert res.returncode == 0, res.stderr
    return config, directory / "ws", res.stdout


def test_demo_build_writes_three_exports(demo_build: tuple[Path, Path, str]):
    _, ws, stdout = demo_build
    assert "build finished" in stdout
    native = _native_rows(ws)
    assert len(native) > 100
    assert all(r["image_sha256"] and (ws / "images" / r["image_sha256"][:2]).is_dir() for r in native)
    upstream = list((ws / "exports" / "upstream").glob("*.parquet"))
    assert upstream and pq.read_table(upstream[0]).column_names[:5] == [
        "prompt", "images", "reward_model", "data_source", "image_urls"]
    card = (ws / "exports" / "hf" / "README.md").read_text()
    assert card.startswith("---") and f"Items: {len(native)}" in card
    # the demo's planted bad inputs are visible as rejects with reasons
    status = _run("status", "--workspace", str(ws))
    assert status.returncode == 0, status.stderr
    assert "malformed_json" in status.stdout
    sql = _run("sql", "SELECT count(*) AS n FROM dataset", "--workspace", str(ws), "--json")
    assert json.loads(sql.stdout)["n"] == len(native)


def test_sigkill_mid_stage_then_rerun_equals_uninterrupted_build(demo_build: tuple[Path, Path, str],
                                                                  tmp_path: Path):
    demo_config, clean_ws, _ = demo_build
    expected = _native_rows(clean_ws)

    killed_ws = tmp_path / "killed"
    proc = subprocess.Popen([*FVQA, "build", "--config", str(demo_config), "--workspace", str(killed_ws),
                             "--set", "batch_size=8"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until an image-storing stage is under way, then kill
        if len(list((killed_ws / "images").glob("*/*"))) >= 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Workspace(killed_ws) as ws:
        finished = {r[0] for r in ws.execute("SELECT stage FROM runs WHERE status = 'done'")}
        stored = ws.count("images")
    assert "export" not in finished and 0 < stored, "the kill should land mid-build, after some work"

    resumed = _run("build", "--config", str(demo_config), "--workspace", str(killed_ws))
    assert resumed.returncode == 0, resumed.stderr
    assert _native_rows(killed_ws) == expected


def test_ray_executor_builds_the_same_dataset_resumably(demo_build: tuple[Path, Path, str], demo_world: Path,
                                                        tmp_path: Path):
    """`fvqa build --set executor=ray` (a Ray of 2 CPUs started by the build), killed mid-build with
    its Ray and run again, exports the very rows of the local build."""
    _, clean_ws, _ = demo_build
    config = write_demo_config(tmp_path, demo_world)  # its own search index folder: built on Ray too
    ws = tmp_path / "ws"
    args = ["build", "--config", str(config), "--set", "executor=ray", "--set", "ray.num_cpus=2"]
    proc = subprocess.Popen([*FVQA, *args, "--set", "batch_size=8"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # mid-crawl: some images stored, not all
        if len(list((ws / "images").glob("*/*"))) >= 40:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be killed mid-crawl"
    os.killpg(proc.pid, signal.SIGKILL)  # the build and the Ray it started
    proc.wait()
    resumed = _run(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _native_rows(ws) == _native_rows(clean_ws)
    with Workspace(ws) as db:
        match_runs = [json.loads(s) for (s,) in db.execute(
            "SELECT stats FROM runs WHERE status = 'done' AND stage = 'match'")]
    assert any(r.get("ray_shards") for r in match_runs), match_runs  # the work did run on Ray


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("crawl:\n  max_sid: 3\n", "unknown key 'crawl.max_sid'"),
        ("crawl: [1,\n", "malformed YAML"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path: Path, content: str, message: str):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    res = _run("build", "--config", str(cfg), "--workspace", str(tmp_path / "ws"))
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "ws").exists(), "nothing half-written"


def test_missing_inputs_and_newer_workspace_exit_2(tmp_path: Path):
    res = _run("build", "--config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "config file not found" in res.stderr
    res = _run("build", "--workspace", str(tmp_path / "ws"), "--stages", "infoseek",
               "--set", f"infoseek.jsonl={tmp_path}/x.jsonl")
    assert res.returncode == 2 and "infoseek.jsonl not found" in res.stderr
    with Workspace(tmp_path / "old") as ws:
        ws.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    res = _run("status", "--workspace", str(tmp_path / "old"))
    assert res.returncode == 2 and "newer fvqa" in res.stderr
    res = _run("status", "--workspace", str(tmp_path / "none"))
    assert res.returncode == 2 and "no workspace" in res.stderr


def test_config_show_redacts_and_help_lists_commands(demo_config: Path):
    res = _run("config", "show", "--config", str(demo_config))
    assert res.returncode == 0, res.stderr
    assert "infoseek:" in res.stdout and "per_entity: 2" in res.stdout
    helptext = _run("--help").stdout
    for cmd in ("build", "status", "sql", "export", "import-upstream", "demo"):
        assert cmd in helptext


def test_demo_build_leaves_a_working_local_search_index(demo_build: tuple[Path, Path, str], demo_world: Path):
    config, ws, _ = demo_build
    assert (ws.parent / "search-index" / "meta.json").is_file()
    entity = json.loads((demo_world / "entities.jsonl").read_text().splitlines()[7])
    res = _run("search", "text", "--config", str(config), f"{entity['name']} country",
               "--question", f"Which country is the {entity['name']} from?")
    assert res.returncode == 0, res.stderr
    first = res.stdout.split("\n1. ", 1)[1].splitlines()[0]
    assert f"/wiki/{entity['entity_id']})" in first and entity["country"] in first


@pytest.mark.parametrize("args", [
    ["--stages", "exprot"], ["--until", "tagg"], ["--force", "prob"], ["--retry-rejects", "crawll:x"],
    ["--estimate", "--stages", "exprot"], ["--estimate", "--force", "prob"],
])
def test_a_misspelt_stage_stops_before_anything_is_written(tmp_path: Path, args: list[str]):
    """With or without --estimate: one line, exit 2, and neither the demo world nor a workspace on disk."""
    config = write_demo_config(tmp_path, tmp_path / "world")
    res = _run("build", "--config", str(config), *args)
    assert res.returncode == 2 and "unknown stage" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "world").exists() and not (tmp_path / "ws").exists()


def test_estimate_covers_only_the_selected_stages(tmp_path: Path):
    config = write_demo_config(tmp_path, tmp_path / "world")
    res = _run("build", "--config", str(config), "--estimate", "--stages", "generate,tag",
               "--set", "generate.backend=llm", "--set", "tag.backend=llm")
    assert res.returncode == 0, res.stderr
    rows = {m.group(1) for m in re.finditer(r"^\W*(\w+)\s*│", res.stdout, re.M)}  # first column of the table
    assert {"generate", "tag", "total"} <= rows and not rows & {"probe", "crawl", "infoseek", "export"}, rows
    assert not (tmp_path / "ws").exists()


def test_version_and_python_dash_m(tmp_path: Path):
    import sys
    from importlib.metadata import version

    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"fvqa {version('fvqa')}", res
    res = subprocess.run([sys.executable, "-m", "fvqa", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0 and "build" in res.stdout and "status" in res.stdout, res.stderr
