"""`fvqa eval run`: models x benchmarks x workflows -> predictions (with trajectories) and scores.

Resumable like every stage: predictions are committed per batch under the key (run, model,
benchmark, workflow, item_id), and a re-run only generates what is missing and only scores what
has no score yet (plus verdicts whose judge request failed), so a killed run loses at most one
batch and never repays a call. Model turns and judge verdicts are also cached by the LLM layer,
and searches by the search cache, so even `--rescore` costs nothing for what was judged before.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvqa.eval.aggregate import MODEL_CALL_FAILED
from fvqa.eval.benchmarks import EvalItem, LoadResult, load_benchmark
from fvqa.eval.config import EvalConfig, ModelSpec, answer_format, compare_fvqa_judge, judge_style
from fvqa.eval.scoring import JUDGE_OFFICIAL, rule_scores
from fvqa.eval.workflows import max_search_steps, run_workflow
from fvqa.store import Workspace, now

PREDICTIONS_DDL = """
CREATE TABLE IF NOT EXISTS eval_predictions (
    run VARCHAR, model VARCHAR, benchmark VARCHAR, workflow VARCHAR, item_id VARCHAR,
    kind VARCHAR, question VARCHAR, answer VARCHAR, aliases VARCHAR[], answer_eval VARCHAR,
    question_type VARCHAR, meta VARCHAR, prediction VARCHAR, stop_reason VARCHAR, stop_detail VARCHAR,
    n_image_search INTEGER, n_text_search INTEGER, max_search INTEGER, prompt_tokens BIGINT,
    completion_tokens BIGINT, generator VARCHAR, sampling VARCHAR, prompts_source VARCHAR,
    trajectory VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (run, model, benchmark, workflow, item_id))
"""
SCORES_DDL = """
CREATE TABLE IF NOT EXISTS eval_scores (
    run VARCHAR, model VARCHAR, benchmark VARCHAR, workflow VARCHAR, item_id VARCHAR,
    em DOUBLE, subem DOUBLE, official DOUBLE, official_name VARCHAR, judge DOUBLE, judge_grade VARCHAR,
    judge_reason VARCHAR, judge_error VARCHAR, judge_id VARCHAR, score DOUBLE, metric VARCHAR,
    created_at TIMESTAMP,
    PRIMARY KEY (run, model, benchmark, workflow, item_id))
