"""The MMSearch-R1 tag protocol: prompts, tool-result rendering, turn parsing, limits, format rules.

This is the one place that knows the protocol; the probe, the eval workflows, the veRL agent loop
and the reward all import it, so a rollout and its reward can never disagree about what a turn
meant. Tags and result strings are an interface shared with upstream
(EvolvingLMMs-Lab/multimodal-search-r1) and are reproduced exactly, so that upstream's released
checkpoints can be evaluated and upstream's reward reproduced:

* ``<reason>...</reason>`` before any action; ``<answer>...</answer>`` for the final answer;
* ``<search><img></search>`` at the end of a turn calls image search (no query);
* ``<text_search>QUERY</text_search>`` at the end of a turn calls text search;
* a tool result comes back in the next user turn as
  ``Searched results: <information>RESULT</information>\\nOriginal user's question: Q\\nFOLLOW-UP``.

Where upstream's rollout and its reward disagree or crash, the choice made here is written next to
the code (see ``Limits`` and ``trajectory_format``).
"""

from __future__ import annotations

import io
import itertools
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fvqa.errors import ConfigError

# --------------------------------------------------------------------------------------------
# Tags and upstream's exact result strings
# --------------------------------------------------------------------------------------------

IMAGE_SEARCH_TAG = "<search><img></search>"
TEXT_SEARCH_OPEN, TEXT_SEARCH_CLOSE = "<text_search>", "</text_search>"
REASON_OPEN, REASON_CLOSE = "<reason>", "</reason>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
STOP_STRINGS: tuple[str, ...] = ("</search>", TEXT_SEARCH_CLOSE)
"""Generation stops right after a search tag so the tool runs before the model goes on (upstream);
every driver (probe, eval, the veRL loop, the demo's sampler) stops on these."""
IMAGE_PLACEHOLDER = "<image>"
"""Where the user's image sits in an opening prompt (veRL's and upstream's dataset convention)."""

QWEN_IMAGE_PAD = "<|vision_start|><|image_pad|><|vision_end|>"
"""Upstream's per-thumbnail placeholder inside image-search results (Qwen2.5-VL vision tokens)."""

IMAGE_RESULTS_HEADER = (
    "[Image Search Results] The result of the image search consists of web page information related to "
    "the image from the user's original question. Each result includes the main image from the web page "
    "and its title, ranked in descending order of search relevance, as demonstrated below:\n"
)
TEXT_RESULTS_HEADER = (
    "[Text Search Results] Below are the text summaries of the most relevant webpages related to your "
    "query, ranked in descending order of relevance:\n"
)
# Upstream's error strings, typo ("capaibilities") included: released checkpoints were trained on it.
IMAGE_SEARCH_ERROR = (
    "[Image Search Results] There is an error encountered in performing search. "
    "Please reason with your own capaibilities."
)
TEXT_SEARCH_ERROR = (
    "[Text Search Results] There is an error encountered in performing search. "
    "Please reason with your own capaibilities."
)
IMAGE_HIT_TEMPLATE = "{rank}. image: {placeholder}\ntitle: {title}\n"
TEXT_HIT_TEMPLATE = "{rank}. (link:{url}) {summary}\n"
MISSING_THUMBNAIL = "[thumbnail unavailable]"

# --------------------------------------------------------------------------------------------
# Search hits and their rendering
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageHit:
    """One image-search result: the page title and its main image (bytes, a PIL image, or missing)."""

    title: str
    url: str = ""
    thumbnail: bytes | Image.Image | None = None


@dataclass(frozen=True)
class TextHit:
    """One text-search result: a page link and a summary of the page with respect to the question."""

    url: str
    title: str = ""
    summary: str = ""


def _as_image(thumbnail: bytes | Image.Image | None) -> Image.Image | None:
    """Decode a thumbnail; an undecodable one counts as missing rather than crashing a rollout."""
    if thumbnail is None:
        return None
    if isinstance(thumbnail, Image.Image):
        return thumbnail
    try:
        img = Image.open(io.BytesIO(thumbnail))
        img.load()
    except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; all mean "no image"
        return None
    return img


