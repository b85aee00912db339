"""Import layering: shared leaves stay at the bottom, lower layers never depend on evaluation, and no
two packages import each other (directly or around a longer circle).

Read from the source with `ast` (nothing is imported), so a lazy import inside a function (or under
`if TYPE_CHECKING:`) counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fvqa"

# Answer normalisation lives in fvqa.answers; these layers must not reach into eval for it.
ANSWER_NAMES = {"normalize_answer", "exact_match", "sub_exact_match", "gold_list"}
BELOW_EVAL = ("pipelines", "textgen", "annotation", "train")

Rule = Callable[[str, str | None], bool]


def _module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(source: str, module: str = "fvqa", is_package: bool = False) -> list[tuple[int, str, str | None]]:
    """(line, module, imported name or None) for every import in `source`, at any depth, relative ones resolved.

    ``import a.b`` yields (line, "a.b", None); ``from a.b import c`` yields (line, "a.b", "c").
    """
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            out += [(node.lineno, base, alias.name) for alias in node.names]
    return sorted(out, key=str)


def imports_of(source: str, module: str = "fvqa", is_package: bool = False) -> set[tuple[str, str | None]]:
    """(module, imported name or None) for every import statement in `source`, relative ones resolved.

    ``from a.b import c`` yields ("a.b", "c") and ("a.b.c", None), since ``c`` may be a submodule.
    """
    out: set[tuple[str, str | None]] = set()
    for _, base, name in import_statements(source, module, is_package):
        out.add((base, name))
        if name is not None:
            out.add((f"{base}.{name}", None))
    return out


def _sources(*layers: str) -> list[Path]:
    files = sorted(p for layer in layers for p in (PACKAGE / layer).rglob("*.py"))
    assert files, f"no source files found under {layers}"
    return files


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _violations(files: list[Path], bad: Rule) -> list[str]:
    found = []
    for path in files:
        imports = imports_of(path.read_text(encoding="utf-8"), _module_of(path), path.name == "__init__.py")
        found += [f"{path.relative_to(PACKAGE.parent)}: {mod}{'.' + name if name else ''}"
                  for mod, name in sorted(imports, key=str) if bad(mod, name)]
    return found


def _eval_imports_pipelines(mod: str, name: str | None) -> bool:
    return _is_under(mod, "fvqa.pipelines")


def _scores_answers_via_eval(mod: str, name: str | None) -> bool:
    return _is_under(mod, "fvqa.eval.metrics") or (_is_under(mod, "fvqa.eval") and name in ANSWER_NAMES)


def test_eval_does_not_import_pipelines() -> None:
    """Evaluation reads the InfoSeek format from fvqa.formats.infoseek, not from the build stage."""
    assert _violations(_sources("eval"), _eval_imports_pipelines) == []


def test_lower_layers_do_not_import_eval_metrics() -> None:
    """Pipelines, textgen, annotation and train score answers with fvqa.answers, not fvqa.eval.metrics."""
    assert _violations(_sources(*BELOW_EVAL), _scores_answers_via_eval) == []


def test_shared_leaves_import_nothing_from_fvqa() -> None:
    """fvqa.answers and fvqa.formats (InfoSeek, JSONL, the veRL row, record shapes) sit at the bottom:
    they depend on no other fvqa module (the formats modules only on each other)."""
    assert _violations([PACKAGE / "answers.py"], lambda mod, name: _is_under(mod, "fvqa")) == []
    formats = sorted((PACKAGE / "formats").glob("*.py"))
    assert _violations(formats, lambda mod, name: _is_under(mod, "fvqa") and not _is_under(mod, "fvqa.formats")) == []


@pytest.mark.parametrize(
    ("source", "module", "rule"),
    [
        ("from fvqa.pipelines.infoseek import read_jsonl", "fvqa.eval.benchmarks", _eval_imports_pipelines),
        ("def f():\n    import fvqa.pipelines.infoseek", "fvqa.eval.benchmarks", _eval_imports_pipelines),
        ("from fvqa import pipelines", "fvqa.eval.benchmarks", _eval_imports_pipelines),
        ("from ..pipelines import infoseek", "fvqa.eval.benchmarks", _eval_imports_pipelines),
        ("from fvqa.eval.metrics import normalize_answer", "fvqa.train.reward", _scores_answers_via_eval),
        ("from fvqa.eval import metrics", "fvqa.train.reward", _scores_answers_via_eval),
        ("from fvqa.eval.scoring import exact_match", "fvqa.pipelines.probe", _scores_answers_via_eval),
        ("from ..eval.metrics import exact_match", "fvqa.pipelines.probe", _scores_answers_via_eval),
    ],
)
def test_the_checks_catch_a_forbidden_import(source: str, module: str, rule: Rule) -> None:
    assert any(rule(mod, name) for mod, name in imports_of(source, module))


def test_allowed_imports_pass() -> None:
    ok = imports_of("from fvqa.answers import normalize_answer\nfrom fvqa.formats.infoseek import read_jsonl")
    assert not any(_eval_imports_pipelines(m, n) or _scores_answers_via_eval(m, n) for m, n in ok)


# --- no import cycles between packages ------------------------------------------------------------

Edge = tuple[str, int, str]  # (importing module, line, imported fvqa module)


def node_of(module: str) -> str:
    """The graph node of an fvqa module: its top-level package (`fvqa.search.config` -> `fvqa.search`);
    a top-level module is its own node (`fvqa.config`)."""
    return ".".join(module.split(".")[:2])


def package_edges(modules: dict[str, str], packages: set[str]) -> dict[tuple[str, str], list[Edge]]:
    """(node, node) -> the import statements behind it, for `modules` (name -> source; `packages` are
    the ones that are an `__init__.py`) inside fvqa.

    An import resolves to the deepest of `modules` that it names (``from fvqa.x import y`` is the
    module ``fvqa.x.y`` when that exists, else ``fvqa.x``). Imports within one node, and the implicit
    import of `fvqa/__init__.py` by every submodule, are not edges.
    """
    known = set(modules)
    edges: dict[tuple[str, str], list[Edge]] = {}
    for module, source in modules.items():
        for line, base, name in import_statements(source, module, module in packages):
            target = f"{base}.{name}" if name and f"{base}.{name}" in known else base
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target not in known or target == "fvqa":
                continue
            a, b = node_of(module), node_of(target)
            if a != b:
                edges.setdefault((a, b), []).append((module, line, target))
    return edges


def import_cycles(edges: dict[tuple[str, str], list[Edge]]) -> list[list[str]]:
    """Every elementary cycle of the node graph, each as [n0, n1, ..., n0] starting at its smallest node."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)
    cycles: list[list[str]] = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(succ.get(path[-1], ())):
            if nxt == start:
                cycles.append([*path, start])
            elif nxt > start and nxt not in path:  # each cycle once: only from its smallest node
                walk(start, [*path, nxt])

    for start in sorted(succ):
        walk(start, [start])
    return cycles


