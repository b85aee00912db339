"""The tag protocol: result rendering, tool turns, parsing, limits, format rules, prompt loading."""

from __future__ import annotations

import io
import os
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fvqa.protocol import (
    IMAGE_SEARCH_ERROR,
    QWEN_IMAGE_PAD,
    TEXT_SEARCH_ERROR,
    ImageHit,
    Limits,
    PromptFileError,
    TextHit,
    allowed_shapes,
    count_searches,
    is_valid_answer_turn,
    is_valid_image_search_turn,
    is_valid_text_search_turn,
    load_pickled_str,
    load_prompts,
    next_action,
    opening_user_text,
    parse_turn,
    rag_query_user_text,
    render_image_results,
    render_text_results,
    to_content_parts,
    tool_response_text,
    trajectory_format,
)

ANS = "<reason>I know this tower.</reason><answer>Eiffel Tower</answer>"
IMG = "<reason>Not sure what this is.</reason><search><img></search>"
TXT = "<reason>Need the year.</reason><text_search>Eiffel Tower opening year</text_search>"
_TAG_SOUP = (
    "<reason>",
    "</reason>",
    "<answer>",
    "</answer>",
    "<search><img></search>",
    "<text_search>",
    "</text_search>",
    "x",
    " ",
    "\n",
    "<",
    ">",
)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- rendering and tool turns


def test_image_results_render_upstream_string_with_one_placeholder_per_image() -> None:
    hits = [
        ImageHit("Eiffel Tower - Wikipedia", "https://a", _png((255, 0, 0))),
        ImageHit("Paris at night", "https://b", Image.new("RGB", (4, 4))),
    ]
    text, images = render_image_results(hits)
    assert text == (
        "[Image Search Results] The result of the image search consists of web page information related to "
        "the image from the user's original question. Each result includes the main image from the web page "
        "and its title, ranked in descending order of search relevance, as demonstrated below:\n"
        "1. image: <|vision_start|><|image_pad|><|vision_end|>\ntitle: Eiffel Tower - Wikipedia\n"
        "2. image: <|vision_start|><|image_pad|><|vision_end|>\ntitle: Paris at night\n"
    )
    assert len(images) == 2 and images[0].getpixel((0, 0)) == (255, 0, 0)


def test_image_hit_without_usable_thumbnail_keeps_title_and_placeholders_pair_with_images() -> None:
    hits = [
        ImageHit("no thumb", "u"),
        ImageHit("broken", "u", b"not an image"),
        ImageHit("ok", "u", _png((0, 0, 0))),
    ]
    text, images = render_image_results(hits, placeholder="<image>")
    assert "1. image: [thumbnail unavailable]\ntitle: no thumb\n" in text
    assert "2. image: [thumbnail unavailable]\ntitle: broken\n" in text
    assert text.count("<image>") == len(images) == 1
    parts = to_content_parts(text, images, "<image>")
    assert [p["type"] for p in parts] == ["text", "image", "text"]


def test_empty_results_render_upstream_error_strings() -> None:
    assert render_image_results([]) == (IMAGE_SEARCH_ERROR, [])
    assert render_text_results([]) == TEXT_SEARCH_ERROR
    assert IMAGE_SEARCH_ERROR.endswith("Please reason with your own capaibilities.")


def test_text_results_render_links_and_summaries() -> None:
    text = render_text_results(
        [TextHit("https://x.org/a", "A", " Opened in 1889. "), TextHit("https://y", "", "B")]
    )
    assert text == (
        "[Text Search Results] Below are the text summaries of the most relevant webpages related to your "
        "query, ranked in descending order of relevance:\n"
        "1. (link:https://x.org/a) Opened in 1889.\n"
        "2. (link:https://y) B\n"
    )


def test_tool_response_wraps_result_question_and_follow_up_and_passes_errors_bare() -> None:
    msg = tool_response_text("[Text Search Results] R", " When did it open? ", "FOLLOW")
    assert msg == (
        "Searched results: <information>[Text Search Results] R</information>\n"
        "Original user's question: When did it open?\nFOLLOW"
    )
    assert tool_response_text(TEXT_SEARCH_ERROR, "q", "FOLLOW") == TEXT_SEARCH_ERROR


