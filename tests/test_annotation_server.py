"""Server bookkeeping without starting Label Studio: stale state files never kill a stranger."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fvqa.annotation import server


def test_stale_state_with_a_reused_pid_is_not_killed(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / server.STATE_FILE).write_text(json.dumps(dict(
            url="http://127.0.0.1:9", port=9, pid=other.pid, data_dir=str(tmp_path), document_root=str(tmp_path),
            venv=str(tmp_path), username=server.ADMIN_USER, started_at=0.0)))
        assert server.status(tmp_path)["running"] is False
        assert server.stop(tmp_path) is False
        assert other.poll() is None, "a process that is not Label Studio must survive `server stop`"
        assert not (tmp_path / server.STATE_FILE).exists()
    finally:
        other.kill()
        other.wait()


def test_defaults_follow_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FVQA_LS_VENV", str(tmp_path / "v"))
    monkeypatch.setenv("FVQA_LS_DATA", str(tmp_path / "d"))
    assert server.default_venv() == tmp_path / "v" and server.default_data_dir() == tmp_path / "d"
    assert server.read_state(tmp_path / "d") is None
    port = server.free_port()
    assert 0 < port < 65536 and not server._port_busy(port)
