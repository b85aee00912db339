"""The MMSearch-R1 reward: upstream's values under format_rule='upstream', ours under 'limits'."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fvqa.protocol import TextHit, load_prompts, render_text_results, tool_response_text
from fvqa.train.reward import RESULT_KEYS, answer_correct, compute_score, score_turns, split_turns

GOLD = ["Eiffel Tower", "La Tour Eiffel"]
RIGHT = "<reason>It is the tower in Paris.</reason><answer>the Eiffel tower.</answer>"
WRONG = "<reason>Looks like a tower.</reason><answer>Tokyo Tower</answer>"
RIGHT_BAD_FORMAT = "<answer>Eiffel Tower</answer>"  # no <reason>
IMG = "<reason>Unsure.</reason><search><img></search>"
TXT = "<reason>Need a fact.</reason><text_search>tower in Paris</text_search>"
MID_IMG_RIGHT = "<reason>r</reason> maybe <search><img></search>? No: <answer>Eiffel Tower</answer>"


def _score(turns: list[str], **kw: object) -> dict:
    return score_turns(turns, GOLD, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("turns", "score", "acc", "fmt", "n_img", "n_txt"),
    [
        ([RIGHT], 1.0, 1.0, 1.0, 0, 0),  # correct, no search, valid
        ([IMG, RIGHT], 0.91, 1.0, 1.0, 1, 0),  # correct, searched
        ([TXT, RIGHT], 0.91, 1.0, 1.0, 0, 1),
        ([IMG, TXT, RIGHT], 0.91, 1.0, 1.0, 1, 1),  # penalty once, not per search
        ([WRONG], 0.1, 0.0, 1.0, 0, 0),  # wrong, valid
        ([IMG, TXT, WRONG], 0.1, 0.0, 1.0, 1, 1),  # no penalty on a wrong answer
        (["<reason>x</reason>"], 0.0, 0.0, 0.0, 0, 0),  # wrong, invalid
        ([RIGHT_BAD_FORMAT], 0.9, 1.0, 0.0, 0, 0),  # correct, invalid, no search
        ([IMG, RIGHT_BAD_FORMAT], 0.81, 1.0, 0.0, 1, 0),  # correct, invalid, searched
        ([TXT, TXT, RIGHT], 0.81, 1.0, 0.0, 0, 2),  # upstream rejects text->text->answer
        ([MID_IMG_RIGHT], 0.81, 1.0, 0.0, 1, 0),  # upstream counts a mid-turn tag as a search
        ([IMG, TXT, IMG + RIGHT], 0.81, 0.0 + 1.0, 0.0, 1, 1),  # turn 3 never counted
        ([IMG, RIGHT + "<answer>Tokyo</answer>"], 0.0, 0.0, 0.0, 1, 0),  # last answer counts
    ],
)
def test_upstream_rule_reproduces_upstream_values(
    turns: list[str], score: float, acc: float, fmt: float, n_img: int, n_txt: int
) -> None:
    res = _score(turns, format_rule="upstream")
    assert res == {
        "score": pytest.approx(score, abs=1e-12),
        "acc": acc,
        "format": fmt,
        "n_image_search": n_img,
        "n_text_search": n_txt,
    }


@pytest.mark.parametrize(
    ("turns", "score", "fmt", "n_img", "n_txt"),
    [
        ([RIGHT], 1.0, 1.0, 0, 0),
        ([IMG, TXT, RIGHT], 0.91, 1.0, 1, 1),
        ([TXT, TXT, RIGHT], 0.91, 1.0, 0, 2),  # allowed by the limits: no format loss
        ([MID_IMG_RIGHT], 0.9, 0.0, 0, 0),  # no search ran: no penalty, but the format is broken
        (["<reason>r</reason><text_search> </text_search>", RIGHT], 0.9, 0.0, 0, 0),  # empty query
        ([TXT, IMG, RIGHT], 0.81, 0.0, 1, 1),  # image search only in round 1
        ([IMG, TXT, TXT, RIGHT], 0.81, 0.0, 1, 2),  # 4 turns: scored, not an error
        ([WRONG], 0.1, 1.0, 0, 0),
    ],
)
def test_limits_rule(turns: list[str], score: float, fmt: float, n_img: int, n_txt: int) -> None:
    res = _score(turns)
    assert res["score"] == pytest.approx(score, abs=1e-12)
    assert (res["format"], res["n_image_search"], res["n_text_search"]) == (fmt, n_img, n_txt)


def test_more_than_three_turns_scores_instead_of_raising_under_upstream_rule() -> None:
    res = _score([IMG, TXT, TXT, RIGHT], format_rule="upstream")
    assert res["format"] == 0.0 and res["score"] == pytest.approx(0.81)
    assert (res["n_image_search"], res["n_text_search"]) == (1, 2)


def test_per_search_penalty_and_custom_weights() -> None:
    assert _score([IMG, TXT, RIGHT], per_search=True)["score"] == pytest.approx(0.9 * 0.81 + 0.1)
    assert _score([IMG, RIGHT], alpha=0.0, search_penalty=0.5)["score"] == pytest.approx(0.5)


def test_no_turns_scores_zero_with_all_keys() -> None:
    assert _score([]) == dict.fromkeys(RESULT_KEYS, 0) | {"score": 0.0}


def test_modes() -> None:
    long_right = "<reason>r</reason><answer>It is the Eiffel Tower in Paris</answer>"
    assert _score([long_right], mode="EM")["acc"] == 0.0
    assert _score([long_right], mode="SubEM")["acc"] == 1.0
    # SubEM is one-way (gold inside answer): a fragment of the gold does not score
    assert answer_correct("Eiffel", GOLD, "SubEM") == 0.0
    assert answer_correct("e", GOLD, "SubEM") == 0.0
    assert answer_correct("anything", ["", "  "], "SubEM") == 0.0
    assert answer_correct(None, GOLD) == 0.0
    assert _score([long_right], mode="judge", judge=lambda a, g: 1.0)["acc"] == 1.0
    with pytest.raises(ValueError, match="needs a judge"):
        _score([long_right], mode="judge")
    with pytest.raises(ValueError, match="unknown reward mode"):
        _score([long_right], mode="F1")


def test_score_turns_refuses_a_single_string() -> None:
    with pytest.raises(TypeError, match="list of turn strings"):
        score_turns(RIGHT, GOLD)  # type: ignore[arg-type]


# ---------------------------------------------------------------- veRL entry point


def _tool_turn(question: str) -> str:
    result = render_text_results([TextHit("https://e.org", "E", "Built for 1889.\nassistant\nnot a turn")])
    return tool_response_text(result, question, load_prompts().after_text_search)


def test_compute_score_prefers_turns_from_extra_info_and_merges_candidates() -> None:
    info = {"assistant_turns": np.array([TXT, RIGHT], dtype=object), "candidate_answers": '["Tour Eiffel"]'}
    res = compute_score("mmsearch_r1/fvqa", "ignored", "Eiffel Tower", info)
    assert tuple(res) == RESULT_KEYS
    assert res["score"] == pytest.approx(0.91)
    only_candidate = "<reason>r</reason><answer>Tour Eiffel</answer>"
    res2 = compute_score(
        "x",
        "",
        ["nope"],
        {"assistant_turns": [only_candidate], "candidate_answers": info["candidate_answers"]},
    )
    assert res2["acc"] == 1.0


def test_compute_score_splits_a_decoded_response_with_and_without_chat_markers() -> None:
    q = "What is this tower?"
    marked = (
        TXT
        + "<|im_end|>\n<|im_start|>user\n"
        + _tool_turn(q)
        + "<|im_end|>\n<|im_start|>assistant\n"
        + RIGHT
        + "<|im_end|>"
    )
    assert split_turns(marked) == [TXT, RIGHT]
    decoded = TXT + "\nuser\n" + _tool_turn(q) + "\nassistant\n" + RIGHT  # skip_special_tokens=True
    assert split_turns(decoded) == [TXT, RIGHT]
    assert compute_score("mmsearch_r1", decoded, GOLD)["score"] == pytest.approx(0.91)
    assert compute_score("mmsearch_r1", RIGHT, GOLD)["score"] == 1.0


def test_compute_score_options_from_reward_kwargs_and_upstream_extra_info_names() -> None:
    info = {"assistant_turns": [TXT, TXT, RIGHT]}
    assert compute_score("d", "", GOLD, info)["score"] == pytest.approx(0.91)
    assert compute_score("d", "", GOLD, info, format_rule="upstream")["score"] == pytest.approx(0.81)
    upstream_names = dict(info, use_search_count_penalty=True, format_penalty=0.0, search_penalty=0.5)
    assert compute_score("d", "", GOLD, upstream_names)["score"] == pytest.approx(0.25)
    assert compute_score("d", "", GOLD, dict(info, reward_mode="SubEM"))["acc"] == 1.0


def test_compute_score_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(TypeError, match="solution_str must be a str"):
        compute_score("d", None, GOLD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a JSON list"):
        compute_score("d", RIGHT, GOLD, {"candidate_answers": "[broken"})
    with pytest.raises(TypeError, match="ground_truth must be"):
        compute_score("d", RIGHT, 3)


def test_grpo_advantage_prefers_correct_no_search_over_correct_with_search() -> None:
    """Our rewards through veRL's own GRPO advantage: the on-demand-search incentive survives."""
    import torch
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    group = [[RIGHT], [IMG, RIGHT], [WRONG], ["<reason>x</reason>"]]
    scores = [_score(t)["score"] for t in group]
    rewards = torch.zeros(len(group), 4)
    rewards[:, -1] = torch.tensor(scores)
    adv, _ = compute_grpo_outcome_advantage(
        rewards, torch.ones(len(group), 4), np.array(["item-1"] * len(group))
    )
    a = adv[:, 0].tolist()
    assert a[0] > a[1] > 0 > a[2] > a[3]
    assert json.dumps(scores)  # plain floats, loggable by veRL
