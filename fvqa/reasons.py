"""Reject reason codes: one fixed vocabulary per stage, so `fvqa status` groups rejects by code and
`fvqa build --retry-rejects STAGE:CODE` can name them.

A reject is (stage, key, code, detail): the code says *what kind* of problem (a short snake_case
name from the stage's list below), the detail says what was found where (free text). Every reject
is checked against this registry when it is written (`Workspace.add_rejects`), so a new code is
added here, with its meaning, before any code path can emit it. Workspaces written before codes
existed are migrated by `legacy_code` (schema v3); their old text is kept in the detail.
"""

from __future__ import annotations

import re

from fvqa.errors import FvqaError

# Families shared by several doors. Each code's value says what it means (shown by `fvqa status`).
RECORD = {
    "malformed_json": "a line or JSON text inside a record does not parse, or nests too deeply",
    "wrong_type": "a field has the wrong type (the detail names the field)",
    "field_missing": "a required field is absent or empty (the detail names it)",
    "duplicate_id": "the record's id repeats an earlier record's (the first one is kept)",
}
IMAGE = {
    "image_missing": "the referenced image (file, bytes or stored copy) is absent",
    "image_format_unknown": "the bytes are not an image format we read (HTML, text, truncated...)",
    "image_undecodable": "an image header, but the pixels do not decode",
    "image_too_large": "more pixels (or bytes) than the configured budget",
    "image_too_small": "a side shorter than min_side",
}
LLM = {
    "unparseable_reply": "the model replied, but not in the expected shape (after one repair)",
    "llm_request_failed": "the request failed for good (HTTP 400/413/422, an image the endpoint refuses)",
}
FETCH = {
    "bad_url": "not a fetchable http(s) URL",
    "private_address": "the host resolves to a private, loopback or reserved address",
    "dns_failed": "the host name does not resolve",
    "robots_disallowed": "robots.txt disallows fetching it",
    "too_many_redirects": "the redirect chain is longer than allowed",
    "timeout": "no complete answer in time",
    "connection_error": "the connection could not be made or broke",
    "network_error": "another transport error",
    "http_error": "the server answered with an error status (the detail has it)",
    "too_large": "the body is larger than max_bytes",
}
LEGACY = {"legacy": "a reason written by an fvqa version before reason codes; the detail keeps its text"}

