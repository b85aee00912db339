"""lmms-eval-shaped outputs and the `fvqa_` task pack, checked against lmms-eval 0.7.3's own rules.

A small eval run (five benchmark files, direct + on-demand, a scripted loopback model and judge,
the real local index behind the real search tools, as tests/test_eval_e2e.py) writes the files;
they are then read the way lmms-eval's tooling reads them:

* `lmms_eval.baselines.loader._load_baseline_from_local` (the `--baseline` reader of a samples file
  and its results file) runs for real when lmms-eval can be imported: installed, or its wheel named
  by ``FVQA_LMMS_EVAL_WHEEL`` (or the one `make install` downloads to <venv>/wheels) put on sys.path; that module needs nothing
  heavy. The rest of lmms-eval (`lmms_eval.utils`, the job scheduler, the TUI server, the YAML
  loader) imports torch, transformers, loguru, fastapi at module level, so their reading rules are
  mirrored here, each named by its file and function.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import re
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.eval_script import first_text, hint, judge, local_tools, n_assistant, search_chain
from support.fake_openai import FakeOpenAI

from fvqa.demo.benchmarks import write_demo_benchmarks
from fvqa.eval.config import load_eval_config
from fvqa.eval.lmms import lmms_doc, sample_metrics, write_lmms_outputs
from fvqa.eval.runner import run_eval
from fvqa.store import Workspace

N = 3
BENCHES = ("fvqa_test", "infoseek", "mmsearch", "simplevqa", "livevqa")
DATE_ID = re.compile(r"^(\d{8}_\d{6})_")
PACK = Path(__file__).resolve().parents[1] / "fvqa" / "eval" / "lmms_tasks"


# ------------------------------------------------------------ the scripted model and judge (as e2e)


def model(body: dict[str, Any]) -> str:
    """Direct: the hint or 'unknown'. On-demand: the hint at once, else image -> text search -> answer."""
    if "from your own knowledge" in first_text(body):
        return f"<reason>I look at it.</reason><answer>{hint(body) or 'unknown'}</answer>"
    if hint(body) and n_assistant(body) == 0:
        return f"<reason>I know this.</reason><answer>{hint(body)}</answer>"
    return search_chain(body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fvqa.demo.world import make_world

    return make_world(tmp_path_factory.mktemp("lworld") / "w", seed=3, n_entities=6)


@pytest.fixture(scope="module")
def tools(world: Path, tmp_path_factory: pytest.TempPathFactory):
    yield from local_tools(world, tmp_path_factory)


@pytest.fixture(scope="module")
def runs(world: Path, tools, tmp_path_factory: pytest.TempPathFactory):
    """Two runs of the same config (the second has nothing to do but writes its files again)."""
    tmp = tmp_path_factory.mktemp("lrun")
    specs = write_demo_benchmarks(world, tmp / "bench", n=N)
    with FakeOpenAI(model) as m, FakeOpenAI(judge) as j:
        data = {
            "workspace": str(tmp / "ws"), "run": "lm",
            "models": [{"name": "scripted-vlm", "backend": "openai",
                        "llm": {"endpoints": [{"base_url": m.base_url, "api_key_env": None}], "model": "fake-vlm",
                                "max_retries": 0}}],
            "benchmarks": list(specs.values()), "workflows": ["direct", "on_demand"],
            "judge": {"enabled": True, "llm": {"endpoints": [{"base_url": j.base_url, "api_key_env": None}],
                                               "model": "judge-pinned", "max_retries": 0}},
            "batch_size": 2, "bootstrap_resamples": 100,
        }
        (tmp / "eval.yaml").write_text(yaml.safe_dump(data))
        cfg = load_eval_config(tmp / "eval.yaml")
        run_eval(cfg, tools=tools)
        out = cfg.workspace / "eval" / "lm" / "lmms"
        first = {p.name: p.read_bytes() for p in (out / "scripted-vlm").iterdir()}
        run_eval(cfg, tools=tools)
    return cfg, tmp / "eval.yaml", out, first


def _results_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*_results.json"))


def _latest(out: Path) -> tuple[dict[str, Any], Path]:
    path = _results_files(out / "scripted-vlm")[-1]
    return json.loads(path.read_text()), path


def _samples(results_path: Path, task: str) -> list[dict[str, Any]]:
    prefix = results_path.stem.removesuffix("_results")
    text = (results_path.parent / f"{prefix}_samples_{task}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ------------------------------------------------------------------------------- file names, reruns


def test_files_are_named_as_lmms_eval_names_them(runs) -> None:
    _, _, out, _ = runs
    assert [p.name for p in out.iterdir()] == ["scripted-vlm"]  # sanitize_model_name(model_name)
    names = sorted(p.name for p in (out / "scripted-vlm").iterdir())
    ids = {DATE_ID.match(n).group(1) for n in names}
    assert len(ids) == 2  # two runs, each its own date id
    for did in ids:  # lmms_eval.utils.get_datetime_str's format
        assert datetime.strptime(did, "%Y%m%d_%H%M%S")
        tasks = {f"fvqa_{b}_{w}" for b in BENCHES for w in ("direct", "on_demand")}
        assert set(n for n in names if n.startswith(did)) == (
            {f"{did}_results.json"} | {f"{did}_samples_{t}.jsonl" for t in tasks})


def test_a_rerun_never_overwrites(runs) -> None:
    cfg, _, out, first = runs
    folder = out / "scripted-vlm"
    assert len(_results_files(folder)) == 2
    for name, data in first.items():  # every file of the first run is still there, unchanged
        assert (folder / name).read_bytes() == data
    # two writes within one second: the second takes the next second's id
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    with Workspace(cfg.workspace) as ws:
        a = write_lmms_outputs(ws, "lm", out, now=now)
        b = write_lmms_outputs(ws, "lm", out, now=now)
    assert a[-1].name == "20300102_030405_results.json" and b[-1].name == "20300102_030406_results.json"
    assert not set(a) & set(b)
    for p in a + b:
        p.unlink()


# ------------------------------------------------------------------------------------- results keys


def _model_name_from_args(model_args: str) -> str:
    """Mirror of lmms_eval/loggers/evaluation_tracker.py GeneralConfigTracker._get_model_name."""
    for prefix in ["peft=", "delta=", "pretrained=", "model=", "model_version=", "model_name=", "model_id=",
                   "path=", "engine="]:
        if prefix in model_args:
            return model_args.split(prefix)[1].split(",")[0]
    return ""


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_results_carry_lmms_eval_keys(runs) -> None:
    _, _, out, _ = runs
    res, path = _latest(out)
    for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                "config", "git_hash", "date", "task_hashes", "model_source", "model_name", "model_name_sanitized"):
        assert key in res, key
    tasks = set(res["results"])
    assert len(tasks) == 10
    for section in ("group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
                    "task_hashes"):
        assert set(res[section]) == tasks, section
    assert res["date"] == path.name.split("_results")[0]
    assert all(v == 0 for v in res["n-shot"].values()) and all(v == [] for v in res["group_subtasks"].values())
    assert res["model_name"] == "scripted-vlm" and res["model_name_sanitized"] == "scripted-vlm"
    assert _model_name_from_args(res["config"]["model_args"]) == res["model_name"]
    assert isinstance(res["config"]["model"], str) and "checkpoint=fake-vlm" in res["config"]["model_args"]
    for task, metrics in res["results"].items():
        names = {k.split(",")[0] for k in metrics if "," in k and "_stderr," not in k}
        assert set(res["higher_is_better"][task]) == names
        assert all(isinstance(h, bool) for h in res["higher_is_better"][task].values())
        assert res["higher_is_better"][task]["accuracy"] is True
        assert res["higher_is_better"][task]["search_ratio"] is False
        assert metrics["alias"] == task and metrics["samples"] == N
        for name in names:  # every value a number, every stderr a number or lmms-eval's "N/A"
            assert isinstance(metrics[f"{name},none"], float)
            se = metrics[f"{name}_stderr,none"]
            assert isinstance(se, float) or se == "N/A"
        assert res["n-samples"][task]["original"] == res["n-samples"][task]["effective"] == N
        assert res["n-samples"][task]["not_scored_model_call_failed"] == 0
        # lmms-eval's task hash: sha256 over "sample_<i>" + doc_hash of the task's samples
        samples = _samples(path, task)
        assert res["task_hashes"][task] == _hash("".join(f"sample_{i}" + s["doc_hash"] for i, s in enumerate(samples)))
    r = res["results"]
    assert r["fvqa_infoseek_direct"]["accuracy,none"] == pytest.approx(2 / 3)
    assert r["fvqa_infoseek_direct"]["infoseek_score,none"] == pytest.approx(2 / 3)
    assert r["fvqa_mmsearch_direct"]["mmsearch_f1,none"] == pytest.approx(2 / 3)
    assert r["fvqa_livevqa_direct"]["llm_judge,none"] == pytest.approx(2 / 3)
    for b in BENCHES:
        assert r[f"fvqa_{b}_direct"]["search_ratio,none"] == r[f"fvqa_{b}_direct"]["search_any_ratio,none"] == 0.0
        od = r[f"fvqa_{b}_on_demand"]
        assert od["accuracy,none"] == 1.0 and od["exact_match,none"] == 1.0
        assert od["search_ratio,none"] == pytest.approx(1 / 3)  # 2 calls of the 6 allowed over 3 items
        assert od["search_any_ratio,none"] == pytest.approx(1 / 3)  # one item of three searched
    first_hashes = json.loads(_results_files(out / "scripted-vlm")[0].read_text())["task_hashes"]
    assert first_hashes == res["task_hashes"]  # the same items hash the same in every run


# ------------------------------------------------------------------------------------- sample lines


def test_sample_lines_as_lmms_eval_writes_them(runs) -> None:
    cfg, _, out, _ = runs
    res, path = _latest(out)
    with Workspace(cfg.workspace) as ws:
        cur = ws.con.execute("SELECT * FROM eval_predictions WHERE run='lm' ORDER BY item_id")
        cols = [d[0] for d in cur.description]
        preds = {(r["benchmark"], r["workflow"], r["item_id"]): r
                 for r in (dict(zip(cols, row, strict=True)) for row in cur.fetchall())}
    for task in res["results"]:
        lines = _samples(path, task)
        assert [s["doc_id"] for s in lines] == list(range(N))
        for s in lines:
            assert "doc" not in s and "arguments" not in s  # lmms-eval pops both before writing
            bench, wf = task.removeprefix("fvqa_").rsplit("_", 1) if "on_demand" not in task else (
                task.removeprefix("fvqa_").removesuffix("_on_demand"), "on_demand")
            p = preds[bench, wf, s["fvqa_item_id"]]
            turns = json.loads(p["trajectory"])["turns"]
            assert s["resps"] == [turns[-1]["text"]]  # the one request's repeats: one, the final turn
            assert s["filtered_resps"] == p["prediction"] and isinstance(s["target"], str)
            assert [t["text"] for t in s["fvqa_turns"]] == [t["text"] for t in turns]
            assert p["question"].strip() in s["input"] and "<image>" not in s["input"]
            assert s["doc_hash"] == _hash(json.dumps(lmms_doc(p), indent=2, ensure_ascii=False))
            assert s["target_hash"] == _hash(s["target"]) and s["prompt_hash"] == _hash(s["input"])
            assert s["n_image_search"] == p["n_image_search"] and s["n_text_search"] == p["n_text_search"]
            assert s["search_any_ratio"] == float(p["n_image_search"] + p["n_text_search"] > 0)
            assert isinstance(s["accuracy"], float) and "exact_match" in s and "sub_exact_match" in s
            assert s["token_counts"][0]["output_tokens"] > 0
        if "infoseek" in task:
            assert all("infoseek_score" in s for s in lines)
        if "mmsearch" in task:
            assert all("mmsearch_f1" in s for s in lines)
    od = {s["fvqa_item_id"]: s for s in _samples(path, "fvqa_mmsearch_on_demand")}
    assert [t["kind"] for t in od["mm1"]["fvqa_turns"]] == ["image_search", "text_search", "answer"]
    assert (od["mm1"]["n_image_search"], od["mm1"]["n_text_search"]) == (1, 1)


def _row(**kw: Any) -> dict[str, Any]:
    base = dict(model="m", benchmark="b", workflow="direct", item_id="i1", kind="mmsearch", question="Q?",
                answer="Ann", aliases=["Ann"], answer_eval=None, question_type=None, prediction="Ann", score=1.0,
                em=1.0, subem=1.0, official=1.0, official_name="mmsearch_f1", judge=None, judge_grade=None,
                judge_reason=None, n_image_search=0, n_text_search=0, max_search=0, prompt_tokens=3,
                completion_tokens=2, stop_reason="answer",
                trajectory=json.dumps({"turns": [{"round": 1, "kind": "answer", "text": "Ann"}],
                                       "messages": [{"role": "user", "content": "Q?"}], "image_shas": ["ab"]}))
    return {**base, **kw}


def test_resps_dropped_when_they_equal_the_prediction_and_variants_become_metrics() -> None:
    from fvqa.eval.lmms import _sample_line

    line = _sample_line(0, _row())  # a plain reply that is the answer: lmms-eval writes no resps
    assert "resps" not in line and line["filtered_resps"] == "Ann"
    assert "resps" in _sample_line(0, _row(prediction=None)) and _sample_line(0, _row(prediction=None))[
        "filtered_resps"] == ""
    with_variants = sample_metrics(_row(official_variants='{"mmsearch_f1_alternatives": 0.5}', judge_fvqa=1.0))
    assert with_variants["mmsearch_f1_alternatives"] == 0.5 and with_variants["llm_judge_fvqa"] == 1.0
    assert "mmsearch_f1_alternatives" not in sample_metrics(_row(official_variants=None))
    assert "mmsearch_f1_alternatives" not in sample_metrics(_row())  # the column absent altogether


def test_variants_are_aggregated_when_the_column_is_there() -> None:
    from fvqa.eval.aggregate import cells
    from fvqa.eval.lmms import _higher_is_better, _task_results

    rows = [_row(item_id=f"i{k}", official_variants={"mmsearch_f1_alternatives": v}, judge_error=None, meta={})
            for k, v in enumerate((1.0, 0.5))]  # as `scored_rows` gives the column: parsed
    (c,) = cells(rows, n_resamples=10)
    res = _task_results(c, rows, "t")
    assert res["mmsearch_f1_alternatives,none"] == 0.75 and res["mmsearch_f1_alternatives_stderr,none"] > 0
    assert res["search_any_ratio,none"] == 0.0 and res["search_ratio,none"] == 0.0
    assert _higher_is_better(res)["mmsearch_f1_alternatives"] is True


# ------------------------------------------------------------------------- lmms-eval's readers


def _lmms_eval_loader():
    """lmms_eval.baselines.loader if lmms-eval is installed or its wheel can be put on sys.path."""
    if importlib.util.find_spec("lmms_eval") is None:
        # `make install` downloads the wheel (not installed: its dependencies are heavy) to <venv>/wheels
        wheels = [os.environ.get("FVQA_LMMS_EVAL_WHEEL", ""),
                  *sorted(glob.glob(str(Path(sys.prefix) / "wheels" / "lmms_eval-*.whl")))]
        wheel = next((w for w in wheels if w and Path(w).is_file()), None)
        if wheel is None:
            return None
        sys.path.insert(0, wheel)  # a pure-Python wheel is a zip: importable as it is
    try:
        from lmms_eval.baselines import loader
    except ImportError:
        return None
    return loader


def test_lmms_eval_baseline_loader_reads_our_files(runs) -> None:
    loader = _lmms_eval_loader()
    if loader is None:
        pytest.fail("lmms-eval is not importable: `make install` downloads its wheel to <venv>/wheels "
                    "(or install it, or set FVQA_LMMS_EVAL_WHEEL)")
    _, _, out, _ = runs
    res, path = _latest(out)
    for task in ("fvqa_infoseek_direct", "fvqa_livevqa_on_demand"):
        samples = path.parent / f"{res['date']}_samples_{task}.jsonl"
        scores, agg = loader._load_baseline_from_local(str(samples), task)
        assert agg == res  # it found the results file of the same run from the samples file's name
        assert sorted(scores) == list(range(N))
    infoseek, _ = loader._load_baseline_from_local(str(path.parent / f"{res['date']}_samples_fvqa_infoseek_direct.jsonl"),
                                                   "fvqa_infoseek_direct")
    assert sum(infoseek.values()) == pytest.approx(2)  # the official score, per doc


def test_lmms_eval_scheduler_and_tui_rules_find_the_latest_run(runs) -> None:
    _, _, out, _ = runs
    # mirror of lmms_eval/entrypoints/job_scheduler.py JobScheduler._parse_output_directory
    parsed: dict[str, dict[str, Any]] = {}
    for model_dir in out.iterdir():
        stamps: dict[str, dict[str, Any]] = defaultdict(lambda: {"results": None, "samples": []})
        for f in model_dir.glob("*_results.json"):
            stamps[f.name.split("_results.json")[0]]["results"] = str(f)
        for f in model_dir.glob("*_samples_*.jsonl"):
            stamps[f.name.split("_samples_")[0]]["samples"].append(str(f))
        parsed[model_dir.name] = stamps[sorted(stamps, reverse=True)[0]]
    res, path = _latest(out)
    latest = parsed["scripted-vlm"]
    assert latest["results"] == str(path) and len(latest["samples"]) == len(res["results"])
    # mirror of lmms_eval/tui/server.py list_log_runs / get_log_run_samples
    runs_found = sorted(out.rglob("*_results.json"))
    assert len(runs_found) == 2
    for f in runs_found:
        data = json.loads(f.read_text())
        assert isinstance(data["results"], dict) and isinstance(data["config"], dict)
        assert isinstance(data["n-samples"], dict) and data["model_name"] == "scripted-vlm"
        prefix = f.stem.removesuffix("_results")
        for task in data["results"]:
            assert f.with_name(f"{prefix}_samples_{task}.jsonl").is_file()


# ------------------------------------------------------------------------------------- the task pack


def _load_task_yaml(path: Path) -> dict[str, Any]:
    """Mirror of lmms_eval/utils.py load_yaml_config (mode full): `include` from the YAML's folder,
    ``!function mod.fn`` as import_function (the module file next to the YAML first, then an absolute
    import), relative ``data_files`` of a local builder resolved against the folder when they exist."""

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.Loader, node: yaml.Node) -> Any:
        *mod, fn = loader.construct_scalar(node).split(".")
        module_path = Path(loader.name).parent / f"{'.'.join(mod)}.py"
        if module_path.exists():
            spec = importlib.util.spec_from_file_location(".".join(mod), module_path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(".".join(mod))
        return getattr(module, fn)

    Loader.add_constructor("!function", function)
    with path.open("rb") as fh:
        cfg = yaml.load(fh, Loader=Loader)  # noqa: S506 - our loader: safe + !function only
    if "include" in cfg:
        inc = cfg.pop("include")
        merged: dict[str, Any] = {}
        for p in reversed([inc] if isinstance(inc, str) else inc):
            merged.update(_load_task_yaml(p if Path(p).is_file() else path.parent / p))
        merged.update(cfg)
        cfg = merged
    if cfg.get("dataset_path") in {"csv", "json", "parquet", "text", "pandas", "arrow"}:
        files = cfg.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            if not Path(rel).is_absolute() and (path.parent / rel).is_file():
                files[split] = str(path.parent / rel)
    return cfg


def test_shipped_task_yamls_load_and_name_working_functions() -> None:
    from fvqa.eval.lmms_tasks.export import DEFAULT_BENCHMARKS, task_yaml

    shipped = sorted(PACK.glob("*.yaml"))
    assert [p.stem for p in shipped] == sorted(f"fvqa_{b}_direct" for b in DEFAULT_BENCHMARKS)
    for p in shipped:
        bench = p.stem.removeprefix("fvqa_").removesuffix("_direct")
        assert p.read_text() == task_yaml(bench, DEFAULT_BENCHMARKS[bench])  # in sync with the generator
        cfg = _load_task_yaml(p)
        assert cfg["task"] == p.stem and cfg["output_type"] == "generate_until" and cfg["test_split"] == "test"
        for key in ("doc_to_visual", "doc_to_text", "doc_to_target", "process_results"):
            assert callable(cfg[key]), key
        assert all(m["aggregation"] == "mean" and m["higher_is_better"] is True for m in cfg["metric_list"])
    assert (PACK / "README.md").is_file() and "--include_path" in (PACK / "README.md").read_text()


def test_exported_pack_scores_as_fvqa_eval_run(runs, tmp_path: Path) -> None:
    """lmms-eval's path through the pack: the exported folder, its YAMLs, `datasets` loading the data
    file, then doc_to_visual / doc_to_text / process_results on the replies the run stored."""
    import datasets
    from PIL import Image

    from fvqa.eval.lmms_tasks.export import export

    cfg, cfg_path, out, _ = runs
    export(cfg_path, tmp_path / "pack")
    res, path = _latest(out)
    with Workspace(cfg.workspace) as ws:
        cur = ws.con.execute("SELECT p.benchmark, p.item_id, p.trajectory, s.em, s.subem, s.official, "
                             "s.official_name FROM eval_predictions p JOIN eval_scores s "
                             "USING (run, model, benchmark, workflow, item_id) WHERE p.run='lm' AND "
                             "p.workflow='direct'")
        stored = {(b, i): (json.loads(t)["turns"][-1]["text"], em, sub, off, name)
                  for b, i, t, em, sub, off, name in cur.fetchall()}
    for bench in BENCHES:
        task = f"fvqa_{bench}_direct"
        tcfg = _load_task_yaml(tmp_path / "pack" / f"{task}.yaml")
        ds = datasets.load_dataset(tcfg["dataset_path"], cache_dir=str(tmp_path / "hf"),
                                   **tcfg["dataset_kwargs"])[tcfg["test_split"]]
        names = [m["metric"] for m in tcfg["metric_list"]]
        samples = _samples(path, task)
        assert len(ds) == len(samples) == N
        for doc_id, doc in enumerate(ds):
            (img,) = tcfg["doc_to_visual"](doc)
            assert isinstance(img, Image.Image) and img.mode == "RGB"
            text = tcfg["doc_to_text"](doc, None)
            assert doc["question"].strip() in text and "<image>" not in text
            assert tcfg["doc_to_target"](doc) == doc["answer"]
            reply, em, subem, official, official_name = stored[bench, doc["item_id"]]
            scores = tcfg["process_results"](doc, [reply])
            assert list(scores) == names  # exactly the metric list: lmms-eval aggregates each
            assert (scores["exact_match"], scores["sub_exact_match"]) == (em, subem)
            if official_name in scores:
                assert scores[official_name] == official
            # the same doc_id and doc_hash as the run's samples file
            no_image = {k: v for k, v in doc.items() if k != "image"}
            assert samples[doc_id]["fvqa_item_id"] == doc["item_id"] and samples[doc_id]["input"] == text
            assert samples[doc_id]["doc_hash"] == _hash(json.dumps(no_image, indent=2, ensure_ascii=False))
        wrong = tcfg["process_results"](ds[0], ["<reason>x</reason><answer>surely not this</answer>"])
        assert wrong["exact_match"] == 0.0 and wrong["accuracy"] == 0.0
