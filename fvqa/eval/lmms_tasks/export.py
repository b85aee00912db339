"""Write the task pack's data files (and a ready task folder) from an fvqa eval config.

    python -m fvqa.eval.lmms_tasks.export --config eval.yaml --out DIR

For every benchmark of the config: ``DIR/data/<benchmark>.parquet`` (the items exactly as `fvqa eval
run` loads them: same validation, same ``limit``/``seed`` sample, rows by item id so lmms-eval's
``doc_id`` equals the one in fvqa's lmms-eval-shaped outputs) and ``DIR/fvqa_<benchmark>_direct.yaml``;
plus ``DIR/_default_template_yaml`` and a ``DIR/utils.py`` that re-exports
`fvqa.eval.lmms_tasks.utils`. Then: ``lmms-eval --include_path DIR --tasks fvqa_<benchmark>_direct``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from fvqa.eval.lmms import VERSION, lmms_doc, task_name
from fvqa.eval.lmms_tasks.utils import metric_names

PACK_DIR = Path(__file__).resolve().parent
TEMPLATE = "_default_template_yaml"
DEFAULT_BENCHMARKS = {"fvqa_test": "fvqa", "infoseek": "infoseek", "mmsearch": "mmsearch",
                      "simplevqa": "simplevqa", "livevqa": "livevqa"}
"""The benchmark names of `configs/eval_demo.yaml`: the YAMLs shipped in this folder."""
UTILS_SHIM = ('"""The task pack\'s functions (lmms-eval loads this file by path)."""\n\n'
              "from fvqa.eval.lmms_tasks.utils import doc_to_target, doc_to_text, doc_to_visual, process_results\n\n"
              '__all__ = ["doc_to_target", "doc_to_text", "doc_to_visual", "process_results"]\n')


def task_yaml(benchmark: str, kind: str) -> str:
    """The YAML of one direct task (its metric list is what `utils.process_results` returns for `kind`)."""
    lines = [
        f"# fvqa benchmark {benchmark!r} ({kind}), direct workflow; data: python -m fvqa.eval.lmms_tasks.export",
        f"include: {TEMPLATE}",
        f"task: {task_name(benchmark, 'direct')}",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: data/{benchmark}.parquet",
        "metric_list:",
    ]
    for name in metric_names(kind):
        lines += [f"  - metric: {name}", "    aggregation: mean", "    higher_is_better: true"]
    lines += ["metadata:", f"  version: {VERSION}", f"  benchmark: {benchmark}", f"  benchmark_kind: {kind}",
              "  workflow: direct", ""]
    return "\n".join(lines)


def doc_rows(items: list[Any]) -> list[dict[str, Any]]:
    """Data-file rows: `lmms_doc` of each item (by item id) plus the image bytes."""
    import hashlib
    import json

    rows = []
    for it in sorted(items, key=lambda i: i.item_id):
        row = {"item_id": it.item_id, "benchmark": it.benchmark, "kind": it.kind, "question": it.question,
               "answer": it.answer, "aliases": list(it.aliases),
               "answer_eval": json.dumps(it.answer_eval, ensure_ascii=False) if it.answer_eval is not None else None,
               "question_type": it.question_type, "image_sha256": hashlib.sha256(it.image).hexdigest()}
        rows.append({**lmms_doc(row), "image": it.image})
    return rows


def export(config: Path, out: Path) -> list[Path]:
    """Write data files and task YAMLs for every benchmark of `config` into `out`; returns the files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fvqa.eval.benchmarks import load_benchmark
    from fvqa.eval.config import load_eval_config

    cfg = load_eval_config(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    written = [out / TEMPLATE, out / "utils.py"]
    shutil.copyfile(PACK_DIR / TEMPLATE, written[0])
    written[1].write_text(UTILS_SHIM, encoding="utf-8")
    for spec in cfg.benchmarks:
        res = load_benchmark(spec, limit=spec.limit or cfg.limit, seed=cfg.seed)
        data = out / "data" / f"{spec.name}.parquet"
        pq.write_table(pa.Table.from_pylist(doc_rows(res.items)), data)
        task = out / f"{task_name(spec.name, 'direct')}.yaml"
        task.write_text(task_yaml(spec.name, spec.kind), encoding="utf-8")
        written += [data, task]
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="an fvqa eval config (its benchmarks)")
    parser.add_argument("--out", type=Path, required=True, help="the task folder to write (--include_path)")
    args = parser.parse_args(argv)
    for path in export(args.config, args.out):
        print(path)


if __name__ == "__main__":
    main()
