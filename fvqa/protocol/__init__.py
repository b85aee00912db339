"""The MMSearch-R1 tag protocol: prompts, tool-result rendering, turn parsing, limits, format rules.

This package is the one place that knows the protocol; the probe, the eval workflows, the veRL
agent loop and the reward all import it, so a rollout and its reward can never disagree about what
a turn meant. Tags and result strings are an interface shared with upstream
(EvolvingLMMs-Lab/multimodal-search-r1) and are reproduced exactly, so that upstream's released
checkpoints can be evaluated and upstream's reward reproduced:

* ``<reason>...</reason>`` before any action; ``<answer>...</answer>`` for the final answer;
* ``<search><img></search>`` at the end of a turn calls image search (no query);
* ``<text_search>QUERY</text_search>`` at the end of a turn calls text search;
* a tool result comes back in the next user turn as
  ``Searched results: <information>RESULT</information>\\nOriginal user's question: Q\\nFOLLOW-UP``.

Where upstream's rollout and its reward disagree or crash, the choice made here is written next to
the code (see ``Limits`` and ``trajectory_format``).

Modules: `wire` (tags, upstream's result strings, rendering, message texts), `turns` (parsing,
`Limits`, `next_action`), `format_rules`, `prompts` (loading, through the one restricted unpickler
in `unpickle`), `images` (bytes, decoding, the one thumbnail bound) and `episode` (what follows a
model turn: search calls, their records, the next user turn). Everything is re-exported here.
"""

from fvqa.protocol.episode import (
    NO_RESULTS,
    AgentItem,
    SearchKind,
    SearchOutcome,
    SearchTools,
    ToolCall,
    Trajectory,
    TurnRecord,
    search_outcomes,
)
from fvqa.protocol.format_rules import (
    UPSTREAM_SHAPES,
    FormatResult,
    FormatRule,
    Shape,
    allowed_shapes,
    count_searches,
    is_valid_answer_turn,
    is_valid_image_search_turn,
    is_valid_text_search_turn,
    trajectory_format,
)
from fvqa.protocol.images import (
    bound_thumbnail,
    decode_or_none,
    image_bytes,
    to_pil,
)
from fvqa.protocol.prompts import (
    UPSTREAM_PROMPT_FILES,
    PromptFileError,
    PromptName,
    Prompts,
    default_prompts,
    load_pickled_str,
    load_prompts,
)
from fvqa.protocol.turns import (
    Action,
    Limits,
    Turn,
    TurnKind,
    extract_answer,
    next_action,
    parse_turn,
)
from fvqa.protocol.unpickle import (
    RestrictedUnpickler,
    UnsafePickleError,
    safe_load,
    safe_loads,
)
from fvqa.protocol.wire import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    IMAGE_HIT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    IMAGE_RESULTS_HEADER,
    IMAGE_SEARCH_ERROR,
    IMAGE_SEARCH_TAG,
    MISSING_THUMBNAIL,
    QWEN_IMAGE_PAD,
    REASON_CLOSE,
    REASON_OPEN,
    STOP_STRINGS,
    TEXT_HIT_TEMPLATE,
    TEXT_RESULTS_HEADER,
    TEXT_SEARCH_CLOSE,
    TEXT_SEARCH_ERROR,
    TEXT_SEARCH_OPEN,
    ImageHit,
    TextHit,
    is_search_error,
    opening_user_text,
    rag_query_user_text,
    render_image_results,
    render_text_results,
    to_content_parts,
    tool_response_text,
)

__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "Action",
    "AgentItem",
    "FormatResult",
    "FormatRule",
    "IMAGE_HIT_TEMPLATE",
    "IMAGE_PLACEHOLDER",
    "IMAGE_RESULTS_HEADER",
    "IMAGE_SEARCH_ERROR",
    "IMAGE_SEARCH_TAG",
    "ImageHit",
    "Limits",
    "MISSING_THUMBNAIL",
    "NO_RESULTS",
    "PromptFileError",
    "PromptName",
    "Prompts",
    "QWEN_IMAGE_PAD",
    "REASON_CLOSE",
    "REASON_OPEN",
    "RestrictedUnpickler",
    "STOP_STRINGS",
    "SearchKind",
    "SearchOutcome",
    "SearchTools",
    "Shape",
    "TEXT_HIT_TEMPLATE",
    "TEXT_RESULTS_HEADER",
    "TEXT_SEARCH_CLOSE",
    "TEXT_SEARCH_ERROR",
    "TEXT_SEARCH_OPEN",
    "TextHit",
    "ToolCall",
    "Trajectory",
    "Turn",
    "TurnKind",
    "TurnRecord",
    "UPSTREAM_PROMPT_FILES",
    "UPSTREAM_SHAPES",
    "UnsafePickleError",
    "allowed_shapes",
    "bound_thumbnail",
    "count_searches",
    "decode_or_none",
    "default_prompts",
    "extract_answer",
    "image_bytes",
    "is_search_error",
    "is_valid_answer_turn",
    "is_valid_image_search_turn",
    "is_valid_text_search_turn",
    "load_pickled_str",
    "load_prompts",
    "next_action",
    "opening_user_text",
    "parse_turn",
    "rag_query_user_text",
    "render_image_results",
    "render_text_results",
    "safe_load",
    "safe_loads",
    "search_outcomes",
    "to_content_parts",
    "to_pil",
    "tool_response_text",
    "trajectory_format",
]
