"""A new user's install: `pip install -e '.[dev]'` with the pip a fresh Python 3.11 venv brings.

pip 23.2 (ensurepip's) resolved trafilatura without `lxml_html_clean`, and the crawl then failed at
import (`lxml.html.clean module is now a separate project`): the Makefile's venv only worked because
it upgrades pip first. Two checks, through the stock tools:

* every third-party module fvqa's code imports (anywhere, lazily too) maps to a distribution
  pyproject.toml declares (core dependencies; `fvqa/train/` may also use the training extras);
* the stock pip of a fresh venv, without our constraints file, resolves a set of distributions that
  holds every distribution loaded when each fvqa module and each module it names is imported here.

The resolution is pip's own (`--dry-run --report`, the registry only): installing the ~6 GB it
resolves again would add minutes and prove nothing more about the resolution.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from support.paths import REPO

pytestmark = pytest.mark.slow

TRAIN_EXTRAS = ("train", "train-cpu")
GPU_ONLY = {"vllm": "verl[vllm] in the train extra"}  # not importable on a CPU machine
OPTIONAL = {"colorama"}  # libraries import it only if present (click, tqdm on Linux)

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
import fvqa
from importlib.metadata import packages_distributions
names = json.loads(sys.argv[1])
for m in pkgutil.walk_packages(fvqa.__path__, "fvqa."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
missing = []
for n in names:
    try:
        importlib.import_module(n)
    except ModuleNotFoundError as exc:
        missing.append(exc.name)
pd = packages_distributions()
print(json.dumps({"dists": sorted({d for mod in list(sys.modules) for d in pd.get(mod.split(".")[0], [])}),
                  "missing": missing}))
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[\s<>=!~\[;]", req.strip(), maxsplit=1)[0])


def _imports() -> dict[str, set[Path]]:
    """Absolute imports of third-party modules in fvqa's code -> the files naming them."""
    stdlib = set(sys.stdlib_module_names)
    out: dict[str, set[Path]] = {}
    for path in (REPO / "fvqa").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                if name.split(".")[0] not in stdlib | {"fvqa"}:
                    out.setdefault(name, set()).add(path.relative_to(REPO))
    return out


def test_every_imported_distribution_is_declared() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for x in TRAIN_EXTRAS for r in project["optional-dependencies"][x]}
    ray_extra = {_requirement_name(r) for r in project["optional-dependencies"]["ray"]}  # executor: ray
    pd = packages_distributions()
    undeclared = []
    for name, files in sorted(_imports().items()):
        top = name.split(".")[0]
        if top in GPU_ONLY:
            continue
        dists = {_norm(d) for d in pd.get(top, [])}
        assert dists, f"{name} (imported in {sorted(map(str, files))}) is not installed here"
        for f in files:
            allowed = core | extras if f.parts[:2] == ("fvqa", "train") else core
            if top == "ray":  # imported only when a build asks for `executor: ray` (fvqa.executor)
                allowed = allowed | ray_extra
            if not dists & allowed:
                undeclared.append(f"{name} -> {'/'.join(sorted(dists))} (in {f})")
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)


def test_stock_pip_resolves_everything_the_code_loads(tmp_path: Path) -> None:
    names = sorted(_imports())
    probe = subprocess.run([sys.executable, "-c", IMPORT_ALL, json.dumps(names)], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    assert set(loaded["missing"]) <= set(GPU_ONLY), f"cannot import here: {loaded['missing']}"

    venv = tmp_path / "fresh"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True,
                   timeout=300)
    pip = venv / "bin" / "pip"
    version = subprocess.run([str(pip), "--version"], capture_output=True, text=True, check=True).stdout
    report = tmp_path / "report.json"
    res = subprocess.run([str(pip), "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
                          f"{REPO}[dev]"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{version}\n{res.stderr[-3000:]}"
    resolved = {_norm(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    needed = {_norm(d) for d in loaded["dists"]} - {"fvqa"} - OPTIONAL
    assert needed - resolved == set(), (
        f"{version.split(' from ')[0]} without constraints does not install {sorted(needed - resolved)}, "
        "which importing fvqa loads")
