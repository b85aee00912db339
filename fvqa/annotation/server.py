"""Run Label Studio headless on 127.0.0.1 from its own venv (its pins clash with ours).

First use installs `label-studio` into a venv and builds a migrated template database once; a
fresh data dir then starts from a copy of it (seconds instead of a minute of migrations). The API
key and admin password reach Label Studio through its environment only, never argv or files we
write. `fvqa-server.json` in the data dir records pid, port and URL (no secrets) for stop/status.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from fvqa.errors import FvqaError

LS_REQUIREMENT = "label-studio>=1.23,<1.24"
STATE_FILE = "fvqa-server.json"
READY_MARK = ".fvqa-ready"
ADMIN_USER = "admin@fvqa.local"


def default_venv() -> Path:
    """Where the Label Studio venv lives: $FVQA_LS_VENV, else ~/.cache/fvqa/label-studio-venv."""
    env = os.environ.get("FVQA_LS_VENV")
    return Path(env) if env else Path.home() / ".cache" / "fvqa" / "label-studio-venv"


def default_data_dir() -> Path:
    """Label Studio's own database and media: $FVQA_LS_DATA, else ~/.local/share/fvqa/label-studio."""
    env = os.environ.get("FVQA_LS_DATA")
    return Path(env) if env else Path.home() / ".local" / "share" / "fvqa" / "label-studio"


@dataclass
class ServerInfo:
    """A started server, as recorded in the state file."""

    url: str
    port: int
    pid: int
    data_dir: str
    document_root: str
    venv: str
    username: str
    started_at: float


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive file lock, so two test sessions never install into one venv at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 1800) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise FvqaError(f"{what} failed (exit {proc.returncode}): {tail}")


def ensure_venv(venv: Path, log: Callable[[str], None] = print) -> Path:
    """Install Label Studio into `venv` unless already done; return its `label-studio` executable."""
    venv = venv.resolve()
    exe = venv / "bin" / "label-studio"
    if (venv / READY_MARK).exists() and exe.exists():
        return exe
    with _locked(venv.parent / f".{venv.name}.lock"):
        if (venv / READY_MARK).exists() and exe.exists():
            return exe
        if venv.exists() and not exe.exists():
            shutil.rmtree(venv)  # a half-made venv from an interrupted install
        log(f"installing {LS_REQUIREMENT} into {venv} (one time, a few minutes)...")
        if not venv.exists():
            base = getattr(sys, "_base_executable", sys.executable)
            _run([base, "-m", "venv", str(venv)], "creating the Label Studio venv")
        _run([str(venv / "bin" / "pip"), "install", "-q", LS_REQUIREMENT], f"pip install {LS_REQUIREMENT}")
        (venv / READY_MARK).write_text(LS_REQUIREMENT)
    return exe


def _ls_env(data_dir: Path, document_root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "DJANGO_SETTINGS_MODULE")}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
    })
    env.update(extra or {})
    return env


def ensure_template(venv: Path, log: Callable[[str], None] = print) -> Path:
    """A migrated, user-less `label_studio.sqlite3` kept next to the venv (made once, ~1-3 min)."""
    venv = venv.resolve()
    template = venv / "fvqa-template" / "label_studio.sqlite3"
    if template.exists():
        return template
    with _locked(venv.parent / f".{venv.name}.template.lock"):
        if template.exists():
            return template
        log("migrating a template Label Studio database (one time)...")
        work = Path(tempfile.mkdtemp(prefix="ls-template-", dir=venv))
        try:
            pkg = subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import label_studio, os; print(os.path.dirname(label_studio.__file__))"],
                capture_output=True, text=True, check=True).stdout.strip()
            _run([str(venv / "bin" / "python"), str(Path(pkg) / "manage.py"), "migrate", "--no-color", "-v", "0"],
                 "migrating the Label Studio database", env=_ls_env(work, work), timeout=1800)
            template.parent.mkdir(exist_ok=True)
            tmp = template.with_suffix(".part")
            shutil.copy2(work / "label_studio.sqlite3", tmp)
            os.replace(tmp, template)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return template