def test_content_parts_refuse_placeholder_image_mismatch() -> None:
    with pytest.raises(ValueError, match="1 image placeholder"):
        to_content_parts("a <image> b", [], "<image>")
    assert QWEN_IMAGE_PAD == "<|vision_start|><|image_pad|><|vision_end|>"


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "kind", "detail"),
    [
        (ANS, "answer", "Eiffel Tower"),
        (IMG + "\n  ", "image_search", None),
        (TXT, "text_search", "Eiffel Tower opening year"),
        # a tag in the middle of a turn is not a call
        (
            "<reason>r</reason><search><img></search> I think it is <answer>Louvre</answer>",
            "answer",
            "Louvre",
        ),
        ("<reason>r</reason><text_search>q</text_search> hmm, let me think", "invalid", "not at the end"),
        ("<reason>r</reason><search><img></search> and more", "invalid", "not at the end"),
        # missing </reason>: still parses (the format check rejects it)
        ("<reason>r <answer>Paris</answer>", "answer", "Paris"),
        # two answers: the last wins
        ("<reason>r</reason><answer>London</answer> no wait <answer> Paris </answer>", "answer", "Paris"),
        ("<reason>r</reason><text_search>  </text_search>", "invalid", "empty <text_search> query"),
        ("<reason>r</reason><text_search>a\nb</text_search>", "invalid", "spans lines"),
        ("<reason>r</reason><text_search>x</text_search> <text_search>y</text_search>", "text_search", "y"),
        ("<reason>r</reason> just words", "invalid", "no <answer>"),
        ("", "invalid", "no <answer>"),
    ],
)
def test_parse_turn(text: str, kind: str, detail: str | None) -> None:
    turn = parse_turn(text)
    assert turn.kind == kind
    if kind == "answer":
        assert turn.answer == detail
    elif kind == "text_search":
        assert turn.query == detail
    elif kind == "invalid":
        assert detail in (turn.problem or "")


# ---------------------------------------------------------------- per-turn format rules


@pytest.mark.parametrize(
    ("text", "answer_ok", "image_ok", "text_ok"),
    [
        (ANS, True, False, False),
        ("  " + ANS + "\n", True, False, False),
        ("<reason>r <answer>x</answer>", False, False, False),  # missing </reason>
        ("<reason>r</reason><answer>a</answer><answer>b</answer>", False, False, False),  # two answers
        ("<reason>a</reason><reason>b</reason><answer>x</answer>", False, False, False),
        ("<answer>x</answer>", False, False, False),  # no reason
        ("<reason>r</reason><search><img></search><answer>x</answer>", False, False, False),
        (IMG, False, True, False),
        ("<reason>r</reason><search><img></search><search><img></search>", False, False, False),
        ("<reason>r</reason> <answer> <search><img></search>", False, False, False),
        (TXT, False, False, True),
        ("<reason>r</reason><text_search>a</text_search><text_search>b</text_search>", False, False, False),
        ("<reason>r</reason><search><img></search><text_search>a</text_search>", False, False, False),
    ],
)
def test_per_turn_rules(text: str, answer_ok: bool, image_ok: bool, text_ok: bool) -> None:
    assert is_valid_answer_turn(text) is answer_ok
    assert is_valid_image_search_turn(text) is image_ok
    assert is_valid_text_search_turn(text) is text_ok


def test_empty_query_passes_upstream_turn_rule_but_not_ours() -> None:
    turn = "<reason>r</reason><text_search></text_search>"
    assert is_valid_text_search_turn(turn)
    assert not is_valid_text_search_turn(turn, require_query=True)
    assert trajectory_format([turn, ANS], "upstream").ok
    assert not trajectory_format([turn, ANS], "limits").ok


# ---------------------------------------------------------------- shapes


