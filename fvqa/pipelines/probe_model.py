"""The model probe: k sampled search-agent rollouts and k direct answers per item -> label + audit rows.

Items go in chunks; each chunk's 2k rollouts per item advance together (one batched generator call
per round), then each item's successful rollouts (and its label, once all 2k are in) are committed
together, so a crash loses at most the chunk in flight (and HTTP backends replay it from their
cache: the per-rollout seed is part of the request). Correctness is exact match after SQuAD
normalisation against answer + aliases.

Every successful rollout is kept, whatever happens to its siblings. An item with a rollout whose
model call failed transiently (timeout, 5xx, rate limit, an engine error) is *deferred*: it gets no
label and no reject, and the next run makes only its missing rollouts — paid ones are never made
twice, for any backend. Only a failure that would repeat (HTTP 400/413/422, an image the endpoint
cannot take) rejects the item; an endpoint refusing the key or model stops the stage.

With `executor: ray` the rollouts of each chunk run on a Ray worker (`fvqa.pipelines.probe_remote`);
planning, rows, labels, deferrals, commits and spend stay here on the driver, in the same code
(`plan_rollouts`, `record_chunk`, `ProbeTally`), so both ways write the same rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvqa.agent import Job, Mode, run_many
from fvqa.answers import exact_match
from fvqa.config import ProbeConfig
from fvqa.executor import uses_ray
from fvqa.generators import Sampling, make_generator
from fvqa.generators.base import Generator
from fvqa.llm.client import CACHEABLE_STATUS
from fvqa.pipelines.base import StageContext
from fvqa.pipelines.probe_labels import RolloutOutcome, label_from_rollouts
from fvqa.protocol import AgentItem, Prompts, Trajectory, load_prompts
from fvqa.schema import SearchLabel
from fvqa.store import now

STAGE = "probe"


def rollout_seed(base_seed: int, item_id: str, index: int) -> int:
    """A stable per-rollout seed (same item, same index -> same seed on every run and machine)."""
    digest = hashlib.sha256(f"{base_seed}:{item_id}".encode()).hexdigest()
    return (int(digest[:8], 16) + index) % (2**31 - 1)


def image_file(ctx: StageContext, row: dict[str, Any]) -> tuple[Path | None, str]:
    """The stored image file of a dataset row, or (None, why there is none)."""
    if not row["image_sha256"]:
        return None, "item has no image"
    try:
        return ctx.ws.find_image(row["image_sha256"]), ""
    except KeyError as exc:
        return None, str(exc)


def agent_items(ctx: StageContext, rows: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], AgentItem]]:
    """(row, AgentItem) for each dataset row whose image is in the store; the others are rejected
    (`image_missing`), so a rollout stage never asks a model about an image it cannot send."""
    items: list[tuple[dict[str, Any], AgentItem]] = []
    for r in rows:
        path, why = image_file(ctx, r)
        image = None
        if path is not None:
            try:
                image = path.read_bytes()
            except OSError as exc:
                why = str(exc)
        if image is None:
            ctx.reject(r["item_id"], "image_missing", why)
            continue
        items.append((r, AgentItem(r["item_id"], r["question"], image, r.get("image_url"), upstream_data_id(r))))
    return items


def upstream_data_id(row: dict[str, Any]) -> str | None:
    """The item's upstream data_id (the column ``items.data_id``), for the replayed image-search cache."""
    return str(row["data_id"]) if row.get("data_id") else None


def rollout_slots(k: int) -> list[tuple[str, int]]:
    """The (mode, rollout index) of an item's 2k rollouts: k search ones, then k direct ones."""
    return [("search", i) for i in range(k)] + [("direct", i) for i in range(k)]


def plan_rollouts(item_id: str, cfg: ProbeConfig, have: set[tuple[str, int]] = frozenset()
                  ) -> list[tuple[tuple[str, int], Mode, Sampling]]:
    """(slot, mode, sampling) of each rollout of `item_id` still to make (not in `have`), each with its
    own seed: the seed is part of the request, so the same plan makes the same (cached) requests."""
    def sampling(i: int) -> Sampling:
        return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                        seed=rollout_seed(cfg.seed, item_id, i))

    return [((mode, i), "search" if mode == "search" else "direct",
             sampling(i if mode == "search" else cfg.k + i))
            for mode, i in rollout_slots(cfg.k) if (mode, i) not in have]


def jobs_for(item: AgentItem, cfg: ProbeConfig, have: set[tuple[str, int]] = frozenset()
             ) -> list[tuple[tuple[str, int], Job]]:
    """The rollouts of `item` still to make (not in `have`), each with its slot and its own seed."""
    return [(slot, Job(item, mode, s)) for slot, mode, s in plan_rollouts(item.item_id, cfg, have)]


