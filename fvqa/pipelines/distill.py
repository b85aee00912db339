"""Distil: a teacher runs the search protocol on chosen items; correct, format-valid trajectories are kept.

The SFT cold start before GRPO (issue 14). For each item of `distill.split` (default: train) in the
`dataset` view, a teacher (`distill.backend`: any OpenAI-compatible VLM, a local model, or the demo's
scripted stand-in) makes `distill.k` sampled attempts through the same rollout core, search tools,
limits and prompts as the probe (`fvqa.agent`). Each attempt is checked with the reward's answer
check (exact match after SQuAD normalisation against answer + aliases) and the configured format rule
(`fvqa.protocol.format_rules`).

Tables (stage-private, created here):

* `distill_attempts` — every attempt: trajectory JSON, correct, format_valid, search pattern
  (none/image/text/mixed), teacher, seed, and `reject_code` (NULL for a usable attempt);
* `distill_items` — the completion table: one row per item whose k attempts are all in (at least one
  usable); an item with none usable is a reject (`no_usable_attempt`);
* `distill_kept` — the balanced selection (`fvqa.pipelines.distill_select`), recomputed from the
  stored attempts at the end of every run;
* `distill_images` — the search thumbnails kept trajectories showed (bytes by sha256), for the export.

Resume is the probe's: items go in chunks, each chunk's successful attempts are committed together,
an item with a transiently failed attempt (timeout, 5xx) is deferred — its successful attempts are
kept and the next run makes only the missing ones — and every HTTP call goes through the LLM
client's response cache keyed by the request (the per-attempt seed included), so a killed run
repeats no successful paid call. A failure that would repeat (HTTP 400/413/422) rejects the item.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fvqa.agent import Job, run_many
from fvqa.answers import exact_match
from fvqa.config import DistillConfig
from fvqa.errors import ConfigError
from fvqa.generators import Sampling
from fvqa.generators.base import Generator
from fvqa.pipelines.base import Estimate, Stage, StageContext
from fvqa.pipelines.distill_select import Candidate, search_pattern, select
from fvqa.pipelines.probe_model import (
    agent_items,
    book_generator_spend,
    is_permanent_failure,
    rollout_seed,
    stage_search_tools,
)
from fvqa.protocol import Trajectory, load_prompts, trajectory_format
from fvqa.protocol.episode import image_outcome, sha256
from fvqa.reasons import STAGE_CODES
from fvqa.store import Workspace, now

STAGE = "distill"

# Reject codes. Item level (table `rejects`, through `ctx.reject`):
IMAGE_MISSING = "image_missing"
TEACHER_CALL_FAILED = "teacher_call_failed"
NO_USABLE_ATTEMPT = "no_usable_attempt"
# Attempt level (column `distill_attempts.reject_code`; the item itself may still be kept):
NO_ANSWER = "no_answer"
FORMAT_INVALID = "format_invalid"
WRONG_ANSWER = "wrong_answer"

REJECT_CODES = STAGE_CODES[STAGE]
"""This stage's codes, item- and attempt-level; their one home (with their meaning) is `fvqa.reasons`."""

ATTEMPTS_DDL = """
CREATE TABLE IF NOT EXISTS distill_attempts (
    item_id VARCHAR, attempt INTEGER, teacher VARCHAR, search_label VARCHAR, correct BOOLEAN,
    format_valid BOOLEAN, format_rule VARCHAR, format_problem VARCHAR, search_pattern VARCHAR, shape VARCHAR,
    answer VARCHAR, n_turns INTEGER, prompt_tokens BIGINT, completion_tokens BIGINT, stop_reason VARCHAR,
    reject_code VARCHAR, seed BIGINT, trajectory VARCHAR, created_at TIMESTAMP,
    PRIMARY KEY (item_id, attempt))
"""
ITEMS_DDL = """
CREATE TABLE IF NOT EXISTS distill_items (
    item_id VARCHAR PRIMARY KEY, teacher VARCHAR, search_label VARCHAR, n_attempts INTEGER, n_correct INTEGER,
    n_format_valid INTEGER, n_usable INTEGER, provenance VARCHAR)
"""
KEPT_DDL = """
CREATE TABLE IF NOT EXISTS distill_kept (
    item_id VARCHAR, attempt INTEGER, teacher VARCHAR, search_pattern VARCHAR, search_label VARCHAR,
    rank INTEGER, selected_at TIMESTAMP, PRIMARY KEY (item_id, attempt))
"""
IMAGES_DDL = "CREATE TABLE IF NOT EXISTS distill_images (sha256 VARCHAR PRIMARY KEY, data BLOB)"
ITEM_COLUMNS = ("item_id", "question", "answer", "aliases", "image_sha256", "image_url", "data_id", "search_label",
                "concept", "entity_text")