"""
RUNS_DDL = """
CREATE TABLE IF NOT EXISTS eval_runs (run VARCHAR PRIMARY KEY, config VARCHAR, updated_at TIMESTAMP)
"""
ADDED_COLUMNS = (  # columns newer than the tables above: added to a workspace made before them
    ("eval_predictions", "answer_format", "VARCHAR"),
    ("eval_predictions", "protocol", "VARCHAR"),
    ("eval_scores", "official_variants", "VARCHAR"),  # JSON {name: value}: lenient variants, never official
    ("eval_scores", "judge_fvqa", "DOUBLE"),  # fvqa's own judge beside a paper-style one
    ("eval_scores", "judge_fvqa_id", "VARCHAR"),
)
KEY = ("run", "model", "benchmark", "workflow", "item_id")
JUDGE_REQUEST_FAILED = "judge request failed"


def ensure_tables(ws: Workspace) -> None:
    for ddl in (PREDICTIONS_DDL, SCORES_DDL, RUNS_DDL):
        ws.ensure_table(ddl)
    for table, column, kind in ADDED_COLUMNS:
        ws.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")


@dataclass
class CellSummary:
    """What one (model, benchmark, workflow) did in this invocation."""

    model: str
    benchmark: str
    workflow: str
    n_items: int
    generated: int = 0
    failed: int = 0  # of `generated`: the model call failed (stored, not scored, retried next run)
    retried: int = 0  # earlier failed predictions asked again in this invocation
    seconds: float = 0.0


@dataclass
class RunSummary:
    run: str
    cells: list[CellSummary] = field(default_factory=list)
    loaded: dict[str, LoadResult] = field(default_factory=dict)
    scored: int = 0
    judge_calls: int = 0  # paid judge requests (cache misses)
    judge_cache_hits: int = 0
    judge_failures: int = 0  # verdicts with an error (request failures are not scored, asked again next run)
    judge_unscored: int = 0  # predictions left unscored in this invocation because the judge call failed
    usd: float = 0.0

    @property
    def model_failures(self) -> int:
        return sum(c.failed for c in self.cells)


def _agent_item(it: EvalItem) -> Any:
    from fvqa.protocol import AgentItem

    return AgentItem(it.item_id, it.question, it.image, image_url=it.image_url, data_id=it.data_id)


def _make_generator(cfg: EvalConfig, spec: Any, ws: Workspace) -> Any:
    from fvqa.generators import make_generator

    return make_generator(spec.backend, llm=spec.llm, model_path=spec.model_path, device=spec.device,
                          cache_dir=ws.cache_dir / "llm", stage="eval")


def _record_rejects(ws: Workspace, name: str, result: LoadResult) -> None:
    stage = f"eval:{name}"
    known = {(k, r) for k, r in ws.execute("SELECT key, reason FROM rejects WHERE stage = ?", [stage])}
    ws.add_rejects([(stage, r.key, r.reason, r.detail) for r in result.rejects if (r.key, r.reason) not in known])


def _prediction_row(cfg: EvalConfig, model: str, wf: str, it: EvalItem, traj: Any, sampling: Any,
                    prompts_source: str, max_search: int, fmt: str) -> dict[str, Any]:
    return dict(answer_format=fmt, protocol=cfg.protocol,
        run=cfg.run, model=model, benchmark=it.benchmark, workflow=wf, item_id=it.item_id, kind=it.kind,
        question=it.question, answer=it.answer, aliases=list(it.aliases),
        answer_eval=json.dumps(it.answer_eval, ensure_ascii=False) if it.answer_eval is not None else None,
        question_type=it.question_type, meta=json.dumps(it.meta, ensure_ascii=False, default=str),
        prediction=traj.answer, stop_reason=traj.stop_reason, stop_detail=traj.stop_detail,
        n_image_search=traj.n_image_search, n_text_search=traj.n_text_search, max_search=max_search,
        prompt_tokens=traj.prompt_tokens, completion_tokens=traj.completion_tokens, generator=traj.generator,
        sampling=json.dumps(sampling.__dict__, default=list), prompts_source=prompts_source,
        trajectory=json.dumps(traj.to_dict(), ensure_ascii=False, default=str), created_at=now(),
    )


PLAIN_PROMPTS = "plain"
"""`fvqa/prompts/plain.yaml`: the plain-answer direct and RAG prompts (fvqa's wording)."""


def plain_prompts_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("fvqa").joinpath("prompts", f"{PLAIN_PROMPTS}.yaml")))


def prompts_record(prompts: Any) -> str:
    """What `prompts_source` stores: where each text came from and the sha256 of the texts themselves
    (the provenance hash uses the texts, so the same prompts hash alike on every machine)."""
    texts = prompts.model_dump(exclude={"source"})
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:12]
    plain = str(plain_prompts_path())
    source = {k: "fvqa-plain" if v == plain else v for k, v in prompts.source.items()}
    return json.dumps({"source": source, "sha256": digest}, sort_keys=True)


def prompt_paths(cfg: EvalConfig, model: ModelSpec, fmt: str) -> list[Any]:
    """The prompt files of one model in one answer format, in override order: fvqa's plain prompts
    (plain format), then the run's `prompts`, then the model's own."""
    base = [plain_prompts_path()] if fmt == "plain" else []
    return [*base, *(cfg.prompts or []), *(model.prompts or [])]