def test_allowed_shapes_per_rule_set() -> None:
    a, i, t = "answer", "image_search", "text_search"
    assert allowed_shapes("upstream") == {(a,), (i, a), (t, a), (i, t, a)}
    assert allowed_shapes("limits") == {(a,), (i, a), (t, a), (i, t, a), (t, t, a)}
    assert (i, t, t, a) in allowed_shapes("limits", Limits(max_rounds=4))
    assert (t, i, a) in allowed_shapes("limits", Limits(image_search_first_round_only=False))
    with pytest.raises(ValueError, match="unknown format rule"):
        allowed_shapes("strict")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("turns", "upstream_ok", "limits_ok"),
    [
        ([ANS], True, True),
        ([IMG, ANS], True, True),
        ([TXT, ANS], True, True),
        ([IMG, TXT, ANS], True, True),
        ([TXT, TXT, ANS], False, True),  # upstream's reward rejects a shape its rollout allows
        ([TXT, IMG, ANS], False, False),
        ([IMG, IMG, ANS], False, False),
        ([IMG, TXT, TXT, ANS], False, False),  # more turns than upstream supports: no crash
        ([IMG], False, False),  # stopped at a limit, never answered
        ([IMG, "<reason>r<answer>x</answer>"], False, False),
        ([], False, False),
    ],
)
def test_trajectory_format(turns: list[str], upstream_ok: bool, limits_ok: bool) -> None:
    assert trajectory_format(turns, "upstream").ok is upstream_ok
    res = trajectory_format(turns, "limits")
    assert res.ok is limits_ok
    if not limits_ok:
        assert res.problem


def test_search_counting_rules_differ_as_documented() -> None:
    mid = "<reason>r</reason><search><img></search> no, I know it: <answer>x</answer>"
    assert count_searches([mid], "upstream") == (1, 0)  # upstream counts the tag anywhere
    assert count_searches([mid], "limits") == (0, 0)  # no search was run
    assert count_searches([IMG, TXT, TXT], "upstream") == (1, 1)  # upstream ignores turn 3
    assert count_searches([TXT, TXT, ANS], "limits") == (0, 2)


# ---------------------------------------------------------------- state machine


def test_next_action_calls_tools_then_stops_on_answer() -> None:
    assert next_action([IMG]).kind == "image_search"
    act = next_action([IMG, TXT])
    assert (act.kind, act.query) == ("text_search", "Eiffel Tower opening year")
    assert next_action([IMG, TXT, ANS]).stop_reason == "answer"
    bad = next_action(["<reason>r</reason><text_search></text_search>"])
    assert (bad.kind, bad.stop_reason, bad.detail) == ("stop", "invalid", "empty <text_search> query")


@pytest.mark.parametrize(
    ("history", "limits", "detail"),
    [
        ([IMG, TXT, TXT], Limits(), "last round"),
        ([TXT, IMG], Limits(), "round 1 only"),
        ([IMG, IMG], Limits(image_search_first_round_only=False), "image search limit"),
        ([TXT, TXT, TXT], Limits(max_rounds=5), "text search limit"),
        ([IMG], Limits(max_image_search=0), "image search limit"),
        ([TXT], Limits(max_rounds=1), "last round"),
    ],
)
def test_next_action_ends_trajectory_at_limits(history: list[str], limits: Limits, detail: str) -> None:
    act = next_action(history, limits)
    assert (act.kind, act.stop_reason) == ("stop", "limit")
    assert detail in act.detail


def test_limits_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError):
        Limits(max_round=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Limits(max_rounds=0)


# ---------------------------------------------------------------- prompts


def test_default_prompts_teach_the_exact_tags() -> None:
    p = load_prompts()
    for tag in ("<search><img></search>", "<text_search>", "<reason>", "<answer>", "<information>"):
        assert tag in p.round_1
    assert p.round_1.count("<image>") == 1
    assert "<text_search>" in p.after_image_search and "<answer>" in p.after_text_search
    assert opening_user_text(p.round_1, "  Who built it? ").endswith("<image>\nWho built it?")
    assert set(p.source.values()) == {"fvqa-default"}


def _write_upstream_pickles(folder: os.PathLike[str] | str) -> None:
    texts = {
        "round_1_user_prompt_qwenvl.pkl": "UP round 1.\nHere is the image and the question:\n<image> ",
        "after_image_search_prompt_qwenvl.pkl": "UP after image",
        "after_text_search_prompt_qwenvl.pkl": "UP after text",
    }
    for name, text in texts.items():
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(text, f, protocol=4)


def test_upstream_pickle_folder_overrides_the_three_search_prompts(tmp_path) -> None:
    _write_upstream_pickles(tmp_path)
    p = load_prompts(tmp_path)
    assert p.round_1.endswith("<image> ") and p.after_image_search == "UP after image"
    assert p.after_text_search == "UP after text"
    assert p.direct_answer == load_prompts().direct_answer  # upstream ships none: ours kept
    assert p.source["round_1"] == str(tmp_path) and p.source["rag_answer"] == "fvqa-default"
    single = load_prompts(tmp_path / "after_text_search_prompt_qwenvl.pkl")
    assert single.after_text_search == "UP after text" and single.round_1 == load_prompts().round_1


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "after_text_search_prompt_qwenvl.pkl"
    evil.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(PromptFileError, match=r"refused to load global (posix|os|nt)\.system"):
        load_prompts(evil)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [["a list"], {"round_1": "x"}, 42, b"bytes"])