def teacher_name(cfg: DistillConfig) -> str:
    """The `teacher` value rows get (one per backend and model, so two never mix unnoticed)."""
    if cfg.backend == "scripted-teacher":
        from fvqa.demo.teacher import NAME

        return NAME
    if cfg.backend == "openai":
        return f"openai:{cfg.llm.model if cfg.llm is not None else 'gpt-4o'}"
    return f"{cfg.backend}:{cfg.model_path}"


def choose_items(rows: list[dict[str, Any]], max_items: int | None, seed: int) -> list[dict[str, Any]]:
    """All rows, or a seeded sample of `max_items` interleaving the search labels (round-robin over the
    labels, each in seeded order), so a small sample still holds every label."""
    if max_items is None or len(rows) <= max_items:
        return rows
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["search_label"], []).append(r)
    rng = random.Random(seed)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    out: list[dict[str, Any]] = []
    while len(out) < max_items:
        for q in queues:
            if q and len(out) < max_items:
                out.append(q.pop())
    return sorted(out, key=lambda r: r["item_id"])


def split_rows(ws: Workspace, cfg: DistillConfig) -> list[dict[str, Any]]:
    """The chosen items: `cfg.split` of the `dataset` view with a search label (never unanswerable)."""
    cols = ", ".join(ITEM_COLUMNS)
    rows = [dict(zip(ITEM_COLUMNS, r, strict=True)) for r in ws.execute(
        f"SELECT {cols} FROM dataset WHERE split = ? AND search_label IS NOT NULL "
        "AND search_label <> 'unanswerable' ORDER BY item_id", [cfg.split])]
    return choose_items(rows, cfg.max_items, cfg.seed)


def sampling_for(cfg: DistillConfig, item_id: str, attempt: int) -> Sampling:
    """Attempt `attempt`'s sampling: its own stable seed (so k attempts are k distinct cached requests)."""
    return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                    seed=rollout_seed(cfg.seed, item_id, attempt))


class ThumbnailRecorder:
    """Search tools that remember the thumbnails they showed (bounded exactly as the episode core
    bounds them), so kept trajectories can be exported with their images."""

    def __init__(self, tools: Any, limits: Any) -> None:
        self.tools, self.limits = tools, limits
        self.seen: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def image_search(self, image: bytes, **kwargs: Any) -> list[Any]:
        hits = list(self.tools.image_search(image, **kwargs))
        shown = image_outcome(0, hits, self.limits).image_data
        with self._lock:
            self.seen.update({sha256(b): b for b in shown})
        return hits

    def text_search(self, query: str, question: str = "") -> list[Any]:
        return list(self.tools.text_search(query, question))

    def close(self) -> None:
        close = getattr(self.tools, "close", None)
        if callable(close):
            close()