def render_image_results(
    hits: Sequence[ImageHit], placeholder: str = QWEN_IMAGE_PAD
) -> tuple[str, list[Image.Image]]:
    """Upstream's image-search result text, one ``placeholder`` per returned image, in order.

    No hits renders upstream's error string (it tells the model to reason on its own). A hit whose
    thumbnail is missing or undecodable keeps its title and gets ``[thumbnail unavailable]`` in
    place of the placeholder, so placeholders and returned images always pair up one to one.
    """
    if not hits:
        return IMAGE_SEARCH_ERROR, []
    text, images = IMAGE_RESULTS_HEADER, []
    for rank, hit in enumerate(hits, start=1):
        img = _as_image(hit.thumbnail)
        if img is not None:
            images.append(img)
        slot = placeholder if img is not None else MISSING_THUMBNAIL
        text += IMAGE_HIT_TEMPLATE.format(rank=rank, placeholder=slot, title=hit.title.strip())
    return text, images


def render_text_results(hits: Sequence[TextHit]) -> str:
    """Upstream's text-search result text: header, then ``N. (link:URL) summary`` per page."""
    if not hits:
        return TEXT_SEARCH_ERROR
    body = "".join(
        TEXT_HIT_TEMPLATE.format(rank=rank, url=hit.url.strip(), summary=hit.summary.strip())
        for rank, hit in enumerate(hits, start=1)
    )
    return TEXT_RESULTS_HEADER + body


def is_search_error(result_text: str) -> bool:
    """True for upstream's error results, which are passed back bare (see ``tool_response_text``)."""
    return result_text.startswith((IMAGE_SEARCH_ERROR, TEXT_SEARCH_ERROR))


def to_content_parts(text: str, images: Sequence[Any], placeholder: str) -> list[dict[str, Any]]:
    """Split text at each ``placeholder`` into OpenAI-style text/image parts (for chat endpoints)."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"text has {len(pieces) - 1} image placeholder(s) {placeholder!r} but {len(images)} image(s) "
            "were given; they must pair up one to one"
        )
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(images):
            parts.append({"type": "image", "image": images[i]})
    return parts


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

PromptName = Literal[
    "round_1", "after_image_search", "after_text_search", "direct_answer", "rag_query", "rag_answer"
]
_OPENING_PROMPTS = ("round_1", "direct_answer", "rag_query")
UPSTREAM_PROMPT_FILES = {
    "round_1_user_prompt_qwenvl.pkl": "round_1",
    "after_image_search_prompt_qwenvl.pkl": "after_image_search",
    "after_text_search_prompt_qwenvl.pkl": "after_text_search",
}


class PromptFileError(ConfigError):
    """A prompt file is missing, malformed, or (for pickles) holds anything but a plain string."""


class Prompts(BaseModel):
    """The six prompt texts of the three workflows (on-demand search, direct answer, fixed RAG).

    Opening prompts (``round_1``, ``direct_answer``, ``rag_query``) contain exactly one ``<image>``
    placeholder and are followed directly by the question. ``source`` says where each text came
    from, so a run records whether it used upstream's exact prompts or ours.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    round_1: str
    after_image_search: str
    after_text_search: str
    direct_answer: str
    rag_query: str
    rag_answer: str
    source: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_placeholders(self) -> Prompts:
        for name in _OPENING_PROMPTS:
            n = getattr(self, name).count(IMAGE_PLACEHOLDER)
            if n != 1:
                raise ValueError(
                    f"prompt {name!r} must contain exactly one {IMAGE_PLACEHOLDER} placeholder (found {n}); "
                    "it marks where the user's image goes"
                )
        return self