def generate(cfg: EvalConfig, ws: Workspace, loaded: dict[str, LoadResult], summary: RunSummary, *,
             tools: Any = None, generators: dict[str, Any] | None = None,
             log: Callable[[str], None] = lambda _: None) -> Any:
    """Run every missing (model, benchmark, workflow, item); returns the tools it built (to close)."""
    from fvqa.generators.base import Sampling
    from fvqa.protocol import load_prompts

    limits = cfg.limits
    s = cfg.sampling
    sampling = Sampling(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, seed=s.seed)
    built_tools = None
    generators = dict(generators or {})
    for spec in cfg.models:
        for bench in cfg.benchmarks:
            items = loaded[bench.name].items
            for wf in cfg.workflows:
                fmt = answer_format(cfg, spec, wf)
                prompts = load_prompts(prompt_paths(cfg, spec, fmt))
                prompts_source = prompts_record(prompts)
                stored = dict(ws.execute(
                    "SELECT item_id, stop_reason FROM eval_predictions "
                    "WHERE run=? AND model=? AND benchmark=? AND workflow=?",
                    [cfg.run, spec.name, bench.name, wf]))
                # a failed model call is not an answer: those items are asked again, finished ones never
                done = {k for k, reason in stored.items() if reason != MODEL_CALL_FAILED}
                pending = [it for it in items if it.item_id not in done]
                cell = CellSummary(spec.name, bench.name, wf, len(items))
                cell.retried = sum(1 for it in pending if it.item_id in stored)
                summary.cells.append(cell)
                if not pending:
                    continue
                if wf != "direct" and tools is None:
                    if built_tools is None:
                        from fvqa.search.tools import make_search_tools

                        built_tools = make_search_tools(cfg.search, cache_dir=ws.cache_dir / "search")
                    tools = built_tools
                if spec.name not in generators:
                    generators[spec.name] = _make_generator(cfg, spec, ws)
                gen = generators[spec.name]
                t0 = time.perf_counter()
                for start in range(0, len(pending), cfg.batch_size):
                    chunk = pending[start:start + cfg.batch_size]
                    trajs = run_workflow(wf, [_agent_item(it) for it in chunk], gen, tools, prompts, limits,
                                         sampling, answer_format=fmt)
                    m = max_search_steps(wf, limits)
                    rows = [_prediction_row(cfg, spec.name, wf, it, tr, sampling, prompts_source, m, fmt)
                            for it, tr in zip(chunk, trajs, strict=True)]
                    with ws.transaction():
                        again = [r["item_id"] for r in rows if r["item_id"] in stored]
                        if again:  # the old failed prediction's score row (if any) goes with it
                            ws.execute(
                                "DELETE FROM eval_scores WHERE run=? AND model=? AND benchmark=? AND workflow=? "
                                f"AND item_id IN ({', '.join('?' * len(again))})",
                                [cfg.run, spec.name, bench.name, wf, *again])
                        ws.insert("eval_predictions", rows, replace=True)
                    cell.generated += len(rows)
                    cell.failed += sum(1 for r in rows if r["stop_reason"] == MODEL_CALL_FAILED)
                    log(f"{spec.name} / {bench.name} / {wf}: {len(done) + cell.generated}/{len(items)}")
                cell.seconds = time.perf_counter() - t0
    for gen in generators.values():
        ledger = getattr(gen, "ledger", None)
        if ledger is not None:
            summary.usd += ledger.total_usd()
    return built_tools


def _pending_scores(ws: Workspace, run: str, rescore: bool) -> list[dict[str, Any]]:
    todo = "" if rescore else f"AND (s.item_id IS NULL OR s.judge_error LIKE '{JUDGE_REQUEST_FAILED}%')"
    cur = ws.con.execute(  # failed model calls are never scored: they are generated again first
        "SELECT p.* FROM eval_predictions p LEFT JOIN eval_scores s USING (run, model, benchmark, workflow, item_id) "
        f"WHERE p.run = ? AND p.stop_reason IS DISTINCT FROM '{MODEL_CALL_FAILED}' {todo} "
        "ORDER BY p.model, p.benchmark, p.workflow, p.item_id", [run])
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def _final_response(row: dict[str, Any]) -> str | None:
    """The model's whole last turn (what a paper-style judge grades), else the stored prediction."""
    turns = json.loads(row["trajectory"] or "{}").get("turns") or []
    return turns[-1].get("text") if turns else row["prediction"]


