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
from fvqa.llm.ledger import estimate_cost
from fvqa.llm.structured import StructuredResult
from fvqa.pipelines.base import Estimate, Stage, StageContext
from fvqa.store import now
from fvqa.textgen import tagging
from fvqa.textgen.llm_run import cached_count, is_transient, run_structured
from fvqa.textgen.minilm import MODEL_NAME, shared_tagger
from fvqa.textgen.taxonomy import Taxonomy, build_taxonomy

STAGE = "tag"
COMPLETION_TOKENS = 25
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
            texts = [tagging.item_text(r) for r in chunk]
            for row, text, tag in zip(chunk, texts, tagger.tag(texts), strict=True):
                if not text:
                    ctx.reject(row["item_id"], "no text to tag", "item has no question, answer or subject")
                    continue
                self._emit(ctx, row["item_id"], tag.knowledge_type, tag.knowledge_subtype, tag.confidence, prov)

    def _run_llm(self, ctx: StageContext, taxonomy: Taxonomy, rows: list[dict[str, Any]]) -> None:
        cfg: TagConfig = ctx.cfg
        llm = llm_config(cfg)
        model_cls = tagging.reply_model(taxonomy)
        requests = {r["item_id"]: tagging.build_messages(taxonomy, r) for r in rows}
        transient: list[str] = []

        def on_result(rid: str, res: StructuredResult[Any]) -> None:
            if res.ok and res.value is not None:
                v = res.value
                sub = getattr(v, "knowledge_subtype", None)
                if sub is not None and sub not in taxonomy.subtypes.get(v.knowledge_type, {}):
                    ctx.reject(rid, "subtype not under the chosen type",
                               f"{sub!r} is not a subtype of {v.knowledge_type}\nraw reply: {res.raw}")
                    return
                prov = json.dumps({STAGE: {"backend": "llm", "model": llm.model, "repaired": res.repaired,
                                           "time": now().isoformat()}})
                self._emit(ctx, rid, v.knowledge_type, sub, float(v.confidence), prov)
            elif is_transient(res):
                transient.append(res.error_reason or "request failed")
            else:
                reason = "unparseable reply" if res.raw is not None else "LLM request failed"
                ctx.reject(rid, reason, f"{res.error_reason}\nraw reply: {res.raw}")

        totals = run_structured(llm, ctx.ws.cache_dir, STAGE, requests, model_cls, on_result,
                                batch_wait_s=cfg.batch_wait_s)
        ctx.stats.paid_calls += totals.paid_calls
        ctx.stats.cache_hits += totals.cache_hits
        ctx.stats.cost_usd += totals.usd
        if transient:
            ctx.stats.notes.append(f"{len(transient)} items not tagged ({transient[0]}); re-run to retry them")
        if totals.pending:
            ctx.stats.notes.append(f"{len(totals.pending)} requests still in a running batch; re-run to collect")

    def _emit(self, ctx: StageContext, key: str, ktype: str, sub: str | None, conf: float, prov: str) -> None:
        ctx.emit("tags", dict(item_id=key, knowledge_type=ktype, knowledge_subtype=sub, confidence=conf,
                              provenance=prov))

    def estimate(self, ctx: StageContext) -> Estimate | None:
        cfg: TagConfig = ctx.cfg
        if cfg.backend != "llm":
            return None
        llm = llm_config(cfg)
        taxonomy = taxonomy_of(cfg)
        todo = self._todo(ctx)
        requests = {r["item_id"]: tagging.build_messages(taxonomy, r) for r in todo}
        if requests or ctx.ws.count("items") > 0:
            cached = cached_count(llm, ctx.ws.cache_dir, requests, tagging.reply_model(taxonomy)) if requests else 0
            avg_prompt = sum(len(m[0]["content"]) for m in requests.values()) / 4 / max(1, len(requests))
            est = estimate_cost(len(requests), avg_prompt, COMPLETION_TOKENS, llm.price, cached=cached,
                                batch=llm.batch)
            note = f"{len(todo)} items to tag; {llm.model}"
        else:  # items not built yet: generated concepts plus sampled InfoSeek questions
            c = ctx.config
            n = (c.concepts.n if c.generate.enabled else 0) + (c.infoseek.n if c.infoseek.enabled else 0)
            prompt = tagging.build_messages(taxonomy, {"question": "x" * 80, "answer": "x" * 20})
            est = estimate_cost(n, len(prompt[0]["content"]) / 4, COMPLETION_TOKENS, llm.price, batch=llm.batch)
            note = f"~{n} items expected (concepts.n + infoseek.n); {llm.model}"
        return Estimate(paid_calls=est.paid_calls, cached=est.cached,
                        tokens=est.prompt_tokens + est.completion_tokens, usd=est.usd,
                        note=note + (" (batch price)" if llm.batch else ""))