def free_port() -> int:
    """A loopback port nobody listens on right now (Label Studio would silently move off a busy one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_state(data_dir: Path) -> ServerInfo | None:
    """The recorded server for a data dir, or None."""
    path = Path(data_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        return ServerInfo(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_label_studio(pid: int) -> bool:
    """Whether pid still runs Label Studio (a recorded pid may have been reused after a reboot)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _alive(pid)  # no /proc (macOS): trust the liveness check
    return b"label-studio" in cmdline or b"label_studio" in cmdline


def healthy(url: str, timeout: float = 3.0) -> bool:
    """True when `/health` answers UP."""
    try:
        r = httpx.get(f"{url}/health", timeout=timeout)
        return r.status_code == 200 and "UP" in r.text
    except httpx.HTTPError:
        return False


def _log_tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def start(data_dir: Path, document_root: Path, api_key: str, *, password: str | None = None,
          venv: Path | None = None, port: int | None = None, timeout: float = 600,
          log: Callable[[str], None] = print) -> ServerInfo:
    """Start (or find running) Label Studio for `data_dir`, serving local files under `document_root`."""
    if len(api_key) < 8:
        raise FvqaError("the Label Studio API key must have at least 8 characters")
    data_dir, document_root = Path(data_dir).resolve(), Path(document_root).resolve()
    current = read_state(data_dir)
    if current and _alive(current.pid) and _is_label_studio(current.pid) and healthy(current.url):
        log(f"Label Studio already running at {current.url} (pid {current.pid})")
        return current
    venv = (venv or default_venv()).resolve()
    exe = ensure_venv(venv, log)
    data_dir.mkdir(parents=True, exist_ok=True)
    db = data_dir / "label_studio.sqlite3"
    if not db.exists():
        shutil.copy2(ensure_template(venv, log), db)
    if port is None:
        port = free_port()
    elif _port_busy(port):
        raise FvqaError(f"port {port} on 127.0.0.1 is already in use: pick another --port or omit it")
    env = _ls_env(data_dir, document_root, {
        "LABEL_STUDIO_USERNAME": ADMIN_USER,
        "LABEL_STUDIO_PASSWORD": password or api_key,
        "LABEL_STUDIO_USER_TOKEN": api_key,
    })
    logfile = data_dir / "label-studio.log"
    with open(logfile, "ab") as fh:
        proc = subprocess.Popen(
            [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data_dir), "--enable-legacy-api-token"],
            env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if proc.poll() is not None:
            raise FvqaError(f"Label Studio exited during start (code {proc.returncode}); log {logfile}:\n"
                            f"{_log_tail(logfile)}")
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise FvqaError(f"Label Studio did not answer {url}/health within {timeout:.0f}s; log {logfile}")
        time.sleep(0.5)
    # the port might have been taken between our check and its bind (it then moves on silently)
    who = httpx.get(f"{url}/api/current-user/whoami", headers={"Authorization": f"Token {api_key}"}, timeout=30)
    if who.status_code != 200 or who.json().get("email") != ADMIN_USER:
        _terminate(proc.pid)
        raise FvqaError(f"{url} answers but is not the server just started (port race?); try again")
    info = ServerInfo(url=url, port=port, pid=proc.pid, data_dir=str(data_dir), document_root=str(document_root),
                      venv=str(venv), username=ADMIN_USER, started_at=time.time())
    (data_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=1))
    return info


def _terminate(pid: int, grace: float = 20.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def stop(data_dir: Path) -> bool:
    """Stop the server recorded for `data_dir`; False when none was running."""
    data_dir = Path(data_dir).resolve()
    info = read_state(data_dir)
    if info is None:
        return False
    running = _alive(info.pid) and _is_label_studio(info.pid)
    if running:
        _terminate(info.pid)
    (data_dir / STATE_FILE).unlink(missing_ok=True)
    return running


def status(data_dir: Path) -> dict[str, object]:
    """What a user needs to know: recorded? process alive? health answering?"""
    info = read_state(Path(data_dir).resolve())
    if info is None:
        return {"running": False, "data_dir": str(data_dir)}
    alive = _alive(info.pid) and _is_label_studio(info.pid)
    return {**asdict(info), "running": alive, "healthy": alive and healthy(info.url)}