def is_permanent_failure(error: str) -> bool:
    """Whether a failed model call would fail the same way again (the request itself is bad).

    The OpenAI-wire generator reports `"<error_class>: <message>"`; only its cacheable HTTP
    statuses and undecodable images are permanent. Everything else (timeouts, 5xx, rate limits,
    local engine errors such as out-of-memory) is worth another try on the next run."""
    cls = error.split(":", 1)[0].strip()
    return cls == "bad_image" or cls in {f"http_{s}" for s in CACHEABLE_STATUS}


def is_correct(traj: Trajectory, golds: Sequence[str]) -> bool:
    """Exact match after SQuAD normalisation (shared with the reward and eval)."""
    return traj.answer is not None and bool(exact_match(traj.answer, golds))


def rollout_row(item_id: str, index: int, t: Trajectory, golds: Sequence[str], method: str) -> dict[str, Any]:
    """The `probe_rollouts` row of one trajectory (`index` within its mode)."""
    return dict(
        item_id=item_id, rollout=index, mode=t.mode, correct=is_correct(t, golds),
        used_image_search=t.n_image_search > 0, used_text_search=t.n_text_search > 0, answer=t.answer,
        n_turns=len(t.turns), prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
        stop_reason=t.stop_reason, trajectory=json.dumps(t.to_dict(), ensure_ascii=False), probe_method=method)


def label_row(item_id: str, rows: Sequence[dict[str, Any]], k: int, method: str, prov: dict[str, Any]
              ) -> dict[str, Any]:
    """The item's `labels` row from its rollout rows."""
    label = label_from_rollouts([RolloutOutcome(r["correct"], r["used_image_search"], r["used_text_search"])
                                 for r in rows])
    direct = [r["correct"] for r in rows if r["mode"] == "direct"]
    search = [r["correct"] for r in rows if r["mode"] == "search"]
    return dict(item_id=item_id, search_label=str(label),
                p_direct=sum(direct) / len(direct) if direct else None,
                p_search=sum(search) / len(search) if search else None,
                probe_k=k, probe_method=method, provenance=json.dumps({STAGE: prov}))


def stage_search_tools(ctx: StageContext) -> Any:
    """The configured search tools, their paid calls and dollars booked on the stage's stats."""
    from fvqa.search.tools import make_search_tools

    def search_cost(kind: str, n_calls: int, usd: float) -> None:
        ctx.stats.paid_calls += n_calls
        ctx.stats.cost_usd += usd

    return make_search_tools(ctx.config.search, cache_dir=ctx.ws.cache_dir / "search", cost_hook=search_cost)


def book_generator_spend(ctx: StageContext, generator: Generator, stage: str) -> None:
    """Add what a paid generator's ledger booked for `stage` (calls, dollars, cache hits) to the stats."""
    ledger = getattr(generator, "ledger", None)
    if ledger is not None:
        totals = ledger.stage(stage)
        ctx.stats.cost_usd += totals.usd
        ctx.stats.paid_calls += totals.calls
        ctx.stats.cache_hits += totals.cache_hits


def probe_generator(cfg: ProbeConfig, cache_dir: Path) -> Generator:
    """The probe's model client over the workspace's response cache in `cache_dir` (here or in a Ray worker)."""
    return make_generator(cfg.backend, llm=cfg.llm, model_path=cfg.model_path, device=cfg.device,
                          cache_dir=cache_dir, stage=STAGE)


def run_model_probe(ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]], method: str,
                    generator: Generator | None = None, tools: Any = None) -> None:
    """Probe `rows` with the configured model; emit rollouts, labels and rejects through `ctx`.

    With `executor: ray` (and no generator or tools handed in) the rollouts run on Ray workers."""
    if generator is None and tools is None and uses_ray(ctx.config):
        from fvqa.pipelines.probe_remote import run_remote_probe

        run_remote_probe(ctx, cfg, rows, method)
        return
    if generator is None:
        generator = probe_generator(cfg, ctx.ws.cache_dir / "llm")
    if tools is None:
        tools = stage_search_tools(ctx)
    try:
        _probe(ctx, cfg, rows, method, generator, tools)
    finally:
        close = getattr(tools, "close", None)
        if callable(close):
            close()


def stored_rollouts(ctx: StageContext, item_ids: Sequence[str], k: int) -> dict[str, dict[tuple[str, int], dict]]:
    """Rollouts an earlier (interrupted or partly failed) run already made, per item and slot."""
    out: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    if not item_ids:
        return out
    cur = ctx.ws.con.execute(
        "SELECT item_id, mode, rollout, correct, used_image_search, used_text_search FROM probe_rollouts "
        "WHERE rollout < ? AND item_id IN (SELECT unnest(?::VARCHAR[]))", [k, list(item_ids)])
    for item_id, mode, idx, correct, img, txt in cur.fetchall():
        out.setdefault(item_id, {})[(mode, idx)] = dict(mode=mode, correct=correct, used_image_search=img,
                                                        used_text_search=txt)
    return out


