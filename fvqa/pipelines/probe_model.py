"""The model probe: k sampled search-agent rollouts and k direct answers per item -> label + audit rows.

Items go in chunks; each chunk's 2k rollouts per item advance together (one batched generator call
per round), then each item's rollouts and its label are emitted together, so a crash loses at most
the chunk in flight (and HTTP backends replay it from their cache: the per-rollout seed is part of
the request). Correctness is exact match after SQuAD normalisation against answer + aliases.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from fvqa.agent import Job, run_many
from fvqa.answers import exact_match
from fvqa.config import ProbeConfig
from fvqa.generators import Sampling, make_generator
from fvqa.generators.base import Generator
from fvqa.pipelines.base import StageContext
from fvqa.pipelines.probe_labels import RolloutOutcome, label_from_rollouts
from fvqa.protocol import AgentItem, Trajectory, load_prompts
from fvqa.schema import SearchLabel
from fvqa.store import now

STAGE = "probe"


def rollout_seed(base_seed: int, item_id: str, index: int) -> int:
    """A stable per-rollout seed (same item, same index -> same seed on every run and machine)."""
    digest = hashlib.sha256(f"{base_seed}:{item_id}".encode()).hexdigest()
    return (int(digest[:8], 16) + index) % (2**31 - 1)


def upstream_data_id(row: dict[str, Any]) -> str | None:
    """The item's upstream data_id (the column ``items.data_id``), for the replayed image-search cache."""
    return str(row["data_id"]) if row.get("data_id") else None


def jobs_for(item: AgentItem, cfg: ProbeConfig) -> list[Job]:
    """k search rollouts then k direct ones, each with its own seed."""
    def sampling(i: int) -> Sampling:
        return Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                        seed=rollout_seed(cfg.seed, item.item_id, i))

    return ([Job(item, "search", sampling(i)) for i in range(cfg.k)]
            + [Job(item, "direct", sampling(cfg.k + i)) for i in range(cfg.k)])


def is_correct(traj: Trajectory, golds: Sequence[str]) -> bool:
    """Exact match after SQuAD normalisation (shared with the reward and eval)."""
    return traj.answer is not None and bool(exact_match(traj.answer, golds))


def rollout_rows(item_id: str, trajs: Sequence[Trajectory], golds: Sequence[str]) -> list[dict[str, Any]]:
    """One `probe_rollouts` row per trajectory (index within its mode)."""
    rows, seen = [], {"search": 0, "direct": 0}
    for t in trajs:
        rows.append(dict(
            item_id=item_id, rollout=seen[t.mode], mode=t.mode, correct=is_correct(t, golds),
            used_image_search=t.n_image_search > 0, used_text_search=t.n_text_search > 0, answer=t.answer,
            n_turns=len(t.turns), prompt_tokens=t.prompt_tokens, completion_tokens=t.completion_tokens,
            stop_reason=t.stop_reason, trajectory=json.dumps(t.to_dict(), ensure_ascii=False)))
        seen[t.mode] += 1
    return rows


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


def run_model_probe(ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]], method: str,
                    generator: Generator | None = None, tools: Any = None) -> None:
    """Probe `rows` with the configured model; emit rollouts, labels and rejects through `ctx`."""
    if generator is None:
        generator = make_generator(cfg.backend, llm=cfg.llm, model_path=cfg.model_path, device=cfg.device,
                                   cache_dir=ctx.ws.cache_dir / "llm", stage=STAGE)
    if tools is None:
        from fvqa.search.tools import make_search_tools

        def search_cost(kind: str, n_calls: int, usd: float) -> None:
            ctx.stats.paid_calls += n_calls
            ctx.stats.cost_usd += usd

        tools = make_search_tools(ctx.config.search, cache_dir=ctx.ws.cache_dir / "search", cost_hook=search_cost)
    try:
        _probe(ctx, cfg, rows, method, generator, tools)
    finally:
        close = getattr(tools, "close", None)
        if callable(close):
            close()


def _probe(ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]], method: str, generator: Generator,
           tools: Any) -> None:
    prompts = load_prompts(cfg.prompts)
    limits = cfg.limits
    prov_base = {"method": method, "backend": cfg.backend, "generator": generator.name, "k": cfg.k,
                 "temperature": cfg.temperature, "seed": cfg.seed, "limits": limits.model_dump(),
                 "prompts": sorted(set(prompts.source.values()))}
    chunk = max(1, ctx.batch_size // max(1, 2 * cfg.k))
    labels: dict[str, int] = {}
    for start in ctx.progress(range(0, len(rows), chunk), description=f"probe: {generator.name} ({chunk}/step)"):
        items: list[tuple[dict[str, Any], AgentItem]] = []
        for r in rows[start:start + chunk]:
            try:
                image = ctx.ws.find_image(r["image_sha256"]).read_bytes() if r["image_sha256"] else None
            except (KeyError, OSError) as exc:
                image, why = None, str(exc)
            else:
                why = "item has no image"
            if image is None:
                ctx.reject(r["item_id"], "image missing", why)
                continue
            items.append((r, AgentItem(r["item_id"], r["question"], image, r.get("image_url"), upstream_data_id(r))))
        jobs = [j for _, it in items for j in jobs_for(it, cfg)]
        trajs = run_many(jobs, generator, tools, limits, prompts) if jobs else []
        for n, (r, _) in enumerate(items):
            mine = trajs[n * 2 * cfg.k:(n + 1) * 2 * cfg.k]
            errors = [t.stop_detail for t in mine if t.stop_reason == "error"]
            if errors:
                ctx.reject(r["item_id"], "probe model call failed",
                           f"{len(errors)} of {len(mine)} rollouts failed; first: {errors[0]}")
                continue
            golds = [r["answer"], *(r["aliases"] or [])]
            rrows = rollout_rows(r["item_id"], mine, golds)
            for row in rrows:
                ctx.emit("probe_rollouts", row)
            label = label_row(r["item_id"], rrows, cfg.k, method, {**prov_base, "time": now().isoformat()})
            labels[label["search_label"]] = labels.get(label["search_label"], 0) + 1
            ctx.emit("labels", label)
        ctx.commit()
    cost = getattr(generator, "ledger", None)
    if cost is not None:
        totals = cost.stage(STAGE)
        ctx.stats.cost_usd += totals.usd
        ctx.stats.paid_calls += totals.calls
        ctx.stats.cache_hits += totals.cache_hits
    ctx.stats.notes.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(labels.items())))
    if labels.get(SearchLabel.unanswerable):
        ctx.stats.notes.append(f"{labels[SearchLabel.unanswerable]} unanswerable item(s) will be excluded by split")