def _make_judge(cfg: EvalConfig, ws: Workspace, style: str) -> Any:
    from fvqa.eval.judge import Judge

    assert cfg.judge.llm is not None
    j = cfg.judge
    return Judge(j.llm, ws.cache_dir / "llm", temperature=j.temperature, top_p=j.top_p, max_tokens=j.max_tokens,
                 prompt_path=j.prompt_path if style == judge_style(cfg) else None, style=style)


def _judged_text(style: str, row: dict[str, Any]) -> str | None:
    """What a judge of `style` grades: the paper's judge the whole final response (so an untagged
    answer is still graded), fvqa's the extracted answer; None: nothing to grade (scored 0 unasked)."""
    text = (_final_response(row) or row["prediction"]) if style == "paper" else row["prediction"]
    return text if text and text.strip() else None


def _verdicts(judge: Any, rows: list[dict[str, Any]], images: dict[tuple[str, str], bytes]) -> dict[int, Any]:
    """Row index -> verdict of `judge` for every row with something to grade (paper style: with its image)."""
    from fvqa.eval.judge import JudgeRequest

    asked, requests = [], []
    paper = judge.style == "paper"
    for i, row in enumerate(rows):
        text = _judged_text(judge.style, row)
        if text is None:
            continue
        asked.append(i)
        requests.append(JudgeRequest(
            row["question"], row["answer"], tuple(row["aliases"] or []), text,
            three_way=row["kind"] == "simplevqa",
            image=images[(row["benchmark"], row["item_id"])] if paper else None))
    return dict(zip(asked, judge.judge_many(requests), strict=True))


def score(cfg: EvalConfig, ws: Workspace, summary: RunSummary, *, rescore: bool = False,
          images: dict[tuple[str, str], bytes] | None = None, log: Callable[[str], None] = lambda _: None) -> None:
    """Score predictions without a score (all with `rescore`); judge verdicts come from the cache when known.

    A paper-style judge sees each item's image (`images`, by (benchmark, item_id), from the benchmarks
    loaded in this run); a prediction whose item is not loaded now (another `--limit` sample) waits,
    unscored, for a run that loads it, rather than being judged without its image."""
    images = images or {}
    rows = _pending_scores(ws, cfg.run, rescore)
    judge = extra = None
    if cfg.judge.enabled:
        judge = _make_judge(cfg, ws, judge_style(cfg))
        if judge.style == "paper":
            waiting = [r for r in rows if (r["benchmark"], r["item_id"]) not in images]
            if waiting:
                log(f"{len(waiting)} predictions wait for a run that loads their items (the judge needs the image)")
            rows = [r for r in rows if (r["benchmark"], r["item_id"]) in images]
        if compare_fvqa_judge(cfg):
            extra = _make_judge(cfg, ws, "fvqa")
    if not rows:
        return
    asks = [sum(_judged_text(j.style, r) is not None for r in rows) for j in (judge, extra) if j is not None]
    log(f"scoring {len(rows)} predictions ({' + '.join(map(str, asks)) or 0} judge requests)")
    verdicts = _verdicts(judge, rows, images) if judge else {}
    extra_verdicts = _verdicts(extra, rows, images) if extra else {}
    out = []
    for i, row in enumerate(rows):
        answer_eval = json.loads(row["answer_eval"]) if row["answer_eval"] else None
        rs = rule_scores(row["kind"], row["prediction"], row["answer"], list(row["aliases"] or []), answer_eval,
                         row["question_type"])
        v = verdicts.get(i)
        # a judge call that failed is no verdict: no judge score (not a 0), asked again on the next run
        no_verdict = v is not None and bool(v.error) and v.error.startswith(JUDGE_REQUEST_FAILED)
        judge_score = None if judge is None or no_verdict else (v.score if v is not None else 0.0)
        grade = None if no_verdict else (
            v.grade if v is not None else ("not_attempted" if judge and row["kind"] == "simplevqa" else None))
        official = rs.official
        if official is None:  # SimpleVQA / LiveVQA: the judge is the official scorer
            official = judge_score if judge_score is not None or no_verdict else rs.em
        metric = cfg.primary_metric
        primary = {"judge": judge_score, "official": official, "em": rs.em, "subem": rs.subem}[metric]
        if no_verdict and primary is None:  # the primary score needs the judge: the item is not scored
            summary.judge_unscored += 1
        ev = extra_verdicts.get(i)
        extra_score = None if extra is None or (ev is not None and ev.error) else (ev.score if ev else 0.0)
        out.append(dict(
            **{k: row[k] for k in KEY}, em=rs.em, subem=rs.subem, official=official,
            official_name=rs.official_name if (rs.official is not None or judge) else "exact_match (no judge)",
            official_variants=json.dumps(rs.variants) if rs.variants else None,
            judge=judge_score, judge_grade=grade, judge_reason=v.reason if v else None,
            judge_error=v.error if v else None, judge_id=judge.id if judge else None,
            judge_fvqa=extra_score, judge_fvqa_id=extra.id if extra else None,
            score=None if no_verdict and primary is None else float(primary if primary is not None else 0.0),
            metric=metric, created_at=now(),
        ))
        if v is not None and v.error:
            summary.judge_failures += 1
    with ws.transaction():
        ws.insert("eval_scores", out, replace=True)
    summary.scored += len(out)
    for j in (judge, extra):
        if j is not None:
            cost = j.client.ledger.stage("eval-judge")
            summary.judge_calls += cost.calls + cost.failed
            summary.judge_cache_hits += cost.cache_hits
            summary.usd += cost.usd


