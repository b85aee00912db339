"""The FVQA item: one explicit Arrow schema and one pydantic model, so every export agrees.

Keeping both side by side (and a test that they list the same fields) means a column added to one
cannot silently be missing from the other.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 3
"""Version of the workspace tables (``fvqa.store``) and of this schema; v2 added ``items.data_id``,
v3 made reject reasons codes (``fvqa.reasons``)."""


class Source(StrEnum):
    """Where an item came from."""

    metaclip = "metaclip"
    infoseek = "infoseek"
    manual = "manual"
    imported = "import"


class KnowledgeType(StrEnum):
    """The paper's eight level-1 knowledge types."""

    Arts = "Arts"
    Place = "Place"
    People = "People"
    Industry = "Industry"
    Science = "Science"
    Nature = "Nature"
    Entities = "Entities"
    Events = "Events"


class SearchLabel(StrEnum):
    """The 4-way search need (plus unanswerable) that the released dataset collapsed to 2 ways."""

    search_free = "search_free"
    image_search_required = "image_search_required"
    text_search_required = "text_search_required"
    mixed_search_required = "mixed_search_required"
    unanswerable = "unanswerable"

    @property
    def coarse(self) -> str:
        """Upstream's 2-way `category` (search_free | search_required)."""
        return "search_free" if self is SearchLabel.search_free else "search_required"


class Split(StrEnum):
    """Dataset split."""

    train = "train"
    test = "test"
    unassigned = "unassigned"


class AnnotationStatus(StrEnum):
    """Human review state; `gold` decisions are never overwritten by a pipeline re-run."""

    unreviewed = "unreviewed"
    kept = "kept"
    fixed = "fixed"
    rejected = "rejected"
    manual = "manual"


ITEM_ARROW_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("data_id", pa.string()),  # upstream's id (key of its image-search cache); None if none
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("aliases", pa.list_(pa.string())),
        pa.field("answer_eval", pa.string()),  # JSON: InfoSeek answer_eval (strings or numeric range)
        pa.field("question_type", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("image_ext", pa.string()),
        pa.field("image_url", pa.string()),
        pa.field("page_url", pa.string()),
        pa.field("page_title", pa.string()),
        pa.field("concept", pa.string()),
        pa.field("concept_count", pa.int64()),
        pa.field("concept_tier", pa.string()),
        pa.field("entity_id", pa.string()),
        pa.field("entity_text", pa.string()),
        pa.field("knowledge_type", pa.string()),
        pa.field("knowledge_subtype", pa.string()),
        pa.field("tag_confidence", pa.float64()),
        pa.field("p_direct", pa.float64()),
        pa.field("p_search", pa.float64()),
        pa.field("probe_k", pa.int64()),
        pa.field("probe_method", pa.string()),
        pa.field("search_label", pa.string()),
        pa.field("split", pa.string()),
        pa.field("annotation_status", pa.string()),
        pa.field("provenance", pa.string()),  # JSON: {stage: {backend, model, prompt_hash, time}}
    ],
    metadata={"fvqa_schema_version": str(SCHEMA_VERSION)},
)


class FVQAItem(BaseModel):
    """One FVQA item with its lineage (DESIGN §3)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=True)

    item_id: str
    source: Source
    data_id: str | None = None
    question: str
    answer: str
    aliases: list[str] = Field(default_factory=list)
    answer_eval: str | None = None
    question_type: str | None = None
    image_sha256: str | None = None
    image_ext: str | None = None
    image_url: str | None = None
    page_url: str | None = None
    page_title: str | None = None
    concept: str | None = None
    concept_count: int | None = None
    concept_tier: str | None = None
    entity_id: str | None = None
    entity_text: str | None = None
    knowledge_type: KnowledgeType | None = None
    knowledge_subtype: str | None = None
    tag_confidence: float | None = None
    p_direct: float | None = None
    p_search: float | None = None
    probe_k: int | None = None
    probe_method: str | None = None
    search_label: SearchLabel | None = None
    split: Split = Split.unassigned
    annotation_status: AnnotationStatus = AnnotationStatus.unreviewed
    provenance: str = "{}"
