"""Where library chatter goes: a log file in the workspace, the terminal only with `-v`.

The libraries a build loads talk a lot: open_clip logs `No pretrained weights...` through the root
logger (whose first `logging.warning` call installs a stderr handler for everyone, so bm25s's DEBUG
lines follow), `datasets` and `huggingface_hub` draw tqdm bars, transformers prints advisories. The
terminal is for fvqa's own progress and summaries, so `setup_logging` sends every log record and
Python warning to `<workspace>/logs/<command>-<UTC time>.log` and keeps the terminal quiet unless
`verbose`. fvqa's own one-line notes (config deprecations) still reach the terminal: see `fvqa.cli`.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_fvqa_handler"  # set on the handlers installed here, so a second setup replaces them
# libraries that log at DEBUG per call or per file: kept at INFO even in the file
_CHATTY = ("PIL", "matplotlib", "urllib3", "filelock", "fsspec", "httpcore", "httpx", "asyncio", "numba",
           "trafilatura", "htmldate", "courlan", "justext", "charset_normalizer")
# progress bars and advisories of the Hugging Face stack, off unless verbose (read at their import)
_QUIET_ENV = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


_asked = {"verbose": False}  # once a command line asked for -v, later setups in the process keep it


def log_path(workspace: Path, command: str, when: datetime | None = None) -> Path:
    """`<workspace>/logs/<command>-<UTC timestamp>.log` (one file per invocation)."""
    stamp = (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return Path(workspace) / "logs" / f"{command}-{stamp}-{os.getpid()}.log"


def _installed(root: logging.Logger) -> None:
    """Drop the handlers a previous setup (or an early `logging.warning` basicConfig) put on root."""
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False) or type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
            if isinstance(handler, logging.FileHandler):
                handler.close()


def _quiet_libraries(verbose: bool) -> None:
    """Progress bars and library verbosity: via the environment for libraries not imported yet,
    through their own switches for those already loaded; their loggers propagate to root."""
    if not verbose:
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if verbose else datasets.disable_progress_bars)()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if verbose else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_info() if verbose else hf_logging.set_verbosity_error()
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()


def setup_logging(workspace: Path | None, command: str, *, verbose: bool = False,
                  console: Console | None = None) -> Path | None:
    """Route every log record and Python warning: to a new log file under `workspace` (None: no
    file), and to `console` (stderr) when `verbose` — else only errors reach the terminal, and only
    when there is no file to hold them. Returns the log file's path. Safe to call twice."""
    verbose = _asked["verbose"] = verbose or _asked["verbose"]
    root = logging.getLogger()
    _installed(root)
    root.setLevel(logging.DEBUG)
    path = None
    if workspace is not None:
        path = log_path(workspace, command)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8", delay=True)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        file_handler.setLevel(logging.DEBUG)
        setattr(file_handler, _MARK, True)
        root.addHandler(file_handler)
    if verbose or path is None:
        term = RichHandler(console=console or Console(stderr=True), show_path=False, markup=False,
                           rich_tracebacks=False, log_time_format="[%X]")
        term.setLevel(logging.DEBUG if verbose else logging.ERROR)
        setattr(term, _MARK, True)
        root.addHandler(term)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.showwarning -> the `py.warnings` logger
    _quiet_libraries(verbose)
    return path
