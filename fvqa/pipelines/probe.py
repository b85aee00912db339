"""Probe: how much does a model need search for each item? items -> `labels` (+ `probe_rollouts`).

Two ways, never mixed in one workspace (a run whose method differs from the stored labels stops
with an error that says to `--force probe`):

* `popularity` (offline default): a prior from MetaCLIP match counts — the item's
  `concept_count`, else the count of its concept / entity name in `concepts`, else in the MetaCLIP
  counts file. Rule and probabilities in `fvqa.pipelines.probe_labels`; every row says
  `probe_method='popularity-prior'`.
* `openai` | `transformers` | `vllm`: per item, k sampled rollouts of the search agent
  (`fvqa.agent`) plus k direct answers; each scored by exact match after SQuAD normalisation
  against answer + aliases; the label follows the rollout rule. Every rollout is kept in
  `probe_rollouts` with its full trajectory, for audit (`fvqa sql "SELECT * FROM probe_rollouts"`);
  an item whose rollouts failed transiently is deferred and resumed (`fvqa.pipelines.probe_model`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fvqa.answers import normalize_answer
from fvqa.config import ProbeConfig, RunConfig
from fvqa.errors import ConfigError
from fvqa.pipelines.base import Estimate, Stage, StageContext
from fvqa.pipelines.probe_labels import (
    POPULARITY_METHOD,
    label_from_rollouts,
    prior_label,
    prior_probabilities,
    question_kind,
    tier_of,
)
from fvqa.store import Workspace, now

STAGE = "probe"
ROLLOUTS_DDL = """
CREATE TABLE IF NOT EXISTS probe_rollouts (
    item_id VARCHAR, rollout INTEGER, mode VARCHAR, correct BOOLEAN, used_image_search BOOLEAN,
    used_text_search BOOLEAN, answer VARCHAR, n_turns INTEGER, prompt_tokens BIGINT,
    completion_tokens BIGINT, stop_reason VARCHAR, trajectory VARCHAR, probe_method VARCHAR,
    PRIMARY KEY (item_id, mode, rollout))
