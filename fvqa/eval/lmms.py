"""lmms-eval-shaped outputs of a run: per model, a timestamped results file and one samples file per task.

lmms-eval is the harness this field already runs; writing its files as it writes them lets its own
tooling (the TUI log browser, the job scheduler's output parser, `--baseline` paired comparisons,
Hugging Face result cards) read our numbers. The layout follows lmms-eval 0.7.3's writer
(`lmms_eval/loggers/evaluation_tracker.py`, `EvaluationTracker.save_results_aggregated` and
`save_results_samples`; keys from `lmms_eval/evaluator.py`, `evaluate` / `simple_evaluate`):

* ``<out_dir>/<model_name_sanitized>/<date_id>_results.json`` and
  ``<date_id>_samples_<task>.jsonl``, ``date_id`` as `lmms_eval.utils.get_datetime_str` formats it
  (``%Y%m%d_%H%M%S``; here in UTC, lmms-eval defaults to Asia/Singapore). Every write gets a new
  date id, one second later if the current one is taken, so a re-run never overwrites an earlier one.
* results: ``results`` (``"<metric>,none"`` values, ``"<metric>_stderr,none"``, ``alias``,
  ``samples``), ``group_subtasks``, ``configs``, ``versions``, ``n-shot`` (0), ``higher_is_better``
  (a bool per metric), ``n-samples`` (``original``/``effective`` plus our not-scored counts),
  ``config`` (``model``, ``model_args``, ...), ``git_hash``, ``date``, ``task_hashes`` (lmms-eval's:
  sha256 over ``"sample_<i>" + doc_hash`` of the task's samples), then the tracker's fields
  (``model_source``, ``model_name``, ``model_name_sanitized``, ...).
* a sample line: ``doc_id``, ``target`` (text), ``resps`` (the repeats of the one request: the last
  model turn's text; dropped when it equals ``filtered_resps``, as lmms-eval does),
  ``filtered_resps`` (the prediction), ``token_counts``, ``doc_hash``, ``input`` (the opening prompt
  the model saw), the per-sample metric values, and our extras: ``fvqa_turns`` (every agent turn),
  search counts, ``prompt_hash``/``target_hash`` (lm-evaluation-harness's definitions). lmms-eval
  pops ``doc`` and ``arguments`` before writing, so neither is written here.

Task names are ``fvqa_<benchmark>_<workflow>`` (prefixed so they never collide with lmms-eval's
built-in tasks, e.g. its F1-only ``mmsearch``); the optional task pack `fvqa.eval.lmms_tasks` uses
the same names and the same doc fields, so its ``doc_id``/``doc_hash`` line up with these files.
Predictions that are not scored (failed model or judge call, asked again by the next run) are not
samples: ``n-samples`` counts them apart (``original`` = all, ``effective`` = scored) and a task with
nothing scored has null metrics.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fvqa.eval.aggregate import Cell, cells, scored_rows, unscored, unscored_note
from fvqa.protocol import IMAGE_PLACEHOLDER
from fvqa.store import Workspace

DATE_FORMAT = "%Y%m%d_%H%M%S"
"""lmms-eval's `get_datetime_str` format; the file names' date id."""
VERSION = 1.0
"""The task version in ``versions`` (and in the task pack's YAML ``metadata.version``)."""
HIGHER_IS_BETTER = {"search_ratio": False, "search_any_ratio": False}
"""Every score is better higher; search usage is a cost (fewer calls for the same accuracy), lower."""


def task_name(benchmark: str, workflow: str) -> str:
    return f"fvqa_{benchmark}_{workflow}".replace("-", "_").replace(".", "_")


# ------------------------------------------------------------------ lmms-eval's conventions, mirrored


def hash_string(text: str) -> str:
    """`lmms_eval.utils.hash_string`: sha256 hex of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_default(o: Any) -> Any:
    """`lmms_eval.utils.handle_non_serializable` (sets become lists, anything else its str)."""
    return list(o) if isinstance(o, set) else str(o)


def doc_hash(doc: dict[str, Any]) -> str:
    """lmms-eval's per-sample ``doc_hash`` (`evaluator._process_document_results`)."""
    return hash_string(json.dumps(doc, indent=2, default=_json_default, ensure_ascii=False))


def task_hash(doc_hashes: list[str]) -> str:
    """lmms-eval's ``task_hashes`` entry (`EvaluationTracker.save_results_aggregated`)."""
    return hash_string("".join(f"sample_{i}" + h for i, h in enumerate(doc_hashes)))


def sanitize_model_name(model_name: str) -> str:
    """`lmms_eval.utils.sanitize_model_name` (default, last two path parts): the folder name."""
    parts = model_name.split("/")
    last_two = "/".join(parts[-2:]) if len(parts) > 1 else parts[-1]
    return re.sub(r"[\"<>:/\|\\?\*\[\]]+", "__", last_two)


_MODEL_NAME_KEYS = ("peft=", "delta=", "pretrained=", "model=", "model_version=", "model_name=", "model_id=",
                    "path=", "engine=")


def model_name_from_args(model_args: str) -> str:
    """`GeneralConfigTracker._get_model_name`: the first key of its list found in ``model_args``."""
    for key in _MODEL_NAME_KEYS:
        if key in model_args:
            return model_args.split(key)[1].split(",")[0]
    return ""


def date_id(when: datetime) -> str:
    return when.strftime(DATE_FORMAT)


# ---------------------------------------------------------------------------------- the doc of an item


def lmms_doc(row: dict[str, Any]) -> dict[str, Any]:
    """The lmms-eval doc of one item: the fields the task pack's data files hold (the image by sha256).

    It is hashed for ``doc_hash`` and ``task_hashes``, so it holds only what identifies the item,
    never anything of a run (prediction, time, model).
    """
    image_sha = row.get("image_sha256")
    if image_sha is None and row.get("trajectory"):
        shas = json.loads(row["trajectory"]).get("image_shas") or []
        image_sha = shas[0] if shas else None
    return {"item_id": row["item_id"], "benchmark": row["benchmark"], "kind": row["kind"],
            "question": row["question"], "answer": row["answer"], "aliases": list(row.get("aliases") or []),
            "answer_eval": row.get("answer_eval"), "question_type": row.get("question_type"),
            "image_sha256": image_sha}


def _opening_text(traj: dict[str, Any], fallback: str) -> str:
    """The first user message's text without the image (lmms-eval's ``input``: the request's context
    string, which the task pack's `doc_to_text` gives for the same item)."""
    for msg in traj.get("messages") or []:
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, str):
                return content.replace(IMAGE_PLACEHOLDER, "").strip()
            if isinstance(content, list):  # text parts around the image: the text without its placeholder
                return "".join(p.get("text", "") for p in content
                               if isinstance(p, dict) and p.get("type") == "text").strip()
    return fallback


