"""lmms-eval-shaped outputs of a run: `results.json` and `samples_<task>.jsonl` per model.

lmms-eval is the harness this field already runs; writing its output shapes lets people feed our
numbers to the tools they use on lmms-eval logs. Task names are ``fvqa_<benchmark>_<workflow>``
(prefixed so they never collide with lmms-eval's built-in tasks, e.g. its F1-only ``mmsearch``).
Metric keys follow lmms-eval's ``"<metric>,<filter>"`` convention with the ``none`` filter.
Predictions that are not scored (failed model or judge call, asked again by the next run) are not
samples: ``n-samples`` counts them apart (``original`` = all, ``effective`` = scored) and a task with
nothing scored has null metrics.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fvqa.eval.aggregate import cells, scored_rows, unscored, unscored_note
from fvqa.store import Workspace


def task_name(benchmark: str, workflow: str) -> str:
    return f"fvqa_{benchmark}_{workflow}".replace("-", "_").replace(".", "_")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 and 0 <= p <= 1 else 0.0


def write_lmms_outputs(ws: Workspace, run: str, out_dir: Path) -> list[Path]:
    """One folder per model with `results.json` and one samples file per task; returns the files."""
    rows = scored_rows(ws, run)
    written: list[Path] = []
    by_model: dict[str, list[Any]] = {}
    counts = unscored(ws, run)
    for c in cells(rows, n_resamples=200, unscored_counts=counts):
        by_model.setdefault(c.model, []).append(c)
    for model, cs in by_model.items():
        folder = out_dir / model
        results, configs, n_samples = {}, {}, {}
        for c in cs:
            task = task_name(c.benchmark, c.workflow)
            if c.n:
                results[task] = {
                    "alias": task, "accuracy,none": c.accuracy, "accuracy_stderr,none": _stderr(c.accuracy, c.n),
                    "exact_match,none": c.em, "sub_exact_match,none": c.subem,
                    f"{c.official_name},none": c.official, "search_ratio,none": c.search_ratio,
                }
                if c.judge is not None:
                    results[task]["llm_judge,none"] = c.judge
            else:  # nothing scored: no numbers rather than zeros
                results[task] = {"alias": task, "accuracy,none": None, "accuracy_stderr,none": None}
            configs[task] = {"task": task, "dataset_path": c.benchmark, "output_type": "generate_until",
                             "metadata": {"workflow": c.workflow, "benchmark_kind": c.kind, "harness": "fvqa"}}
            n_samples[task] = {"original": c.n + c.not_scored, "effective": c.n,
                               "not_scored_model_call_failed": c.not_scored_model,
                               "not_scored_judge_call_failed": c.not_scored_judge,
                               "not_scored_pending": c.not_scored_pending}
            samples = [r for r in rows if r["model"] == model and r["benchmark"] == c.benchmark
                       and r["workflow"] == c.workflow]
            lines = []
            for doc_id, r in enumerate(samples):
                traj = json.loads(r["trajectory"])
                lines.append(json.dumps({
                    "doc_id": doc_id,
                    "doc": {"id": r["item_id"], "question": r["question"], "answer": r["answer"],
                            "aliases": list(r["aliases"] or [])},
                    "target": r["answer"],
                    "resps": [[t["text"] for t in traj.get("turns", [])]],
                    "filtered_resps": [r["prediction"] or ""],
                    "accuracy": r["score"], "exact_match": r["em"], "sub_exact_match": r["subem"],
                    "llm_judge": r["judge"], "n_image_search": r["n_image_search"],
                    "n_text_search": r["n_text_search"],
                }, ensure_ascii=False, default=str))
            path = folder / f"samples_{task}.jsonl"
            _atomic_write(path, "".join(line + "\n" for line in lines))
            written.append(path)
        doc = {"results": results, "configs": configs, "versions": dict.fromkeys(results, "fvqa-1"),
               "n-samples": n_samples, "config": {"model": model, "model_args": "", "run": run},
               "date": datetime.now(UTC).isoformat(),
               "fvqa_not_scored_note": unscored_note({k: u for k, u in counts.items() if k[0] == model})}
        path = folder / "results.json"
        _atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False))
        written.append(path)
    return written