"""
ROLLOUTS_MIGRATION = "ALTER TABLE probe_rollouts ADD COLUMN IF NOT EXISTS probe_method VARCHAR"
"""Workspaces from before rollouts were kept across runs: their rows have no method (always labelled)."""
ITEM_COLUMNS = ("item_id", "source", "data_id", "question", "answer", "aliases", "image_sha256", "image_url",
                "concept", "concept_count", "entity_text", "provenance")


def probe_method(cfg: ProbeConfig) -> str:
    """The `probe_method` value rows get: one per prior / model, so two never mix unnoticed."""
    if cfg.backend == "popularity":
        return POPULARITY_METHOD
    if cfg.backend == "openai":
        model = cfg.llm.model if cfg.llm is not None else "?"
    else:
        model = str(cfg.model_path)
    return f"rollouts:{cfg.backend}:{model}"


def load_counts(ws: Workspace, cfg: ProbeConfig, config: RunConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(normalised concept -> count from `concepts`, normalised entry -> count from the counts file)."""
    table = {normalize_answer(c): int(n) for c, n in ws.execute(
        "SELECT concept, count FROM concepts WHERE concept IS NOT NULL AND count IS NOT NULL")}
    path = cfg.counts_path  # default (at load): the concepts' counts file, else a demo world's, if there
    if path is None or not Path(path).is_file():
        if cfg.counts_path is not None:
            raise ConfigError(f"probe.counts_path not found: {cfg.counts_path}")
        return table, {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read MetaCLIP counts {path}: {exc}") from exc
    if isinstance(data, list):  # counts aligned with metadata.json's entry list
        meta = config.concepts.metadata_path
        if meta is None or not Path(meta).is_file():
            raise ConfigError(f"{path} is a list of counts; concepts.metadata_path is needed to name them")
        entries = json.loads(Path(meta).read_text(encoding="utf-8"))
        data = dict(zip(entries, data, strict=False))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping entry -> count (or a list aligned with metadata.json)")
    file_counts = {normalize_answer(str(k)): int(v) for k, v in data.items() if isinstance(v, int | float)}
    return table, file_counts


class ProbeStage(Stage):
    """items -> search-need labels (popularity prior offline, agent rollouts with a model)."""

    name = STAGE
    inputs = ("items",)
    outputs = ("labels", "probe_rollouts")
    description = "label each item's search need (popularity prior, or k rollouts with/without search)"

    def prepare(self, ws: Workspace) -> None:
        ws.ensure_table(ROLLOUTS_DDL)
        ws.execute(ROLLOUTS_MIGRATION)

    def reset(self, ws: Workspace) -> None:
        self.prepare(ws)  # `--force probe` on a workspace that never probed
        super().reset(ws)

    def estimate(self, ctx: StageContext) -> Estimate | None:
        """Calls, tokens and dollars as a range (`fvqa.pipelines.probe_estimate`)."""
        from fvqa.pipelines.probe_estimate import estimate_probe

        return estimate_probe(ctx)

    def run(self, ctx: StageContext) -> None:
        cfg: ProbeConfig = ctx.cfg
        method = probe_method(cfg)
        stored = {m for (m,) in ctx.ws.execute(
            "SELECT DISTINCT probe_method FROM labels UNION SELECT DISTINCT probe_method FROM probe_rollouts")
            if m is not None}  # kept rollouts of deferred items count: they would go into a label
        if stored - {method}:
            raise ConfigError(
                f"labels in this workspace come from {', '.join(sorted(stored))}; this config probes with "
                f"{method}. Labels from two methods are never mixed: run `fvqa build --force probe` to relabel "
                "every item, or keep the old probe settings"
            )
        cols = ", ".join(ITEM_COLUMNS)
        rows = [dict(zip(ITEM_COLUMNS, r, strict=True)) for r in ctx.ws.execute(
            f"SELECT {cols} FROM items ORDER BY item_id")]
        todo = set(ctx.todo([r["item_id"] for r in rows]))
        rows = [r for r in rows if r["item_id"] in todo]
        ctx.stats.n_in = len(rows)
        if cfg.backend == "popularity":
            self._prior(ctx, cfg, rows)
        else:
            from fvqa.pipelines.probe_model import run_model_probe

            run_model_probe(ctx, cfg, rows, method)

    def _prior(self, ctx: StageContext, cfg: ProbeConfig, rows: list[dict[str, Any]]) -> None:
        table, file_counts = load_counts(ctx.ws, cfg, ctx.config)
        unknown = 0
        for r in ctx.progress(rows, description="probe: popularity prior"):
            count, where = r["concept_count"], "items.concept_count"
            if count is None:
                for name in (r["concept"], r["entity_text"]):
                    key = normalize_answer(name or "")
                    if key and key in table:
                        count, where = table[key], "concepts"
                        break
                    if key and key in file_counts:
                        count, where = file_counts[key], "metaclip counts file"
                        break
            if count is None:
                unknown += 1
                where = "none found (treated as tail)"
            tier = tier_of(count, cfg.head_threshold, cfg.torso_threshold)
            kind = question_kind(r["source"], r["concept"] or r["entity_text"], r["answer"])
            label = prior_label(tier, kind)
            p_direct, p_search = prior_probabilities(count, cfg.head_threshold, label)
            prov = {"method": POPULARITY_METHOD, "count": count, "count_source": where, "tier": tier,
                    "question_kind": kind, "head_threshold": cfg.head_threshold,
                    "torso_threshold": cfg.torso_threshold, "time": now().isoformat()}
            ctx.emit("labels", dict(item_id=r["item_id"], search_label=str(label), p_direct=p_direct,
                                    p_search=p_search, probe_k=0, probe_method=POPULARITY_METHOD,
                                    provenance=json.dumps({STAGE: prov})))
        ctx.stats.notes.append(
            f"labels are a POPULARITY PRIOR from MetaCLIP counts (probe_method={POPULARITY_METHOD}), "
            "not model rollouts; set probe.backend to openai/transformers/vllm for a real probe")
        if unknown:
            ctx.stats.notes.append(f"{unknown} item(s) had no popularity count and were treated as tail")


__all__ = ["ProbeStage", "label_from_rollouts", "probe_method"]
