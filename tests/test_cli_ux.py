"""The CLI as a new user meets it: arguments checked before any disk, `-w` moves everything under
the workspace, library noise in a log file, `status` during a build, import-upstream's splits,
`--version`, `python -m fvqa`, shell completion."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from support.paths import FVQA, REPO, write_demo_config

from fvqa.store import PROGRESS_FILE, Workspace, write_progress


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FVQA, *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=600)


def _one_error_line(res: subprocess.CompletedProcess[str], *words: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _own_world_config(directory: Path) -> Path:
    """The demo config with the world and the search index *inside* its workspace, as configs/demo.yaml."""
    data = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data["workspace"] = "ws"
    data["world"]["path"] = "ws/demo-world"
    data["search"]["local"]["index_dir"] = "ws/search-index"
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------ 1. arguments before disk
@pytest.mark.parametrize("args", [
    ["--stages", "exprot"],
    ["--until", "exprot"],
    ["--stages", "crawl", "--force", "exprot"],
    ["--estimate", "--stages", "exprot"],
    ["--estimate", "--until", "exprot"],
    ["--estimate", "--force", "exprot"],
    ["--estimate", "--retry-rejects", "crawl:nope"],
])
def test_bad_stage_names_fail_before_anything_is_written(tmp_path: Path, args: list[str]):
    config = _own_world_config(tmp_path)
    res = _run("build", "--config", str(config), *args)
    _one_error_line(res, "exprot" if "exprot" in args else "nope")
    assert not (tmp_path / "ws").exists()


def test_bad_workspace_fails_before_the_world_is_written(tmp_path: Path):
    config = _own_world_config(tmp_path)
    (tmp_path / "afile").write_text("x")
    res = _run("build", "--config", str(config), "-w", str(tmp_path / "afile"), "--stages", "concepts")
    _one_error_line(res, "afile")
    assert not (tmp_path / "ws").exists() and (tmp_path / "afile").read_text() == "x"


def test_estimate_creates_no_workspace(tmp_path: Path, demo_world: Path):
    config = write_demo_config(tmp_path, demo_world)
    res = _run("build", "--config", str(config), "--estimate", "--until", "generate")
    assert res.returncode == 0, res.stderr
    assert "estimate (nothing spent)" in res.stdout
    assert not (tmp_path / "ws").exists()


# ------------------------------------------------------------------ 2. -w moves what lives under it
def test_workspace_option_moves_world_and_index(tmp_path: Path):
    config = _own_world_config(tmp_path)
    other = tmp_path / "other"
    shown = yaml.safe_load(_run("config", "show", "--config", str(config), "-w", str(other)).stdout)
    assert shown["workspace"] == str(other)
    assert shown["world"]["path"] == str(other / "demo-world")
    assert shown["search"]["local"]["index_dir"] == str(other / "search-index")
    assert shown["crawl"]["manifest"] == str(other / "demo-world" / "web" / "images.jsonl")
    res = _run("build", "--config", str(config), "-w", str(other), "--stages", "index")
    assert res.returncode == 0, res.stderr
    assert (other / "demo-world" / "world.json").is_file() and (other / "search-index").is_dir()
    assert not (tmp_path / "ws").exists()


def test_workspace_option_keeps_paths_outside_the_workspace(tmp_path: Path, demo_world: Path):
    config = write_demo_config(tmp_path, demo_world)  # world and index outside its workspace
    shown = yaml.safe_load(_run("config", "show", "--config", str(config), "-w", str(tmp_path / "o")).stdout)
    assert shown["world"]["path"] == str(demo_world)
    assert shown["search"]["local"]["index_dir"] == str(tmp_path / "search-index")


def test_default_world_follows_the_workspace(tmp_path: Path):
    res = _run("config", "show", "--set", "world.seed=0", "-w", str(tmp_path / "w2"))
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["world"]["path"] == str(tmp_path / "w2" / "demo-world")


# ------------------------------------------------------------------ 3. library noise -> log file
@pytest.fixture(scope="module")
def index_build(tmp_path_factory: pytest.TempPathFactory, demo_world: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`fvqa build --stages index`: loads open_clip (its root-logger warning) and bm25s (DEBUG)."""
    directory = tmp_path_factory.mktemp("noise")
    config = write_demo_config(directory, demo_world)
    return directory / "ws", _run("build", "--config", str(config), "--stages", "index")


