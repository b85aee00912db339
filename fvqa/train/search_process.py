"""The search service a training run needs, started for it when the config names none.

``fvqa.search_url: null`` with ``fvqa.search_config: RUN.yaml`` means: serve RUN.yaml's ``search``
section for this run only. The service runs as ``fvqa search serve`` in a child process on a free
loopback port (one cache and one rate limit for every rollout worker), is health-checked before
veRL starts, and is stopped when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError, FvqaError
from fvqa.train.agent_loop import LoopSettings

START_TIMEOUT_S = 180.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def search_config_path(cfg: Any, config_file: Path) -> Path | None:
    """``fvqa.search_config`` resolved against the training config's folder (None: not needed)."""
    settings = LoopSettings.from_trainer_config(cfg)
    if settings.search_url:
        return None
    if not settings.search_config:
        raise ConfigError("fvqa.search_url is null and fvqa.search_config is not set: name the run config "
                          "whose `search` section to serve, or point fvqa.search_url at `fvqa search serve`")
    path = Path(settings.search_config).expanduser()
    path = path if path.is_absolute() else (config_file.parent / path)
    if not path.is_file():
        raise ConfigError(f"fvqa.search_config not found: {path}")
    return path.resolve()


def _healthy(url: str) -> bool:
    import httpx

    try:
        resp = httpx.get(url + "/healthz", timeout=2.0, trust_env=False)
        return resp.status_code == 200 and resp.json().get("status") == "ok"
    except (httpx.HTTPError, ValueError):
        return False


@contextlib.contextmanager
def search_service(run_config: Path, log_path: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``run_config``'s search section until the block ends; yields the service URL."""
    port = free_port(host)
    url = f"http://{host}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fvqa.cli", "search", "serve", "--config", str(run_config),
           "--host", host, "--port", str(port)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=Path.cwd())
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                raise FvqaError(f"the search service over {run_config} exited ({proc.returncode}): "
                                f"{' | '.join(tail) or 'no output'} (log: {log_path})")
            if time.monotonic() > deadline:
                raise FvqaError(f"the search service over {run_config} did not answer within "
                                f"{START_TIMEOUT_S:.0f} s (log: {log_path})")
            time.sleep(0.2)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