STAGE_CODES: dict[str, dict[str, str]] = {
    "match": {
        **{k: RECORD[k] for k in ("wrong_type", "field_missing")},
    },
    "concepts": {
        "wrong_type": RECORD["wrong_type"],
        "empty": "the entry is empty or only spaces",
        "no_letters": "the entry has no letters (a number or punctuation)",
        "too_short": "shorter than concepts.min_chars",
        "too_long": "longer than concepts.max_chars",
        "on_deny_list": "listed in concepts.deny",
        "not_on_allow_list": "not listed in concepts.allow",
        "duplicate_entry": "the same text as an earlier entry (after case and space folding)",
    },
    "crawl": {
        **IMAGE, **FETCH,
        "exact_duplicate": "the same bytes as an image already kept",
        "near_duplicate": "a perceptual hash within phash_distance of an image already kept",
        "low_clip_score": "CLIP score below crawl.clip_threshold",
        "not_chosen": "a usable candidate with a lower CLIP score than the chosen one",
        "no_candidates": "the source has no candidate image for the concept",
        "no_usable_image": "every candidate was rejected (the detail counts why)",
        "page_not_found": "the image's page is not in the pages file",
        "page_fetch_failed": "the image's page could not be fetched (the image is kept; the detail says why)",
        "page_no_text": "the page has no extractable text (the image is kept)",
        "image_search_failed": "the image search request failed for good",
        "image_search_bad_response": "the image search answered without a result list",
    },
    "generate": {
        "image_missing": IMAGE["image_missing"],
        "rule_violated": "the question/answer pair breaks a generation rule (the detail names it)",
        **LLM,
    },
    "infoseek": {
        **RECORD, **IMAGE,
        "answer_missing": "the line has no usable answer",
        "malformed_answer_eval": "answer_eval is neither a list of strings nor of numeric ranges",
        "bad_image_id": "image_id is not a plain file name",
        "image_unreadable": "the image file exists but cannot be read",
    },
    "tag": {
        "no_text": "the item has no question, answer or subject to tag",
        "subtype_mismatch": "the chosen subtype does not belong to the chosen type",
        **LLM,
    },
    "index": {
        **RECORD, **IMAGE,
        "page_unusable": "a corpus line without the fields a page needs (the detail says which)",
        "not_an_image_file": "a file in the image folder whose suffix is not an image's (not even read)",
        "image_unreadable": "the image file exists but cannot be read",
        "no_title": "the image matches no page and has no title of its own",
    },
    "probe": {
        "image_missing": IMAGE["image_missing"],
        "model_call_failed": "a rollout's model call failed for good (HTTP 400/413/422, a refused image)",
    },
    "split": {
        "unanswerable": "the probe found no way to answer it",
        "unknown_search_label": "the search label is not one fvqa knows",
        "benchmark_contamination": "the question appears in a benchmark's test set",
    },
    "distill": {
        "image_missing": "the item has no image in the workspace store, so the teacher cannot see it",
        "teacher_call_failed": "a teacher call failed in a way that would repeat (HTTP 400/413/422, a refused image)",
        "no_usable_attempt": "none of the item's k attempts was both correct and format-valid",
        # attempt level (column distill_attempts.reject_code; the item may still be kept)
        "no_answer": "attempt: the trajectory ended without an answer (round limit, unparseable turn, budget)",
        "format_invalid": "attempt: a turn or the trajectory's shape breaks the configured format rule",
        "wrong_answer": "attempt: the answer does not match the gold answer or an alias (exact match, as the reward)",
    },
    "export": {},
    "import": {
        **RECORD, **IMAGE,
        "no_question": "the prompt has no user message",
        "answer_missing": "reward_model.ground_truth is empty",
    },
    "train_prepare": {
        "image_missing": IMAGE["image_missing"],
        "image_undecodable": IMAGE["image_undecodable"],
        "empty_question": "the item has no question",
        "empty_answer": "the item has no answer",
        "placeholder_in_question": "the question contains the image placeholder",
    },
    "annotate": {
        **RECORD,
        "unknown_value": "a choice outside the labelling config's values",
        "multiple_values": "more than one value for a single-choice field",
        "too_long": "a text field longer than allowed",
        "fix_without_answer": "verdict 'fix' without a corrected answer",
        "item_id_mismatch": "the task's item_id differs from the one pushed",
        "item_gone": "the item is no longer in the workspace",
        "task_deleted": "a pushed task is no longer on the Label Studio server",
        "no_image": "the item has no image to review",
        "image_unavailable": "a written item's image cannot be downloaded",
        "image_unusable": "a written item's image fails the image gate",
    },
    "eval": {
        **RECORD, **IMAGE,
        "bad_image_reference": "the image field is neither an existing file nor valid base64",
        "no_question": "the prompt has no user question",
        "no_question_type": "InfoSeek row without a question type (give the _qtype file)",
        "unknown_question_type": "an InfoSeek question type fvqa does not know",
        "malformed_answer_eval": "answer_eval is neither a list of strings nor of numeric ranges",
    },
}
"""Stage (or family: `eval` covers `eval:<benchmark>`) -> code -> what it means."""


class UnknownReasonCode(FvqaError):
    """A stage emitted a code that is not registered here: a programming error, caught by tests."""


def family(stage: str) -> str:
    """The registry entry of a stage name (`eval:fvqa_test` -> `eval`)."""
    return stage.split(":", 1)[0]


def codes_of(stage: str) -> dict[str, str]:
    """The codes a stage may emit (with `legacy`, which only the v3 migration writes)."""
    return {**STAGE_CODES.get(family(stage), {}), **LEGACY}


def check_code(stage: str, code: str) -> None:
    """Raise `UnknownReasonCode` unless `code` is registered for `stage`."""
    if family(stage) not in STAGE_CODES:
        raise UnknownReasonCode(f"stage {stage!r} has no registered reject codes (fvqa/reasons.py)")
    if code not in codes_of(stage):
        raise UnknownReasonCode(f"stage {stage!r}: {code!r} is not a registered reject code (fvqa/reasons.py)")


def meaning(stage: str, code: str) -> str:
    """What a code means, or '' for one the registry does not know."""
    return codes_of(stage).get(code, "")


# --- schema v3: reasons written before codes ------------------------------------------------------