def test_build_terminal_has_no_library_noise(index_build: tuple[Path, subprocess.CompletedProcess[str]]):
    ws, res = index_build
    assert res.returncode == 0, res.stderr
    terminal = res.stdout + res.stderr
    for noise in ("WARNING:root", "No pretrained weights", "DEBUG:bm25s", "bm25s"):
        assert noise not in terminal, terminal
    logs = list((ws / "logs").glob("build-*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert "No pretrained weights" in text and "bm25s" in text
    assert f"log: {logs[0].resolve()}" in res.stdout  # the path on a line of its own


def test_verbose_shows_library_logs(tmp_path: Path, demo_world: Path):
    config = write_demo_config(tmp_path, demo_world)
    res = _run("build", "--config", str(config), "--stages", "index", "-v")
    assert res.returncode == 0, res.stderr
    assert "No pretrained weights" in res.stderr
    assert "No pretrained weights" in next((tmp_path / "ws" / "logs").glob("build-*.log")).read_text()


def test_stage_notes_print_outside_the_table(tmp_path: Path):
    """A note holding a path is one unbroken line, whatever the terminal width."""
    from rich.console import Console

    from fvqa.pipelines.base import StageStats
    from fvqa.pipelines.runner import print_summary

    path = "/some/long/workspace/folder/exports/upstream/fvqa_unassigned_with_a_long_name.parquet"
    stats = StageStats()
    stats.notes.append(f"upstream: {path}")
    buf = io.StringIO()
    print_summary(Console(file=buf, width=40), "export", stats)
    assert f"upstream: {path}" in buf.getvalue()


# ------------------------------------------------------------------ 4. status during a build
_HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(60)
"""


def test_status_reads_the_snapshot_while_the_database_is_locked(tmp_path: Path):
    ws = tmp_path / "ws"
    Workspace(ws).close()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(ws / "fvqa.duckdb")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        locked = _run("status", "-w", str(ws))  # no snapshot yet: the lock error, one line
        _one_error_line(locked, "in use by another process")
        write_progress(ws, {"pid": holder.pid, "status": "running", "started_at": "2026-01-01T00:00:00+00:00",
                            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                            "stage": "crawl", "stages": [
                                {"name": "concepts", "status": "done", "n_in": 10, "n_out": 8, "n_rejected": 2},
                                {"name": "crawl", "status": "running", "new_rows": 3}]})
        res = _run("status", "-w", str(ws))
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 0, res.stderr
    assert "live build snapshot" in res.stdout and "now in stage crawl" in res.stdout
    assert "s ago" in res.stdout and "concepts" in res.stdout
    assert not list(ws.glob(".build-progress-*"))  # the temp file was renamed into place


def test_build_publishes_progress(index_build: tuple[Path, subprocess.CompletedProcess[str]]):
    ws, _ = index_build
    snap = json.loads((ws / PROGRESS_FILE).read_text())
    assert snap["status"] == "finished" and snap["stage"] is None
    assert [s["name"] for s in snap["stages"]] == ["index"] and snap["stages"][0]["status"] == "done"


# ------------------------------------------------------------------ 5. import-upstream's split
def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64 + seed, 64), (seed * 40 % 255, 80, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _upstream_file(path: Path, n: int = 3) -> Path:
    rows = [{
        "prompt": [{"content": f"What is this thing #{i}?", "role": "user"}],
        "images": [{"bytes": _jpeg(i), "path": None}],
        "reward_model": {"candidate_answers": json.dumps(["Spain"]), "ground_truth": "Spain", "style": "rule"},
        "data_source": "mmsearch_r1/fvqa", "image_urls": None, "data_id": f"x_{i:05d}",
        "category": "search_free"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _splits(ws: Path) -> dict[str, int]:
    with Workspace(ws, read_only=True) as w:
        return dict(w.execute("SELECT split, count(*) FROM dataset GROUP BY 1"))


def test_import_says_the_split_and_split_moves_present_rows(tmp_path: Path):
    src, ws = _upstream_file(tmp_path / "mini.parquet"), tmp_path / "ws"
    first = _run("import-upstream", str(src), "-w", str(ws))
    assert first.returncode == 0, first.stderr
    assert "imported 3" in first.stdout and "split: unassigned (default: mini.parquet names neither" in first.stdout
    assert _splits(ws) == {"unassigned": 3}
    moved = _run("import-upstream", str(src), "-w", str(ws), "--split", "train")
    assert moved.returncode == 0, moved.stderr
    assert "already present 3" in moved.stdout and "moved 3 already present to train" in moved.stdout
    assert "split: train (from --split)" in moved.stdout
    assert _splits(ws) == {"train": 3}
    again = _run("import-upstream", str(src), "-w", str(ws), "--split", "train")
    assert "are in train already" in again.stdout and "moved" not in again.stdout
    plain = _run("import-upstream", str(src), "-w", str(ws))
    assert "keep their split" in plain.stdout and _splits(ws) == {"train": 3}


def test_import_split_from_the_file_name(tmp_path: Path):
    src = _upstream_file(tmp_path / "fvqa_test.parquet", n=1)
    res = _run("import-upstream", str(src), "-w", str(tmp_path / "ws"))
    assert "split: test (from the file name fvqa_test.parquet)" in res.stdout


def test_import_bad_arguments_touch_nothing(tmp_path: Path):
    src = _upstream_file(tmp_path / "mini.parquet", n=1)
    _one_error_line(_run("import-upstream", str(src), "-w", str(tmp_path / "ws"), "--split", "val"), "--split")
    _one_error_line(_run("import-upstream", str(tmp_path / "nope.parquet"), "-w", str(tmp_path / "ws")),
                    "file not found")
    assert not (tmp_path / "ws").exists()


# ------------------------------------------------------------------ 6. entry points
def test_version_and_python_dash_m():
    from fvqa import __version__

    res = _run("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"fvqa {__version__}"
    mod = subprocess.run([sys.executable, "-m", "fvqa", "--help"], capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert mod.returncode == 0 and "build" in mod.stdout
    assert "--install-completion" in mod.stdout and "--verbose" in mod.stdout


def _cells() -> list:
    from fvqa.eval.aggregate import Cell

    return [Cell(m, w, b, "k", 50, a, a - 0.05, a + 0.05, a, a, a, "acc", None, 0.5, 1, 1, 0.5, 0.4, 0)
            for m, w in (("model-a", "direct"), ("model-b", "search"))
            for b, a in (("fvqa", 0.9), ("mmsearch", 0.93), ("infoseek", 0.6))]


def test_report_bar_legend_sits_outside_the_axes(monkeypatch: pytest.MonkeyPatch):
    """Inside the axes the legend covered the tallest bars' error bars."""
    import fvqa.eval.report as report

    figs: list = []
    monkeypatch.setattr(report, "_png", lambda fig: figs.append(fig) or b"")
    report._plots(_cells())
    fig = figs[1]
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1


def test_report_html_title_has_no_backticks():
    from fvqa.eval.report import render_html

    title = "fvqa evaluation: run `demo`"
    page = render_html(title, f"# {title}\n", {})
    head, body = page.split("</head>", 1)
    assert "`" not in head and "`" not in body and "demo" in head
