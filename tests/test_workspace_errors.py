"""A workspace that cannot be opened is one red line naming the path and the problem (exit code 2),
never a traceback; reading (`fvqa status`, `fvqa sql`) never creates anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import duckdb
import pytest
from support.paths import FVQA, REPO

from fvqa import store
from fvqa.errors import WorkspaceError
from fvqa.store import Workspace


def _fvqa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FVQA, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def _one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


READ = [("status",), ("sql", "SELECT 1")]


@pytest.mark.parametrize("command", READ, ids=["status", "sql"])
def test_reading_a_missing_workspace_creates_nothing(tmp_path: Path, command: tuple[str, ...]):
    ws = tmp_path / "nope"
    _one_line_error(_fvqa(*command, "--workspace", str(ws)), f"no workspace at {ws}", "fvqa build")
    assert not ws.exists()


def test_reading_a_folder_without_database_creates_nothing(tmp_path: Path):
    (tmp_path / "ws").mkdir()
    _one_line_error(_fvqa("status", "--workspace", str(tmp_path / "ws")), "has no fvqa.duckdb", "fvqa build")
    assert _tree(tmp_path) == ["ws"]


@pytest.mark.parametrize("command", [*READ, ("export",)], ids=["status", "sql", "export"])
def test_workspace_path_that_is_a_file(tmp_path: Path, command: tuple[str, ...]):
    path = tmp_path / "ws"
    path.write_text("not a folder")
    _one_line_error(_fvqa(*command, "--workspace", str(path)), str(path), "is a file, not a folder")
    assert _tree(tmp_path) == ["ws"] and path.read_text() == "not a folder"


def test_workspace_under_a_file(tmp_path: Path):
    (tmp_path / "f").write_text("")
    _one_line_error(_fvqa("export", "--workspace", str(tmp_path / "f" / "ws")), f"{tmp_path / 'f'} is a file")
    assert _tree(tmp_path) == ["f"]


def test_images_that_is_a_file(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "images").write_text("")
    _one_line_error(_fvqa("export", "--workspace", str(ws)), str(ws), "images/ is a file, not a folder")
    assert _tree(ws) == ["images"]  # no database, no other folder created before failing


@pytest.mark.parametrize("command", [("status",), ("export",)], ids=["read", "write"])
def test_corrupt_database(tmp_path: Path, command: tuple[str, ...]):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "fvqa.duckdb").write_bytes(b"garbage, not a database" * 100)
    line = _one_line_error(_fvqa(*command, "--workspace", str(ws)), str(ws), "not a DuckDB database")
    assert "another fvqa process" not in line and "in use" not in line
    assert _tree(ws) == ["fvqa.duckdb"]


def test_database_that_is_a_folder(tmp_path: Path):
    ws = tmp_path / "ws"
    (ws / "fvqa.duckdb").mkdir(parents=True)
    for command in (("status",), ("export",)):
        _one_line_error(_fvqa(*command, "--workspace", str(ws)), "fvqa.duckdb is a folder")
    assert _tree(ws) == ["fvqa.duckdb"]


def test_duckdb_file_that_is_not_a_workspace(tmp_path: Path):
    ws = tmp_path / "ws"
    ws.mkdir()
    duckdb.connect(str(ws / "fvqa.duckdb")).close()
    _one_line_error(_fvqa("status", "--workspace", str(ws)), "not an fvqa workspace")


def test_workspace_locked_by_another_process(tmp_path: Path):
    with Workspace(tmp_path / "ws"):  # this test process holds the write lock
        for command in (("status",), ("sql", "SELECT 1"), ("export",)):
            line = _one_line_error(_fvqa(*command, "--workspace", str(tmp_path / "ws")),
                                   "in use by another process", f"(PID {os.getpid()})")
            assert "not a DuckDB database" not in line
    res = _fvqa("status", "--workspace", str(tmp_path / "ws"))  # lock released: it reads
    assert res.returncode == 0, res.stderr


def test_status_on_a_built_workspace_creates_no_folder(tmp_path: Path):
    with Workspace(tmp_path / "ws"):
        pass
    for sub in ("images", "cache", "exports"):
        (tmp_path / "ws" / sub).rmdir()
    before = _tree(tmp_path / "ws")
    assert _fvqa("status", "--workspace", str(tmp_path / "ws")).returncode == 0
    assert _tree(tmp_path / "ws") == before


# Permission problems: running as root ignores file modes, so these simulate a refused access.
def _deny(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    real = os.access
    monkeypatch.setattr(store.os, "access", lambda p, mode: False if Path(p) == denied else real(p, mode))


def test_unwritable_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _deny(monkeypatch, tmp_path)
    with pytest.raises(WorkspaceError, match=f"cannot create workspace .*: permission denied in {tmp_path}$"):
        Workspace(tmp_path / "ws")
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("sub", ["images", "cache", "exports"])
def test_unwritable_subfolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sub: str):
    (tmp_path / "ws" / sub).mkdir(parents=True)
    _deny(monkeypatch, tmp_path / "ws" / sub)
    with pytest.raises(WorkspaceError, match=f"{sub}/ is not writable"):
        Workspace(tmp_path / "ws")


def test_read_only_database_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with Workspace(tmp_path / "ws"):
        pass
    _deny(monkeypatch, tmp_path / "ws" / "fvqa.duckdb")
    with pytest.raises(WorkspaceError, match="fvqa.duckdb is read-only"):
        Workspace(tmp_path / "ws")


@pytest.mark.parametrize(("message", "says"), [
    ('IO Error: Cannot open file "/x/fvqa.duckdb": Permission denied', "permission denied"),
    ('IO Error: Could not set lock on file "/x/fvqa.duckdb": Conflicting lock is held in /bin/py (PID 42).',
     "in use by another process (PID 42)"),
    ('IO Error: Cannot open file "/x/fvqa.duckdb": Read-only file system', "read-only file system"),
    ("IO Error: something new", "cannot open workspace /x: IO Error: something new"),
    # the path's own words do not decide: a folder named "block" or "version" is not a lock or a version
    ('IO Error: The file "/block/version/fvqa.duckdb" exists, but it is not a valid DuckDB database file!',
     "is not a DuckDB database"),
])
def test_duckdb_refusals_are_told_apart(message: str, says: str):
    assert says in store._open_failure(Path("/x"), Path("/x/fvqa.duckdb"), duckdb.IOException(message))
