"""Build stages, in pipeline order. Each lives in its own module and is imported only when run."""

from __future__ import annotations

import importlib

from fvqa.pipelines.base import Stage

# name -> "module:Class"; order is the build order.
STAGES: dict[str, str] = {
    "match": "fvqa.pipelines.match:MatchStage",  # before concepts: it can supply the entry counts
    "concepts": "fvqa.pipelines.concepts:ConceptsStage",
    "crawl": "fvqa.pipelines.crawl:CrawlStage",
    "generate": "fvqa.pipelines.generate:GenerateStage",
    "infoseek": "fvqa.pipelines.infoseek:InfoseekStage",
    "tag": "fvqa.pipelines.tag:TagStage",
    "index": "fvqa.pipelines.index:IndexStage",
    "probe": "fvqa.pipelines.probe:ProbeStage",
    "split": "fvqa.pipelines.split:SplitStage",
    "distill": "fvqa.pipelines.distill:DistillStage",  # optional (distill.enabled): SFT trajectories
    "export": "fvqa.pipelines.export:ExportStage",
}


def load_stage(name: str) -> Stage:
    """Instantiate a stage by name (lazy import keeps `fvqa --help` fast)."""
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