_RENAMED = {
    "bad JSON line": "malformed_json", "malformed JSON": "malformed_json", "wrong type": "wrong_type",
    "entry is not a string": "wrong_type", "not a string": "wrong_type", "page_url is not a string": "wrong_type",
    "missing url": "field_missing", "missing caption": "field_missing", "field missing": "field_missing",
    "empty": "empty", "no letters (number or punctuation)": "no_letters", "too short": "too_short",
    "too long": "too_long", "on deny list": "on_deny_list", "not on allow list": "not_on_allow_list",
    "duplicate entry": "duplicate_entry", "duplicate data_id": "duplicate_id", "duplicate id": "duplicate_id",
    "duplicate page key": "duplicate_id",
    "image missing": "image_missing", "missing image": "image_missing", "image file missing": "image_missing",
    "missing file": "image_missing", "unreadable image": "image_unreadable",
    "image format unknown": "image_format_unknown", "image undecodable": "image_undecodable",
    "image too large": "image_too_large", "image too small": "image_too_small",
    "bad URL": "bad_url", "private address refused": "private_address", "DNS lookup failed": "dns_failed",
    "disallowed by robots.txt": "robots_disallowed", "too many redirects": "too_many_redirects",
    "timeout": "timeout", "connection error": "connection_error", "network error": "network_error",
    "too large": "too_large", "exact duplicate": "exact_duplicate", "near-duplicate": "near_duplicate",
    "low CLIP score": "low_clip_score", "lower CLIP score than chosen image": "not_chosen",
    "no candidates": "no_candidates", "no usable image": "no_usable_image", "page not found": "page_not_found",
    "page has no extractable text": "page_no_text", "image search bad response": "image_search_bad_response",
    "unparseable reply": "unparseable_reply", "LLM request failed": "llm_request_failed",
    "no text to tag": "no_text", "subtype not under the chosen type": "subtype_mismatch",
    "probe model call failed": "model_call_failed", "unanswerable": "unanswerable",
    "unknown search label": "unknown_search_label", "benchmark contamination": "benchmark_contamination",
    "answer missing": "answer_missing", "answer missing (reward_model.ground_truth)": "answer_missing",
    "malformed answer_eval": "malformed_answer_eval", "bad image_id": "bad_image_id",
    "no user message in prompt": "no_question", "empty question": "empty_question", "empty answer": "empty_answer",
    "item has no image": "image_missing", "item has no image to review": "no_image",
    "duplicate task id": "duplicate_id", "duplicate annotation id": "duplicate_id",
    "verdict fix without a corrected answer": "fix_without_answer",
    "task item_id differs from the pushed one": "item_id_mismatch", "item no longer in the workspace": "item_gone",
    "written item image cannot be downloaded": "image_unavailable",
    "written item image is not a usable image": "image_unusable", "no user question in prompt": "no_question",
    "task deleted in Label Studio": "task_deleted",
    "no image": "image_missing", "record is not a JSON object": "wrong_type",
}
_PATTERNS = [  # (regex over the old reason, code), first match wins
    (r"^HTTP \d+", "http_error"), (r"^page ", "page_fetch_failed"), (r"^image search ", "image_search_failed"),
    (r"^rule violated", "rule_violated"), (r"^malformed JSON line", "malformed_json"),
    (r"^missing or empty", "field_missing"), (r"^image file not found|^image .* not found", "image_missing"),
    (r"^image is neither", "bad_image_reference"), (r"^not a decodable image", "image_undecodable"),
    (r"^image file missing", "image_missing"), (r"^question contains the image placeholder", "placeholder_in_question"),
    (r"^no question type", "no_question_type"), (r"^unknown .* value", "unknown_value"),
    (r"has more than one value$", "multiple_values"), (r"text is too long$", "too_long"),
    (r"^(annotation|written item) has no |has no (text|from_name)$|^task has no item_id", "field_missing"),
    (r" is not (a|an) ", "wrong_type"), (r"^not an image file", "not_an_image_file"),
    (r"^image matches no page", "no_title"),
]


def legacy_code(stage: str, reason: str) -> tuple[str, bool]:
    """The code for a reason written before codes existed (`legacy` when nothing fits), and whether
    the old text says more than the code (then the migration keeps it in the detail)."""
    if reason in codes_of(stage):
        return reason, False
    code = _RENAMED.get(reason)
    renamed = code is not None
    if code is None:
        code = next((c for pattern, c in _PATTERNS if re.search(pattern, reason)), "legacy")
    if code not in codes_of(stage):
        return "legacy", True
    return code, not renamed