def run_eval(cfg: EvalConfig, *, tools: Any = None, generators: dict[str, Any] | None = None,
             rescore: bool = False, log: Callable[[str], None] = lambda _: None) -> RunSummary:
    """Load benchmarks, generate what is missing, score what is unscored, write lmms-eval outputs."""
    from fvqa.eval.lmms import write_lmms_outputs

    summary = RunSummary(cfg.run)
    with Workspace(cfg.workspace) as ws:
        ensure_tables(ws)
        ws.insert("eval_runs", [dict(run=cfg.run, config=cfg.model_dump_json(), updated_at=now())], replace=True)
        for bench in cfg.benchmarks:
            res = load_benchmark(bench, limit=bench.limit or cfg.limit, seed=cfg.seed)
            summary.loaded[bench.name] = res
            _record_rejects(ws, bench.name, res)
            log(f"{bench.name}: {len(res.items)} items from {res.n_rows} rows, {len(res.rejects)} rejected"
                + (f", filtered {dict(res.filtered)}" if res.filtered else "")
                + (f", {res.sampled_out} not sampled (--limit)" if res.sampled_out else ""))
        built = generate(cfg, ws, summary.loaded, summary, tools=tools, generators=generators, log=log)
        try:
            images = {(name, it.item_id): it.image for name, res in summary.loaded.items() for it in res.items}
            score(cfg, ws, summary, rescore=rescore, images=images, log=log)
        finally:
            if built is not None and hasattr(built, "close"):
                built.close()
        write_lmms_outputs(ws, cfg.run, ws.root / "eval" / cfg.run / "lmms")
    return summary


def load_run_config(ws: Workspace, run: str) -> dict[str, Any]:
    """The config a run was made with (as stored), for the report's protocol section."""
    rows = ws.execute("SELECT config FROM eval_runs WHERE run = ?", [run])
    return json.loads(rows[0][0]) if rows else {}


def runs(ws: Workspace) -> Sequence[str]:
    return [r[0] for r in ws.execute("SELECT run FROM eval_runs ORDER BY updated_at")]


__all__ = ["JUDGE_OFFICIAL", "RunSummary", "ensure_tables", "run_eval", "score"]
