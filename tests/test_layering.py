"""Import layering: shared leaves stay at the bottom, so lower layers never depend on evaluation.

Read from the source with `ast` (nothing is imported), so a lazy import inside a function counts
the same as one at the top of a module.
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


def imports_of(source: str, module: str = "fvqa", is_package: bool = False) -> set[tuple[str, str | None]]:
    """(module, imported name or None) for every import statement in `source`, relative ones resolved.

    ``from a.b import c`` yields ("a.b", "c") and ("a.b.c", None), since ``c`` may be a submodule.
    """
    out: set[tuple[str, str | None]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                out.add((base, alias.name))
                out.add((f"{base}.{alias.name}", None))
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
    """fvqa.answers and fvqa.formats.infoseek sit at the bottom: they depend on no other fvqa module."""
    files = [PACKAGE / "answers.py", PACKAGE / "formats" / "infoseek.py"]
    assert _violations(files, lambda mod, name: _is_under(mod, "fvqa")) == []


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