def describe_cycles(cycles: list[list[str]], edges: dict[tuple[str, str], list[Edge]]) -> str:
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:], strict=False):
            lines += [f"    {a} -> {b}: {mod} line {line} imports {target}" for mod, line, target in edges[(a, b)]]
    return "\n".join(lines)


def fvqa_sources() -> tuple[dict[str, str], set[str]]:
    """Every fvqa module's source by name, and the names that are packages."""
    paths = sorted(PACKAGE.rglob("*.py"))
    return ({_module_of(p): p.read_text(encoding="utf-8") for p in paths},
            {_module_of(p) for p in paths if p.name == "__init__.py"})


def test_no_import_cycles_between_packages() -> None:
    """Packages (and top-level modules) form a DAG: a cycle means two places share one fact."""
    edges = package_edges(*fvqa_sources())
    cycles = import_cycles(edges)
    assert not cycles, f"{len(cycles)} import cycle(s) between fvqa packages:\n" + describe_cycles(cycles, edges)


def test_the_cycle_check_finds_a_lazy_circle_and_names_its_lines() -> None:
    modules = {
        "fvqa.config": "from fvqa.search.config import SearchConfig\n",
        "fvqa.search": "",
        "fvqa.search.config": "def load():\n    from ..config import RunConfig\n",
        "fvqa.store": "from fvqa import config\n",  # `from fvqa import config` is the module fvqa.config
        "fvqa.pipelines": "",
        "fvqa.pipelines.crawl": "from . import sources\nfrom fvqa.store import now\n",
        "fvqa.pipelines.crawl.sources": "import fvqa.config\n",
    }
    edges = package_edges(modules, {"fvqa.search", "fvqa.pipelines", "fvqa.pipelines.crawl"})
    assert import_cycles(edges) == [["fvqa.config", "fvqa.search", "fvqa.config"]]
    assert edges[("fvqa.search", "fvqa.config")] == [("fvqa.search.config", 2, "fvqa.config")]
    assert ("fvqa.pipelines", "fvqa.pipelines") not in edges and ("fvqa.store", "fvqa.config") in edges
    text = describe_cycles(import_cycles(edges), edges)
    assert "fvqa.search.config line 2 imports fvqa.config" in text