def _variants(row: dict[str, Any]) -> dict[str, float]:
    """`official_variants` (a JSON text {name: value}, a newer column) as metrics; {} when absent."""
    raw = row.get("official_variants")
    if not raw:
        return {}
    try:
        data = json.loads(raw) if isinstance(raw, str) else raw
    except (TypeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def _searches(row: dict[str, Any]) -> tuple[int, int, int]:
    return int(row.get("n_image_search") or 0), int(row.get("n_text_search") or 0), int(row.get("max_search") or 0)


def sample_metrics(row: dict[str, Any]) -> dict[str, float | None]:
    """The per-sample metric values, by the names the results use (lmms-eval merges them into the line)."""
    img, txt, limit = _searches(row)
    out: dict[str, float | None] = {
        "accuracy": float(row["score"]), "exact_match": row["em"], "sub_exact_match": row["subem"],
    }
    if row.get("official_name"):
        out[row["official_name"]] = row["official"]
    out["llm_judge"] = row["judge"]
    if row.get("judge_fvqa") is not None:
        out["llm_judge_fvqa"] = row["judge_fvqa"]
    out.update(_variants(row))
    out["search_ratio"] = (img + txt) / limit if limit > 0 else 0.0
    out["search_any_ratio"] = 1.0 if img + txt > 0 else 0.0
    return out


def _sample_line(doc_id: int, row: dict[str, Any]) -> dict[str, Any]:
    traj = json.loads(row["trajectory"]) if row.get("trajectory") else {}
    turns = traj.get("turns") or []
    final = turns[-1]["text"] if turns else ""
    prediction = row["prediction"] if row["prediction"] is not None else ""
    prompt = _opening_text(traj, row["question"])
    target = str(row["answer"])
    img, txt, limit = _searches(row)
    # what lmms-eval holds in memory: resps [[repeat, ...]] per request, filtered_resps [value] per request;
    # its writer flattens the one request and drops resps when they say what filtered_resps says
    line: dict[str, Any] = {"doc_id": doc_id, "target": target, "resps": [final], "filtered_resps": prediction}
    if line["resps"] == line["filtered_resps"] or line["resps"][0] == line["filtered_resps"]:
        line.pop("resps")
    line.update({
        "token_counts": [{"input_tokens": int(row.get("prompt_tokens") or 0),
                          "output_tokens": int(row.get("completion_tokens") or 0)}],
        "doc_hash": doc_hash(lmms_doc(row)), "prompt_hash": hash_string(prompt), "target_hash": hash_string(target),
        "input": prompt,
    })
    line.update(sample_metrics(row))
    line.update({
        "n_image_search": img, "n_text_search": txt, "max_search": limit,
        "fvqa_item_id": row["item_id"], "fvqa_stop_reason": row.get("stop_reason"),
        "fvqa_turns": [{"round": t.get("round"), "kind": t.get("kind"), "text": t.get("text")} for t in turns],
        "fvqa_judge_grade": row.get("judge_grade"), "fvqa_judge_reason": row.get("judge_reason"),
    })
    return line


# ------------------------------------------------------------------------------------ aggregation


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _stderr(values: list[float]) -> float | str:
    """lmms-eval's `mean_stderr` (sample standard deviation / sqrt(n)); "N/A" below two values."""
    n = len(values)
    if n < 2:
        return "N/A"
    m = _mean(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / (n - 1) / n)


def _task_results(c: Cell, rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    if not c.n:  # nothing scored: no numbers rather than zeros
        return {"alias": task, "accuracy,none": None, "accuracy_stderr,none": None}
    per = [sample_metrics(r) for r in rows]
    out: dict[str, Any] = {"alias": task}

    def put(metric: str, value: float | None, stderr: float | str) -> None:
        out[f"{metric},none"] = value
        out[f"{metric}_stderr,none"] = stderr

    put("accuracy", c.accuracy, _stderr([p["accuracy"] for p in per]))  # type: ignore[misc]
    put("exact_match", c.em, _stderr([r["em"] for r in rows]))
    put("sub_exact_match", c.subem, _stderr([r["subem"] for r in rows]))
    official = [float(r["official"]) for r in rows if r["official"] is not None]
    if c.official_name and official:
        put(c.official_name, c.official, _stderr(official))
    if c.judge is not None:
        put("llm_judge", c.judge, _stderr([float(r["judge"]) for r in rows]))
    fvqa_judged = [float(r["judge_fvqa"]) for r in rows if r.get("judge_fvqa") is not None]
    if fvqa_judged and len(fvqa_judged) == len(rows):
        put("llm_judge_fvqa", _mean(fvqa_judged), _stderr(fvqa_judged))
    # the cell's numbers where `cells` has them (as the report shows them), else from the rows
    cell_variants = getattr(c, "variants", None) or {}
    names = list(dict.fromkeys([*cell_variants, *(k for r in rows for k in _variants(r))]))
    for name in names:
        values = [_variants(r).get(name, 0.0) for r in rows]  # an item without the variant scores 0
        put(name, float(cell_variants.get(name, _mean(values))), _stderr(values))
    put("search_ratio", c.search_ratio, "N/A")  # a ratio of sums (calls / allowed), not a mean
    any_search = [float(p["search_any_ratio"] or 0.0) for p in per]
    put("search_any_ratio", float(getattr(c, "search_any_ratio", 1.0 - c.items_without_search)),
        _stderr(any_search))
    out["samples"] = c.n
    return out


def _higher_is_better(results: dict[str, Any]) -> dict[str, bool]:
    metrics = [k.split(",")[0] for k in results if "," in k and not k.split(",")[0].endswith("_stderr")]
    return {m: HIGHER_IS_BETTER.get(m, True) for m in metrics}


def _run_config(ws: Workspace, run: str) -> dict[str, Any]:
    try:
        got = ws.execute("SELECT config FROM eval_runs WHERE run = ?", [run])
    except Exception:  # noqa: BLE001 - an old workspace without the table: no config to report
        return {}
    try:
        return json.loads(got[0][0]) if got and got[0][0] else {}
    except (TypeError, ValueError):
        return {}


def _model_info(cfg: dict[str, Any], model: str) -> tuple[str, str, dict[str, Any]]:
    """(model_source, model_args, the model's spec) — model_args names the fvqa model first, so
    lmms-eval's `_get_model_name(model_args)` gives back the model name the folder is made from."""
    spec = next((m for m in cfg.get("models") or [] if isinstance(m, dict) and m.get("name") == model), {})
    backend = str(spec.get("backend") or "unknown")
    served = (spec.get("llm") or {}).get("model") if isinstance(spec.get("llm"), dict) else None
    served = served or spec.get("model_path")
    args = f"model_name={model},backend={backend}"
    if served:
        args += f",checkpoint={served}"
    if model_name_from_args(args) != model:  # a value that reads as one of lmms-eval's keys: leave it out
        args = f"model_name={model},backend={backend}"
    return f"fvqa:{backend}", args, spec


def _git_hash() -> str | None:
    """The fvqa checkout's commit, read as `lmms_eval.utils.get_commit_from_path` does (no subprocess)."""
    git = Path(__file__).resolve().parents[2] / ".git"
    try:
        if git.is_file():
            git = git.parent / git.read_text(encoding="utf-8").split("\n")[0].split(" ")[-1]
        head = (git / "HEAD").read_text(encoding="utf-8").split("\n")[0]
        if head.startswith("ref: "):
            ref = git / head.split(" ")[-1]
            return ref.read_text(encoding="utf-8").strip() if ref.is_file() else None
        return head.strip() or None
    except OSError:
        return None


def _fvqa_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fvqa")
    except PackageNotFoundError:
        return None


def _item_order(ws: Workspace, run: str) -> dict[tuple[str, str, str], dict[str, int]]:
    """doc_id per item: its place among the cell's predictions by item_id, scored or not (so a failed
    item never shifts the others; the task pack's data files are written in the same order)."""
    out: dict[tuple[str, str, str], dict[str, int]] = {}
    rows = ws.execute("SELECT model, workflow, benchmark, item_id FROM eval_predictions WHERE run = ? "
                      "ORDER BY model, workflow, benchmark, item_id", [run])
    for model, wf, bench, item in rows:
        ids = out.setdefault((model, wf, bench), {})
        ids[item] = len(ids)
    return out


def _free_date_id(folders: list[Path], when: datetime) -> str:
    """The first date id from `when` on (a second at a time) under which no folder has a file yet."""
    while True:
        did = date_id(when)
        if not any(f.is_dir() and any(f.glob(f"{did}_*")) for f in folders):
            return did
        when += timedelta(seconds=1)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".part")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_lmms_outputs(ws: Workspace, run: str, out_dir: Path, *, now: datetime | None = None) -> list[Path]:
    """Per model: ``<date_id>_samples_<task>.jsonl`` per task, then ``<date_id>_results.json``; returns the
    files written. `now` (default: the current UTC time) is where the date id starts."""
    rows = scored_rows(ws, run)
    counts = unscored(ws, run)
    cfg = _run_config(ws, run)
    order = _item_order(ws, run)
    by_model: dict[str, list[Cell]] = {}
    for c in cells(rows, n_resamples=200, unscored_counts=counts):
        by_model.setdefault(c.model, []).append(c)
    folders = {model: out_dir / sanitize_model_name(model) for model in by_model}
    started = now or datetime.now(UTC)
    did = _free_date_id(list(folders.values()), started.replace(microsecond=0))
    bench_paths = {b.get("name"): b.get("path") for b in cfg.get("benchmarks") or [] if isinstance(b, dict)}
    git_hash, version = _git_hash(), _fvqa_version()
    written: list[Path] = []
    for model, cs in by_model.items():
        folder = folders[model]
        source, model_args, spec = _model_info(cfg, model)
        results: dict[str, Any] = {}
        configs: dict[str, Any] = {}
        n_samples: dict[str, Any] = {}
        hashes: dict[str, str] = {}
        for c in cs:
            task = task_name(c.benchmark, c.workflow)
            cell_rows = [r for r in rows if r["model"] == model and r["benchmark"] == c.benchmark
                         and r["workflow"] == c.workflow]
            ids = order.get((model, c.workflow, c.benchmark), {})
            lines = [_sample_line(ids.get(r["item_id"], i), r) for i, r in enumerate(cell_rows)]
            results[task] = _task_results(c, cell_rows, task)
            configs[task] = {
                "task": task, "dataset_path": bench_paths.get(c.benchmark) or c.benchmark, "test_split": "test",
                "output_type": "generate_until", "num_fewshot": 0, "repeats": 1,
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": h}
                                for m, h in _higher_is_better(results[task]).items()],
                "metadata": {"version": VERSION, "harness": "fvqa", "run": run, "benchmark": c.benchmark,
                             "workflow": c.workflow, "benchmark_kind": c.kind},
            }
            n_samples[task] = {"original": c.n + c.not_scored, "effective": c.n,
                               "not_scored_model_call_failed": c.not_scored_model,
                               "not_scored_judge_call_failed": c.not_scored_judge,
                               "not_scored_pending": c.not_scored_pending}
            hashes[task] = task_hash([ln["doc_hash"] for ln in lines])
            path = folder / f"{did}_samples_{task}.jsonl"
            _atomic_write(path, "".join(json.dumps(ln, ensure_ascii=False, default=_json_default) + "\n"
                                        for ln in lines))
            written.append(path)
        doc = {
            "results": results,
            "group_subtasks": {t: [] for t in reversed(list(results))},
            "configs": dict(sorted(configs.items())),
            "versions": dict.fromkeys(sorted(results), VERSION),
            "n-shot": dict.fromkeys(sorted(results), 0),
            "higher_is_better": {t: _higher_is_better(results[t]) for t in sorted(results)},
            "n-samples": n_samples,
            "config": {"model": source, "model_args": model_args, "batch_size": cfg.get("batch_size"),
                       "limit": cfg.get("limit"), "bootstrap_iters": cfg.get("bootstrap_resamples"),
                       "gen_kwargs": cfg.get("sampling"), "random_seed": cfg.get("seed"),
                       "fvqa_run": run, "fvqa_model": {k: spec.get(k) for k in ("name", "backend", "model_path")
                                                       if spec.get(k) is not None}},
            "git_hash": git_hash,
            "date": did,
            "fvqa_version": version,
            "fvqa_not_scored_note": unscored_note({k: u for k, u in counts.items() if k[0] == model}),
            "task_hashes": hashes,
            "model_source": source, "model_name": model, "model_name_sanitized": folder.name,
            "system_instruction": None, "system_instruction_sha": None, "fewshot_as_multiturn": False,
            "chat_template": None, "chat_template_sha": None,
            "start_time": None, "end_time": None, "total_evaluation_time_seconds": None,
        }
        path = folder / f"{did}_results.json"  # last: a reader that finds it finds its samples too
        _atomic_write(path, json.dumps(doc, indent=2, ensure_ascii=False, default=_json_default))
        written.append(path)
    return written