def chunk_size(ctx: StageContext, cfg: ProbeConfig) -> int:
    """Items per chunk: a batch of rollouts (2k per item) advances and is committed together."""
    return max(1, ctx.batch_size // max(1, 2 * cfg.k))


def provenance_base(cfg: ProbeConfig, method: str, prompts: Prompts, generator_name: str) -> dict[str, Any]:
    """What every label's provenance says about how it was made (the time is added per label)."""
    return {"method": method, "backend": cfg.backend, "generator": generator_name, "k": cfg.k,
            "temperature": cfg.temperature, "seed": cfg.seed, "limits": cfg.limits.model_dump(),
            "prompts": sorted(set(prompts.source.values()))}


@dataclass
class ProbeTally:
    """What a run's chunks add up to, for the stage's notes."""

    labels: dict[str, int] = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)  # item ids
    failures: list[str] = field(default_factory=list)  # first error of each deferred item
    resumed: int = 0

    def notes(self, ctx: StageContext) -> None:
        ctx.stats.notes.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        if self.resumed:
            ctx.stats.notes.append(f"{self.resumed} item(s) resumed from rollouts an earlier run kept")
        if self.deferred:
            ctx.stats.notes.append(
                f"{len(self.deferred)} item(s) deferred: a model call failed ({self.failures[0]}); their "
                "successful rollouts are kept and the next run makes only the missing ones")
        if self.labels.get(SearchLabel.unanswerable):
            ctx.stats.notes.append(
                f"{self.labels[SearchLabel.unanswerable]} unanswerable item(s) will be excluded by split")


def record_chunk(ctx: StageContext, cfg: ProbeConfig, method: str, prov_base: dict[str, Any],
                 rows: Sequence[dict[str, Any]], slots: Sequence[tuple[str, tuple[str, int]]],
                 trajs: Sequence[Trajectory], have_all: dict[str, dict[tuple[str, int], dict]],
                 tally: ProbeTally) -> None:
    """Emit one chunk's rollouts, labels and rejects (or defer its items), then commit.

    `rows` are the chunk's items with an image; `slots` names the (item id, slot) of each made
    trajectory in `trajs`, in the same order; `have_all` holds what earlier runs kept."""
    made: dict[str, list[tuple[tuple[str, int], Trajectory]]] = {}
    for (item_id, slot), traj in zip(slots, trajs, strict=True):
        made.setdefault(item_id, []).append((slot, traj))
    for r in rows:
        item_id = r["item_id"]
        golds = [r["answer"], *(r["aliases"] or [])]
        have = dict(have_all.get(item_id, {}))
        tally.resumed += bool(have)
        errors = []
        for (mode, idx), traj in made.get(item_id, []):
            if traj.stop_reason == "error":
                errors.append(traj.stop_detail)
                continue
            row = rollout_row(item_id, idx, traj, golds, method)
            ctx.emit("probe_rollouts", row)  # kept whatever happens to its siblings
            have[(mode, idx)] = row
        if errors:
            permanent = [e for e in errors if is_permanent_failure(e)]
            if permanent:
                ctx.reject(item_id, "model_call_failed",
                           f"{len(errors)} of {2 * cfg.k} rollouts failed; first: {permanent[0]}")
            else:
                tally.deferred.append(item_id)
                tally.failures.append(errors[0])
            continue
        outcomes = [have[slot] for slot in rollout_slots(cfg.k)]
        label = label_row(item_id, outcomes, cfg.k, method, {**prov_base, "time": now().isoformat()})
        tally.labels[label["search_label"]] = tally.labels.get(label["search_label"], 0) + 1
        ctx.emit("labels", label)
    ctx.commit()


def _probe(ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]], method: str, generator: Generator,
           tools: Any) -> None:
    prompts = load_prompts(cfg.prompts)
    prov_base = provenance_base(cfg, method, prompts, generator.name)
    have_all = stored_rollouts(ctx, [r["item_id"] for r in rows], cfg.k)
    chunk = chunk_size(ctx, cfg)
    tally = ProbeTally()
    for start in ctx.progress(range(0, len(rows), chunk), description=f"probe: {generator.name} ({chunk}/step)"):
        items = agent_items(ctx, rows[start:start + chunk])
        plan = [(r["item_id"], slot, job) for r, it in items
                for slot, job in jobs_for(it, cfg, set(have_all.get(r["item_id"], {})))]
        trajs = run_many([job for _, _, job in plan], generator, tools, cfg.limits, prompts) if plan else []
        record_chunk(ctx, cfg, method, prov_base, [r for r, _ in items], [(i, slot) for i, slot, _ in plan],
                     trajs, have_all, tally)
    book_generator_spend(ctx, generator, STAGE)
    tally.notes(ctx)