def attempt_row(r: dict[str, Any], index: int, t: Trajectory, cfg: DistillConfig, teacher: str) -> dict[str, Any]:
    """The `distill_attempts` row of one finished trajectory, with its reject code (None: usable)."""
    golds = [r["answer"], *(r["aliases"] or [])]
    correct = t.answer is not None and bool(exact_match(t.answer, golds))
    fmt = trajectory_format(t.assistant_turns, cfg.format_rule, cfg.limits)
    answered = t.stop_reason == "answer"
    code = None if answered and fmt.ok and correct else (
        NO_ANSWER if not answered else FORMAT_INVALID if not fmt.ok else WRONG_ANSWER)
    return dict(
        item_id=r["item_id"], attempt=index, teacher=teacher, search_label=r["search_label"], correct=correct,
        format_valid=fmt.ok, format_rule=cfg.format_rule, format_problem=fmt.problem,
        search_pattern=search_pattern(t.n_image_search, t.n_text_search), shape="->".join(fmt.shape),
        answer=t.answer, n_turns=len(t.turns), prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
        stop_reason=t.stop_reason, reject_code=code, seed=t.seed,
        trajectory=json.dumps(t.to_dict(), ensure_ascii=False), created_at=now())


class DistillStage(Stage):
    """split items -> teacher trajectories (every attempt) -> balanced kept set for SFT."""

    name = STAGE
    inputs = ("items", "splits")
    outputs = ("distill_items", "distill_attempts", "distill_kept", "distill_images")
    description = "teacher search trajectories on the chosen split, kept when correct and format-valid (SFT data)"

    def prepare(self, ws: Workspace) -> None:
        for ddl in (ATTEMPTS_DDL, ITEMS_DDL, KEPT_DDL, IMAGES_DDL):
            ws.ensure_table(ddl)

    def reset(self, ws: Workspace) -> None:
        self.prepare(ws)  # `--force distill` on a workspace that never distilled
        super().reset(ws)

    def check(self, ctx: StageContext) -> None:
        cfg: DistillConfig = ctx.cfg
        if cfg.backend in ("transformers", "vllm") and cfg.model_path is None:
            raise ConfigError(f"distill.backend={cfg.backend} needs distill.model_path (a local model folder or hub id)")
        if cfg.backend == "scripted-teacher" and ctx.config.world is None:
            raise ConfigError("distill.backend=scripted-teacher is the demo stand-in: it needs a demo `world` section")
        super().check(ctx)

    def estimate(self, ctx: StageContext) -> Estimate | None:
        from fvqa.pipelines.probe_estimate import estimate_distill

        return estimate_distill(ctx)

    def run(self, ctx: StageContext) -> None:
        cfg: DistillConfig = ctx.cfg
        teacher = teacher_name(cfg)
        stored = {t for (t,) in ctx.ws.execute("SELECT DISTINCT teacher FROM distill_attempts") if t is not None}
        if stored - {teacher}:
            raise ConfigError(
                f"distilled attempts in this workspace come from {', '.join(sorted(stored))}; this config's teacher "
                f"is {teacher}. Run `fvqa build --force distill` to distil again, or keep the old teacher settings")
        rows = split_rows(ctx.ws, cfg)
        if not rows:
            ctx.stats.notes.append(f"no labelled items in split {cfg.split!r}: nothing to distil")
        todo = set(ctx.todo([r["item_id"] for r in rows]))
        work = [r for r in rows if r["item_id"] in todo]
        ctx.stats.n_in = len(work)
        if work:
            generator = self._generator(ctx, cfg, rows)
            tools = self._tools(ctx, cfg)
            try:
                _distil(ctx, cfg, work, teacher, generator, tools)
            finally:
                tools.close()
            if cfg.backend == "scripted-teacher":
                from fvqa.demo.teacher import STANDIN_NOTE

                ctx.stats.notes.append(STANDIN_NOTE)
        ctx.commit()
        _select(ctx, cfg, teacher)

    # -- parts ---------------------------------------------------------------------------------
    def _generator(self, ctx: StageContext, cfg: DistillConfig, rows: list[dict[str, Any]]) -> Generator:
        if cfg.backend == "scripted-teacher":
            from fvqa.demo.teacher import ScriptedTeacher, hints_from_rows

            return ScriptedTeacher(ctx.config.world.path, hints_from_rows(rows))
        if cfg.backend == "openai":
            from fvqa.generators.openai_chat import OpenAIChatGenerator
            from fvqa.llm.config import LLMConfig

            return OpenAIChatGenerator(cfg.llm or LLMConfig(), ctx.ws.cache_dir / "llm", stage=STAGE,
                                       section="distill.llm")
        from fvqa.generators import make_generator

        return make_generator(cfg.backend, model_path=cfg.model_path, device=cfg.device, stage=STAGE)

    def _tools(self, ctx: StageContext, cfg: DistillConfig) -> ThumbnailRecorder:
        return ThumbnailRecorder(stage_search_tools(ctx), cfg.limits)