class _StrOnlyUnpickler(pickle.Unpickler):
    """Unpickler that never resolves a global, so a pickle can only build plain data, never run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}: only a plain str is allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: only a plain str is allowed")


def load_pickled_str(path: str | Path) -> str:
    """Load a pickle that must hold one ``str`` (upstream's prompt files) without executing anything."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt pickle {path}: {exc}") from exc
    try:
        obj = _StrOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user-facing error
        raise PromptFileError(f"prompt pickle {path} rejected: {exc}") from exc
    if not isinstance(obj, str):
        raise PromptFileError(
            f"prompt pickle {path} holds a {type(obj).__name__}, only a plain str is allowed"
        )
    return obj


def _read_prompt_file(path: Path) -> str:
    if path.suffix == ".pkl":
        return load_pickled_str(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {path}: {exc}") from exc


def _parse_sectioned_text(text: str, path: Path) -> dict[str, str]:
    """Plain-text prompt file: ``=== name ===`` header lines, each followed by that prompt's text.

    The newline that ends a section's last line belongs to the file layout and is dropped; any other
    white space is kept exactly.
    """
    header = re.compile(r"^=== *([a-z0-9_]+) *===[ \t]*$", re.MULTILINE)
    matches = list(header.finditer(text))
    if not matches:
        raise PromptFileError(f"{path}: no '=== name ===' section headers found")
    if text[: matches[0].start()].strip():
        raise PromptFileError(f"{path}: text before the first '=== name ===' header")
    out: dict[str, str] = {}
    for m, nxt in itertools.zip_longest(matches, matches[1:]):
        body = text[m.end() + 1 : nxt.start() if nxt else len(text)]
        out[m.group(1)] = body[:-1] if body.endswith("\n") else body
    return out


def _mapping_from_yaml(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(_read_prompt_file(path))
    except yaml.YAMLError as exc:
        raise PromptFileError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise PromptFileError(f"{path}: expected a mapping of prompt name -> text")
    out: dict[str, str] = {}
    for name, value in data.items():
        if isinstance(value, dict) and set(value) == {"file"}:
            value = _read_prompt_file((path.parent / str(value["file"])).resolve())
        if not isinstance(value, str):
            raise PromptFileError(f"{path}: prompt {name!r} must be a string or {{file: PATH}}")
        out[str(name)] = value
    return out


def _mapping_from_path(path: Path) -> dict[str, str]:
    if path.is_dir():
        out: dict[str, str] = {}
        for fname, name in UPSTREAM_PROMPT_FILES.items():
            if (path / fname).is_file():
                out[name] = load_pickled_str(path / fname)
        for cand in ("prompts.yaml", "prompts.yml"):
            if (path / cand).is_file():
                out.update(_mapping_from_yaml(path / cand))
        if not out:
            raise PromptFileError(
                f"{path}: no prompt files found (expected upstream's {sorted(UPSTREAM_PROMPT_FILES)} "
                "or prompts.yaml)"
            )
        return out
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        return _mapping_from_yaml(path)
    if path.suffix == ".txt":
        return _parse_sectioned_text(_read_prompt_file(path), path)
    if path.suffix == ".pkl":
        name = UPSTREAM_PROMPT_FILES.get(path.name)
        if name is None:
            raise PromptFileError(
                f"{path}: cannot tell which prompt a pickle holds from its name; use upstream's file "
                f"names {sorted(UPSTREAM_PROMPT_FILES)} or a YAML file with {{file: PATH}} entries"
            )
        return {name: load_pickled_str(path)}
    raise PromptFileError(f"{path}: unsupported prompt file type (use .yaml, .txt, .pkl or a folder)")


def default_prompts() -> Prompts:
    """fvqa's own prompt texts (``fvqa/prompts/default.yaml``)."""
    text = resources.files("fvqa").joinpath("prompts", "default.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return Prompts(**data, source=dict.fromkeys(data, "fvqa-default"))


def load_prompts(paths: str | Path | Iterable[str | Path] | None = None) -> Prompts:
    """Prompts from fvqa's defaults, overridden by each given file or folder in order.

    Accepted: a YAML file (``name: text`` or ``name: {file: PATH}``), a plain-text file with
    ``=== name ===`` sections, one of upstream's pickled prompt files (by its upstream file name),
    or a folder holding upstream's pickles and/or ``prompts.yaml``. Pickles are read with an
    unpickler that admits only a plain ``str``; anything else is refused before it can run.
    Prompts a source does not define (upstream ships no direct-answer or RAG prompt) keep fvqa's.
    """
    base = default_prompts()
    if paths is None:
        return base
    if isinstance(paths, str | Path):
        paths = [paths]
    values = base.model_dump(exclude={"source"})
    source = dict(base.source)
    for raw in paths:
        path = Path(raw).expanduser()
        for name, text in _mapping_from_path(path).items():
            if name not in values:
                raise PromptFileError(f"{path}: unknown prompt name {name!r}; known: {sorted(values)}")
            values[name], source[name] = text, str(path)
    try:
        return Prompts(**values, source=source)
    except ValueError as exc:
        raise PromptFileError(f"prompts from {[str(p) for p in paths]} are invalid: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Message builders
# --------------------------------------------------------------------------------------------


def opening_user_text(prompt: str, question: str) -> str:
    """First user message: the opening prompt (with its ``<image>`` placeholder) then the question.

    Upstream concatenates without a separator; its prompt ends in ``"<image> "`` and ours in
    ``"<image>\\n"``, so both read naturally.
    """
    return prompt + question.strip()


def rag_query_user_text(prompt: str, question: str, image_results: str) -> str:
    """First user message of the fixed RAG workflow (paper App. D.5): prompt, question, then the
    image-search results that the workflow always fetches, in the same ``<information>`` wrapper."""
    return (
        opening_user_text(prompt, question)
        + "\nSearched results: <information>"
        + image_results
        + "</information>"
    )


def tool_response_text(result_text: str, question: str, follow_up: str) -> str:
    """Next user turn after a tool call, exactly as upstream's rollout builds it.

    A search error is passed back bare (no ``<information>``, question or follow-up prompt),
    because that is what upstream's rollout does and released checkpoints were trained on it.
    """
    if is_search_error(result_text):
        return result_text
    return (
        "Searched results: <information>"
        + result_text
        + "</information>\n"
        + f"Original user's question: {question.strip()}\n"
        + follow_up
    )


# --------------------------------------------------------------------------------------------
# Turn parsing
# --------------------------------------------------------------------------------------------

TurnKind = Literal["answer", "image_search", "text_search", "invalid"]
_TEXT_CALL_AT_END = re.compile(r"<text_search>((?:(?!<text_search>).)*)</text_search>$", re.DOTALL)
_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_REASON_SPAN = re.compile(r"<reason>(.*?)</reason>", re.DOTALL)


@dataclass(frozen=True)
class Turn:
    """What one assistant turn does. ``problem`` explains an ``invalid`` turn to a person."""

    kind: TurnKind
    text: str
    query: str | None = None
    answer: str | None = None
    reason: str | None = None
    problem: str | None = None


def extract_answer(text: str) -> str | None:
    """The last ``<answer>...</answer>`` span, stripped (upstream's ``extract_solution``)."""
    spans = _ANSWER_SPAN.findall(text)
    return spans[-1].strip() if spans else None


def parse_turn(text: str) -> Turn:
    """Classify an assistant turn.

    A tool call counts only if its tag ends the turn (trailing white space ignored). A text query
    must be non-empty and on one line (upstream's trigger regex has no DOTALL, so a multi-line
    query never reached its search tool either). Otherwise the turn is an answer if it holds an
    ``<answer>`` span (the last one wins), else invalid.
    """
    body = text.strip()
    reason_m = _REASON_SPAN.search(body)
    reason = reason_m.group(1).strip() if reason_m else None
    answer = extract_answer(body)
    if body.endswith(IMAGE_SEARCH_TAG):
        return Turn("image_search", text, reason=reason, answer=answer)
    call = _TEXT_CALL_AT_END.search(body)
    if call is not None:
        query = call.group(1).strip()
        if not query:
            return Turn("invalid", text, query="", reason=reason, problem="empty <text_search> query")
        if "\n" in query:
            return Turn(
                "invalid", text, query=query, reason=reason, problem="<text_search> query spans lines"
            )
        return Turn("text_search", text, query=query, reason=reason, answer=answer)
    if answer is not None:
        return Turn("answer", text, answer=answer, reason=reason)
    if IMAGE_SEARCH_TAG in body or TEXT_SEARCH_OPEN in body:
        problem = "search tag is not at the end of the turn"
    else:
        problem = "no <answer> and no search call at the end of the turn"
    return Turn("invalid", text, reason=reason, problem=problem)


# --------------------------------------------------------------------------------------------
# Limits and the rollout state machine
# --------------------------------------------------------------------------------------------


class Limits(BaseModel):
    """Rollout limits. Defaults are the paper's: 3 rounds, 1 image search (round 1), 2 text searches.

    ``image_search_first_round_only``: upstream's rollout only counts image searches, while its
    format reward accepts an image search in round 1 only; the paper says round 1. We enforce it in
    the rollout (a later image-search call ends the trajectory like any call past a limit).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_rounds: int = Field(3, ge=1)
    max_image_search: int = Field(1, ge=0)
    max_text_search: int = Field(2, ge=0)
    image_search_first_round_only: bool = True


@dataclass(frozen=True)
class Action:
    """What the rollout does after a model turn: call a tool, or stop (and why)."""

    kind: Literal["image_search", "text_search", "stop"]
    query: str | None = None
    stop_reason: Literal["answer", "limit", "invalid"] | None = None
    detail: str = ""


def _as_turns(history: Sequence[Turn | str]) -> list[Turn]:
    return [t if isinstance(t, Turn) else parse_turn(t) for t in history]


def next_action(history: Sequence[Turn | str], limits: Limits | None = None) -> Action:
    """Decide what follows the last assistant turn in ``history`` (all assistant turns so far).

    As upstream: a call past a limit, or any call in the last allowed round, ends the trajectory
    without running the tool (the model gets no further turn); an answer or an unparseable turn
    ends it too. Earlier turns are taken as executed calls (that is how the trajectory got here).
    """
    limits = limits or Limits()
    turns = _as_turns(history)
    if not turns:
        raise ValueError("next_action needs at least one assistant turn")
    last, rnd = turns[-1], len(turns)
    n_img = sum(t.kind == "image_search" for t in turns[:-1])
    n_txt = sum(t.kind == "text_search" for t in turns[:-1])
    if last.kind == "answer":
        return Action("stop", stop_reason="answer")
    if last.kind == "invalid":
        return Action("stop", stop_reason="invalid", detail=last.problem or "")
    if rnd >= limits.max_rounds:
        return Action(
            "stop", stop_reason="limit", detail=f"search call in the last round ({limits.max_rounds})"
        )
    if last.kind == "image_search":
        if n_img >= limits.max_image_search:
            return Action(
                "stop", stop_reason="limit", detail=f"image search limit ({limits.max_image_search})"
            )
        if limits.image_search_first_round_only and rnd > 1:
            return Action("stop", stop_reason="limit", detail="image search is allowed in round 1 only")
        return Action("image_search")
    if n_txt >= limits.max_text_search:
        return Action("stop", stop_reason="limit", detail=f"text search limit ({limits.max_text_search})")
    return Action("text_search", query=last.query)


# --------------------------------------------------------------------------------------------
# Format rules
# --------------------------------------------------------------------------------------------

FormatRule = Literal["upstream", "limits"]
Shape = tuple[str, ...]
UPSTREAM_SHAPES: frozenset[Shape] = frozenset(
    {
        ("answer",),
        ("image_search", "answer"),
        ("text_search", "answer"),
        ("image_search", "text_search", "answer"),
    }
)
_ANSWER_TURN = re.compile(r"^<reason>.*</reason>.*<answer>.*</answer>$", re.DOTALL)
_IMAGE_TURN = re.compile(r"^<reason>.*</reason>.*<search><img></search>$", re.DOTALL)
_TEXT_TURN = re.compile(r"^<reason>.*</reason>.*<text_search>.*</text_search>$", re.DOTALL)


def _one_reason(t: str) -> bool:
    return t.count(REASON_OPEN) == 1 and t.count(REASON_CLOSE) == 1


def _has_text_tag(t: str) -> bool:
    return TEXT_SEARCH_OPEN in t or TEXT_SEARCH_CLOSE in t


def _has_answer_tag(t: str) -> bool:
    return ANSWER_OPEN in t or ANSWER_CLOSE in t


def is_valid_answer_turn(text: str) -> bool:
    """Upstream's rule: reason then answer, one pair of each, and no search tag of either kind."""
    t = text.strip()
    return (
        bool(_ANSWER_TURN.match(t))
        and _one_reason(t)
        and t.count(ANSWER_OPEN) == 1
        and t.count(ANSWER_CLOSE) == 1
        and IMAGE_SEARCH_TAG not in t
        and not _has_text_tag(t)
    )


def is_valid_image_search_turn(text: str) -> bool:
    """Upstream's rule: reason then exactly one ``<search><img></search>`` at the end, nothing else."""
    t = text.strip()
    return (
        bool(_IMAGE_TURN.match(t))
        and _one_reason(t)
        and t.count(IMAGE_SEARCH_TAG) == 1
        and not _has_answer_tag(t)
        and not _has_text_tag(t)
    )


def is_valid_text_search_turn(text: str, *, require_query: bool = False) -> bool:
    """Upstream's rule: reason then exactly one text-search pair at the end, no answer or image tag.

    ``require_query`` adds our rollout's condition (non-empty, one-line query); upstream's format
    reward accepts an empty query although its rollout drops such a trajectory.
    """
    t = text.strip()
    ok = (
        bool(_TEXT_TURN.match(t))
        and _one_reason(t)
        and t.count(TEXT_SEARCH_OPEN) == 1
        and t.count(TEXT_SEARCH_CLOSE) == 1
        and not _has_answer_tag(t)
        and IMAGE_SEARCH_TAG not in t
    )
    return ok and (not require_query or parse_turn(t).kind == "text_search")


def allowed_shapes(rule: FormatRule = "limits", limits: Limits | None = None) -> frozenset[Shape]:
    """Every trajectory shape (tool calls then an answer) the rule set accepts.

    ``upstream``: exactly upstream's four shapes. ``limits``: every sequence of calls the limits
    let the rollout execute, followed by an answer (with the defaults this adds text->text->answer,
    which upstream's reward rejects although its rollout allows it).
    """
    if rule == "upstream":
        return UPSTREAM_SHAPES
    if rule != "limits":
        raise ValueError(f"unknown format rule {rule!r}; use 'upstream' or 'limits'")
    limits = limits or Limits()
    shapes: set[Shape] = set()
    for n_calls in range(limits.max_rounds):
        for calls in itertools.product(("image_search", "text_search"), repeat=n_calls):
            history = [*calls, "answer"]
            if all(
                next_action([Turn(k, "") for k in history[: i + 1]], limits).kind == k
                for i, k in enumerate(calls)
            ):
                shapes.add(tuple(history))
    return frozenset(shapes)


@dataclass(frozen=True)
class FormatResult:
    """Whether a trajectory has a valid format, its shape, and a reason a person can read."""

    ok: bool
    shape: Shape
    problem: str | None = None
    turn_problems: list[str | None] = field(default_factory=list)


def _turn_shape(text: str, *, strict_query: bool) -> tuple[str, str | None]:
    if is_valid_answer_turn(text):
        return "answer", None
    if is_valid_image_search_turn(text):
        return "image_search", None
    if is_valid_text_search_turn(text, require_query=strict_query):
        return "text_search", None
    parsed = parse_turn(text)
    why = parsed.problem or f"{parsed.kind} turn breaks the tag rules (one <reason> pair first, one action)"
    return "invalid", why


def trajectory_format(
    turns: Sequence[str], rule: FormatRule = "limits", limits: Limits | None = None
) -> FormatResult:
    """Check every turn against the per-turn rules and the whole against the allowed shapes.

    Any number of turns is accepted as input: shapes longer than the rule set allows (upstream's
    reward raises on more than 3 turns) simply fail with a reason.
    """
    strict = rule == "limits"
    checked = [_turn_shape(t, strict_query=strict) for t in turns]
    shape = tuple(kind for kind, _ in checked)
    problems = [p for _, p in checked]
    if not turns:
        return FormatResult(False, shape, "no assistant turn", problems)
    for i, p in enumerate(problems, start=1):
        if p is not None:
            return FormatResult(False, shape, f"turn {i}: {p}", problems)
    if shape not in allowed_shapes(rule, limits):
        return FormatResult(
            False, shape, f"shape {'->'.join(shape)} is not allowed by rule {rule!r}", problems
        )
    return FormatResult(True, shape, None, problems)


def count_searches(turns: Sequence[str], rule: FormatRule = "limits") -> tuple[int, int]:
    """(image searches, text searches) a trajectory made, as each rule set counts them.

    ``upstream`` (its reward, exactly): look at the first turn of a 1- or 2-turn trajectory, at the
    first two of a 3-turn one (generalised: all but the last of a longer one); a turn counts once if
    it contains ``<search><img></search>`` (image) or else both text-search tags (text), whatever
    its format or position. ``limits``: count the calls the rollout actually ran, i.e. every turn
    but the last that parses as a tool call.
    """
    if rule == "upstream":
        looked_at = turns[:1] if len(turns) <= 2 else turns[:-1]
        n_img = sum(IMAGE_SEARCH_TAG in t for t in looked_at)
        n_txt = sum(
            IMAGE_SEARCH_TAG not in t and TEXT_SEARCH_OPEN in t and TEXT_SEARCH_CLOSE in t for t in looked_at
        )
        return n_img, n_txt
    if rule != "limits":
        raise ValueError(f"unknown format rule {rule!r}; use 'upstream' or 'limits'")
    kinds = [parse_turn(t).kind for t in turns[:-1]]
    return kinds.count("image_search"), kinds.count("text_search")
