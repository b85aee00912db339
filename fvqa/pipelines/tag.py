"""tag: items -> knowledge type (the paper's eight level-1 types, optional level-2 subtypes).

Backends: `minilm` (offline zero-shot: embedding similarity between the item and each type's
one-line definition) and `llm` (JSON reply with type and confidence; the allowed types are part of
the requested schema, and an answer outside the taxonomy is a reject, never a guess).
"""

from __future__ import annotations

import json
from typing import Any

from fvqa.config import TagConfig
from fvqa.llm.config import LLMConfig
from fvqa.llm.task import Reply
from fvqa.pipelines.base import Estimate, Stage, StageContext
from fvqa.pipelines.llm_task import run_stage_task, stage_estimate
from fvqa.store import now
from fvqa.tagging.minilm import MODEL_NAME, item_text, shared_tagger
from fvqa.tagging.taxonomy import Taxonomy, build_taxonomy
from fvqa.textgen.tag_task import TagOut, TagTask

STAGE = TagTask.name
CHUNK = 256  # items embedded per MiniLM call (commits follow the context's batch size)


def llm_config(cfg: TagConfig) -> LLMConfig:
    return cfg.llm or LLMConfig()


def taxonomy_of(cfg: TagConfig) -> Taxonomy:
    return build_taxonomy(cfg.taxonomy, cfg.subtypes)


class TagStage(Stage):
    """items -> tags."""

    name = STAGE
    inputs = ("items",)
    outputs = ("tags",)
    description = "assign each item a knowledge type"

    def _todo(self, ctx: StageContext) -> list[dict[str, Any]]:
        cols = ("item_id", "question", "answer", "concept", "entity_text")
        rows = [dict(zip(cols, r, strict=True)) for r in ctx.ws.execute(
            "SELECT item_id, question, answer, concept, entity_text FROM items ORDER BY item_id")]
        ctx.stats.n_in = len(rows)
        keep = set(ctx.todo([r["item_id"] for r in rows]))
        return [r for r in rows if r["item_id"] in keep]

    def run(self, ctx: StageContext) -> None:
        cfg: TagConfig = ctx.cfg
        try:
            taxonomy = taxonomy_of(cfg)
        except ValueError as exc:
            from fvqa.errors import ConfigError

            raise ConfigError(f"tag.taxonomy: {exc}") from exc
        todo = self._todo(ctx)
        if not todo:
            return
        if cfg.backend == "minilm":
            self._run_minilm(ctx, taxonomy, todo)
        else:
            self._run_llm(ctx, taxonomy, todo)

    def _run_minilm(self, ctx: StageContext, taxonomy: Taxonomy, rows: list[dict[str, Any]]) -> None:
        tagger = shared_tagger(taxonomy)
        prov = json.dumps({STAGE: {"backend": "minilm", "model": MODEL_NAME, "time": now().isoformat()}})
        chunks = [rows[i:i + CHUNK] for i in range(0, len(rows), CHUNK)]
        for chunk in ctx.progress(chunks, description="tag (minilm)"):
            texts = [item_text(r) for r in chunk]
            for row, text, tag in zip(chunk, texts, tagger.tag(texts), strict=True):
                if not text:
                    ctx.reject(row["item_id"], "no_text", "item has no question, answer or subject")
                    continue
                self._emit(ctx, row["item_id"], tag.knowledge_type, tag.knowledge_subtype, tag.confidence, prov)

    def _run_llm(self, ctx: StageContext, taxonomy: Taxonomy, rows: list[dict[str, Any]]) -> None:
        cfg: TagConfig = ctx.cfg
        llm = llm_config(cfg)

        def on_output(key: str, tag: TagOut, reply: Reply) -> None:
            prov = json.dumps({STAGE: {"backend": "llm", "model": llm.model, "repaired": reply.repaired,
                                       "time": now().isoformat()}})
            self._emit(ctx, key, tag.knowledge_type, tag.knowledge_subtype, tag.confidence, prov)

        run_stage_task(ctx, TagTask(taxonomy), {r["item_id"]: r for r in rows}, llm, on_output,
                       batch_wait_s=cfg.batch_wait_s, not_done="items not tagged")

    def _emit(self, ctx: StageContext, key: str, ktype: str, sub: str | None, conf: float, prov: str) -> None:
        ctx.emit("tags", dict(item_id=key, knowledge_type=ktype, knowledge_subtype=sub, confidence=conf,
                              provenance=prov))

    def estimate(self, ctx: StageContext) -> Estimate | None:
        """Items to tag (their real requests, cache hits free), or before items exist those generate
        and infoseek are expected to make; the high end adds repairs."""
        from fvqa.pipelines import expected as ex

        cfg: TagConfig = ctx.cfg
        if cfg.backend != "llm":
            return None
        llm = ex.billed(llm_config(cfg))
        task = TagTask(taxonomy_of(cfg))
        if ctx.ws.count("items") > 0:
            todo = self._todo(ctx)
            est = stage_estimate(ctx, task, {r["item_id"]: r for r in todo}, llm, f"{len(todo)} items to tag")
            return ex.ranged(est, 1.0, 1 + ex.REPAIR_RATE, assumptions=[ex.repair_note(STAGE)])
        n, why = ex.expected_items(ctx.ws, ctx.config)
        est = stage_estimate(ctx, task, {}, llm, why, expected=round(n.mid))
        scale = n.mid or 1
        return ex.ranged(est, n.low / scale, n.high / scale * (1 + ex.REPAIR_RATE),
                         assumptions=[f"tag: {why}", "tag: an 80-char question and a 20-char answer per item",
                                      ex.repair_note(STAGE)])