def stored_attempts(ws: Workspace, item_ids: Sequence[str], k: int) -> dict[str, dict[int, dict[str, Any]]]:
    """Attempts an earlier (interrupted or partly failed) run already made, per item and index."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    if not item_ids:
        return out
    cur = ws.con.execute(
        "SELECT item_id, attempt, correct, format_valid, reject_code FROM distill_attempts "
        "WHERE attempt < ? AND item_id IN (SELECT unnest(?::VARCHAR[]))", [k, list(item_ids)])
    for item_id, idx, correct, valid, code in cur.fetchall():
        out.setdefault(item_id, {})[idx] = dict(correct=correct, format_valid=valid, reject_code=code)
    return out


def _distil(ctx: StageContext, cfg: DistillConfig, rows: list[dict[str, Any]], teacher: str, generator: Generator,
            tools: ThumbnailRecorder) -> None:
    prompts = load_prompts(cfg.prompts)
    prov_base = {"teacher": teacher, "backend": cfg.backend, "generator": generator.name, "k": cfg.k,
                 "temperature": cfg.temperature, "seed": cfg.seed, "format_rule": cfg.format_rule,
                 "limits": cfg.limits.model_dump(), "prompts": sorted(set(prompts.source.values())),
                 "demo_standin": cfg.backend == "scripted-teacher"}
    if cfg.backend == "scripted-teacher":
        from fvqa.demo.teacher import STANDIN_NOTE

        prov_base["note"] = STANDIN_NOTE
    have_all = stored_attempts(ctx.ws, [r["item_id"] for r in rows], cfg.k)
    stored_images = ctx.ws.keys("distill_images", "sha256")
    chunk = max(1, ctx.batch_size // max(1, cfg.k))
    codes: Counter[str] = Counter()
    deferred: list[str] = []
    failures: list[str] = []
    resumed = 0
    for start in ctx.progress(range(0, len(rows), chunk), description=f"distill: {generator.name} ({chunk}/step)"):
        items = agent_items(ctx, rows[start:start + chunk])
        plan = [(r, i, Job(it, "search", sampling_for(cfg, r["item_id"], i)))
                for r, it in items for i in range(cfg.k) if i not in have_all.get(r["item_id"], {})]
        trajs = run_many([job for _, _, job in plan], generator, tools, cfg.limits, prompts) if plan else []
        made: dict[str, list[tuple[int, Trajectory]]] = {}
        for (r, i, _), traj in zip(plan, trajs, strict=True):
            made.setdefault(r["item_id"], []).append((i, traj))
        for r, _ in items:
            item_id = r["item_id"]
            have = dict(have_all.get(item_id, {}))
            resumed += bool(have)
            errors = []
            for i, traj in made.get(item_id, []):
                if traj.stop_reason == "error":
                    errors.append(traj.stop_detail)
                    continue
                row = attempt_row(r, i, traj, cfg, teacher)
                codes[row["reject_code"] or "usable"] += 1
                if row["reject_code"] is None:  # keep the thumbnails it showed, for the export
                    for sha in traj.image_shas[1:]:
                        if sha not in stored_images and sha in tools.seen:
                            ctx.emit("distill_images", dict(sha256=sha, data=tools.seen[sha]))
                            stored_images.add(sha)
                ctx.emit("distill_attempts", row)  # kept whatever happens to its siblings
                have[i] = row
            if errors:
                permanent = [e for e in errors if is_permanent_failure(e)]
                if permanent:
                    ctx.reject(item_id, TEACHER_CALL_FAILED,
                               f"{len(errors)} of {cfg.k} attempts failed; first: {permanent[0]}")
                else:
                    deferred.append(item_id)
                    failures.append(errors[0])
                continue
            outcomes = [have[i] for i in range(cfg.k)]
            usable = sum(o["reject_code"] is None for o in outcomes)
            if not usable:
                why = Counter(o["reject_code"] for o in outcomes)
                ctx.reject(item_id, NO_USABLE_ATTEMPT,
                           f"{cfg.k} attempts: " + ", ".join(f"{c} {n}" for c, n in sorted(why.items())))
                continue
            ctx.emit("distill_items", dict(
                item_id=item_id, teacher=teacher, search_label=r["search_label"], n_attempts=cfg.k,
                n_correct=sum(bool(o["correct"]) for o in outcomes),
                n_format_valid=sum(bool(o["format_valid"]) for o in outcomes), n_usable=usable,
                provenance=json.dumps({STAGE: {**prov_base, "time": now().isoformat()}})))
        ctx.commit()
    book_generator_spend(ctx, generator, STAGE)
    if codes:
        ctx.stats.notes.append("attempts this run: " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items())))
    ctx.stats.extra["attempts"] = dict(codes)
    if resumed:
        ctx.stats.notes.append(f"{resumed} item(s) resumed from attempts an earlier run kept")
    if deferred:
        ctx.stats.notes.append(
            f"{len(deferred)} item(s) deferred: a teacher call failed ({failures[0]}); their successful attempts "
            "are kept and the next run makes only the missing ones")


def _select(ctx: StageContext, cfg: DistillConfig, teacher: str) -> None:
    """Recompute `distill_kept` from every usable attempt of a completed item still in the split."""
    ws = ctx.ws
    cands = [Candidate(i, a, p, lab) for i, a, p, lab in ws.execute(
        "SELECT a.item_id, a.attempt, a.search_pattern, d.search_label FROM distill_attempts a "
        "JOIN distill_items USING (item_id) JOIN dataset d USING (item_id) "
        "WHERE a.reject_code IS NULL AND a.teacher = ? AND a.attempt < ? AND d.split = ? "
        "AND d.search_label IS NOT NULL AND d.search_label <> 'unanswerable'", [teacher, cfg.k, cfg.split])]
    b = cfg.balance
    sel = select(cands, per_item=b.per_item, max_ratio=b.max_ratio, max_per_label=b.max_per_label,
                 label_rule=b.label_rule, seed=b.seed)
    at = now()
    kept = [dict(item_id=c.item_id, attempt=c.attempt, teacher=teacher, search_pattern=c.search_pattern,
                 search_label=c.search_label, rank=n, selected_at=at) for n, c in enumerate(sel.kept)]
    with ws.transaction():
        ws.execute("DELETE FROM distill_kept")
        ws.insert("distill_kept", kept)
    cells = Counter((c.search_label, c.search_pattern) for c in sel.kept)
    ctx.stats.extra["kept"] = {f"{lab}/{pat}": n for (lab, pat), n in sorted(cells.items())}
    ctx.stats.extra["candidates"] = len(cands)
    ctx.stats.notes.append(
        f"kept {len(sel.kept)} of {len(cands)} usable trajectories: " + (", ".join(
            f"{lab}/{pat} {n}" for (lab, pat), n in sorted(cells.items())) or "none"))
    dropped = {"pattern_label_mismatch": len(sel.mismatched), "over_item_cap": len(sel.over_item_cap),
               "over_label_cap": len(sel.over_label_cap)}
    if any(dropped.values()):
        ctx.stats.notes.append("left out by the balance rule: " + ", ".join(
            f"{k} {v}" for k, v in dropped.items() if v))


__all__ = ["REJECT_CODES", "DistillStage", "teacher_name"]