def test_pickle_of_anything_but_str_is_refused(tmp_path, payload: object) -> None:
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(PromptFileError, match="only a plain str"):
        load_pickled_str(path)


def test_yaml_and_text_prompt_files(tmp_path) -> None:
    (tmp_path / "follow.txt").write_text("from a file\n", encoding="utf-8")
    _write_upstream_pickles(tmp_path)
    y = tmp_path / "p.yaml"
    y.write_text(
        "after_text_search: {file: follow.txt}\nround_1: {file: round_1_user_prompt_qwenvl.pkl}\n"
        "rag_answer: Answer now.\n",
        encoding="utf-8",
    )
    p = load_prompts(y)
    assert p.after_text_search == "from a file\n" and p.rag_answer == "Answer now."
    assert p.round_1.startswith("UP round 1.")
    t = tmp_path / "p.txt"
    t.write_text("=== direct_answer ===\nLook.\n<image> \n=== rag_answer ===\nGo.\n", encoding="utf-8")
    p2 = load_prompts([y, t])
    assert p2.direct_answer == "Look.\n<image> " and p2.rag_answer == "Go."
    assert p2.after_text_search == "from a file\n"


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("roundone: x\n", ".yaml", "unknown prompt name 'roundone'"),
        ("round_1: no placeholder\n", ".yaml", "exactly one <image>"),
        ("- a\n- b\n", ".yaml", "expected a mapping"),
        ("round_1: [1, 2]\n", ".yaml", "must be a string"),
        ("just text\n", ".txt", "no '=== name ===' section"),
        ("x", ".json", "unsupported prompt file type"),
    ],
)
def test_bad_prompt_files_give_clear_errors(tmp_path, content: str, suffix: str, match: str) -> None:
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=match):
        load_prompts(path)


def test_missing_prompt_paths_give_clear_errors(tmp_path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.yaml")
    with pytest.raises(PromptFileError, match="no prompt files found"):
        load_prompts(tmp_path)
    odd = tmp_path / "mine.pkl"
    odd.write_bytes(pickle.dumps("x"))
    with pytest.raises(PromptFileError, match="cannot tell which prompt"):
        load_prompts(odd)


def test_rag_first_turn_carries_question_and_image_results() -> None:
    p = load_prompts()
    text, images = render_image_results(
        [ImageHit("Eiffel Tower", "u", _png((1, 2, 3)))], placeholder="<image>"
    )
    msg = rag_query_user_text(p.rag_query, "Who designed it?", text)
    assert msg.count("<image>") == 2 == len(images) + 1  # the user's image and one thumbnail
    assert msg.endswith("title: Eiffel Tower\n</information>")
    assert "Who designed it?\nSearched results: <information>[Image Search Results]" in msg


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TAG_SOUP), max_size=12).map("".join), max_size=5))
def test_parsing_and_format_checks_never_crash(pieces: list[str]) -> None:
    for piece in pieces:
        turn = parse_turn(piece)
        assert turn.kind in {"answer", "image_search", "text_search", "invalid"}
        assert (turn.kind == "invalid") == (turn.problem is not None)
    for rule in ("upstream", "limits"):
        res = trajectory_format(pieces, rule)
        assert res.ok or res.problem
    if pieces:
        assert next_action(pieces).kind in {"image_search", "text_search", "stop"}
