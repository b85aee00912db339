"""The offline demo's policy: the tiny Qwen2.5-VL (`fvqa.demo.tiny_model`), primed on protocol turns.

GRPO on a random tiny model learns nothing: every rollout scores 0, so every advantage is 0. The demo
therefore *primes* it (`prime_policy`): a few seconds of teacher-forced AdamW steps on
protocol-correct assistant turns built from the prepared veRL rows (image search, text search,
direct answer, answer after results), rendered with the real chat template and the row's real
image. At temperature 1 the primed model then mostly writes valid tag turns, mixes image searches
and answers (text searches now and then), and breaks the tag rules in some turns, so the format
term of the reward varies within a GRPO group; right answers are rare (a 2-layer model cannot
read the image). It is a demo stand-in, not a trained policy, and says so in `fvqa_standin.json`
next to its weights.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fvqa.demo.tiny_model import PROTOCOL_TOKENS
from fvqa.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    IMAGE_PLACEHOLDER,
    IMAGE_RESULTS_HEADER,
    IMAGE_SEARCH_ERROR,
    IMAGE_SEARCH_TAG,
    QWEN_IMAGE_PAD,
    REASON_CLOSE,
    REASON_OPEN,
    STOP_STRINGS,
    TEXT_RESULTS_HEADER,
    TEXT_SEARCH_CLOSE,
    TEXT_SEARCH_OPEN,
    ImageHit,
    Prompts,
    TextHit,
    is_valid_answer_turn,
    is_valid_image_search_turn,
    is_valid_text_search_turn,
    load_prompts,
    parse_turn,
    render_image_results,
    render_text_results,
    to_content_parts,
    tool_response_text,
)

STANDIN_FILE = "fvqa_standin.json"

# One short reason per action. Each starts with a word that picks the action and ends with a word
# that names it: the tag after `</reason>` then depends on the token just before it, which a
# 2-layer model learns in a few steps (with varied reasons, or a shared final ".", it blended them
# and put the wrong tag after the reason).
REASONS: dict[str, str] = {
    "image_search": "Unknown subject, so I search the image",
    "text_search": "Missing fact, so I search the web",
    "answer": "Known subject, so I answer",
    "answer_after_image": "The results name it, so I answer",
    "text_after_image": "Missing fact, so I search the web",
    "answer_after_text": "The results give it, so I answer",
}


# --------------------------------------------------------------------------------------------
# Rows and the demo corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """What priming needs from one veRL row: the opening user text, its image, question and answers."""

    content: str
    image: bytes
    question: str
    answer: str
    candidates: tuple[str, ...] = ()
    search_label: str = ""


def read_rows(train_parquet: Path | str) -> list[Row]:
    """The rows of a `fvqa train prepare` parquet that have one user message and one image."""
    import pyarrow.parquet as pq

    rows: list[Row] = []
    for rec in pq.read_table(str(train_parquet)).to_pylist():
        prompt = rec.get("prompt") or []
        images = rec.get("images") or []
        if len(prompt) != 1 or len(images) != 1 or not images[0].get("bytes"):
            continue
        content = prompt[0]["content"]
        if content.count(IMAGE_PLACEHOLDER) != 1:
            continue
        extra = rec.get("extra_info") or {}
        answer = (rec.get("reward_model") or {}).get("ground_truth") or ""
        rows.append(Row(
            content=content, image=images[0]["bytes"], question=str(extra.get("question") or ""),
            answer=str(answer), candidates=tuple(extra.get("candidate_answers") or [answer]),
            search_label=str(extra.get("search_label") or ""),
        ))
    return rows


def demo_corpus(rows: Sequence[Row]) -> list[str]:
    """Text for the tokenizer: prompts, result headers, reasons, questions and answers.

    Answers and reasons are repeated so BPE merges them into few tokens (a short answer is easier
    to get exactly right); prompts appear a few times so the opening prompt costs a few hundred
    tokens. Texts are cut at the protocol tags, which become whole added tokens (`PROTOCOL_TOKENS`):
    BPE then learns merges for the pieces the tokenizer will actually see between them.
    """
    prompts = load_prompts()
    texts = [prompts.round_1, prompts.after_image_search, prompts.after_text_search, prompts.direct_answer,
             prompts.rag_query, prompts.rag_answer, IMAGE_RESULTS_HEADER, TEXT_RESULTS_HEADER, IMAGE_SEARCH_ERROR,
             "Searched results: ", "Original user's question: ", "title: ", "(link:", " - page "]
    out = texts * 6
    out += sorted({r.content for r in rows}) * 2
    out += list(REASONS.values()) * 40
    for r in rows:
        out += [r.question, _query(r.question)] * 2
        out += [a for a in r.candidates for _ in range(8)]
    tags = re.compile("|".join(re.escape(t) for t in sorted(PROTOCOL_TOKENS, key=len, reverse=True)))
    return [piece for text in out for piece in tags.split(text) if piece]


# --------------------------------------------------------------------------------------------
# Protocol-correct training turns
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One supervised example: chat messages up to the last user turn, the images in them, the target."""

    kind: str
    messages: list[dict[str, Any]]
    images: list[Any]
    target: str
    answer: str = ""


def _user_parts(content: str, image: Any) -> list[dict[str, Any]]:
    """veRL's RLHFDataset split of an opening prompt at ``<image>`` into text and image parts."""
    before, after = content.split(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = []
    if before:
        parts.append({"type": "text", "text": before})
    parts.append({"type": "image", "image": image})
    if after:
        parts.append({"type": "text", "text": after})
    return parts


def _query(question: str) -> str:
    """A one-line text-search query from a question (what a model without the subject would ask)."""
    return " ".join(question.replace("?", " ").split()) or "what is this"


def build_examples(rows: Sequence[Row], *, n: int = 64, seed: int = 0, round1_share: float = 0.7) -> list[Example]:
    """Protocol-correct turns from the rows, mixed so that sampled rollouts vary.

    Round 1 (user image + question), `round1_share` of the examples: image search (more often for
    rows whose search label needs it), a text search (more often for text-search rows), or a direct
    answer with the ground truth. The rest continue after an image search (tool turn from
    `tool_turn`): answer (more often for image-search rows), text search, or, after that text
    search and its pages, answer.
    """
    from PIL import Image

    prompts = load_prompts()
    rng = random.Random(seed)
    picked = list(rows)
    rng.shuffle(picked)
    examples: list[Example] = []
    for i in range(n if picked else 0):
        row = picked[i % len(picked)]
        img = Image.open(io.BytesIO(row.image)).convert("RGB")
        history: list[dict[str, Any]] = [{"role": "user", "content": _user_parts(row.content, img)}]
        images: list[Any] = [img]
        answer = f"{ANSWER_OPEN}{row.answer}{ANSWER_CLOSE}"
        if rng.random() < round1_share:
            p_image = 0.75 if row.search_label in ("image_search_required", "mixed_search_required") else 0.5
            p_text = 0.15 if row.search_label == "text_search_required" else 0.06
            v = rng.random()
            if v < p_image:
                kind, action = "image_search", IMAGE_SEARCH_TAG
            elif v < p_image + p_text:
                kind, action = "text_search", f"{TEXT_SEARCH_OPEN}{_query(row.question)}{TEXT_SEARCH_CLOSE}"
            else:
                kind, action = "answer", answer
            examples.append(Example(kind, history, images, reasoned(kind, action), row.answer))
            continue
        msg, thumbs = tool_turn("image_search", row, img, prompts, n_hits=rng.choice([1, 2]))
        history += [{"role": "assistant", "content": reasoned("image_search", IMAGE_SEARCH_TAG)}, msg]
        images += thumbs
        v = rng.random() * (0.7 if row.search_label == "image_search_required" else 1.0)
        if v < 0.55:
            examples.append(Example("answer_after_image", history, images,
                                    reasoned("answer_after_image", answer), row.answer))
            continue
        query = reasoned("text_after_image", f"{TEXT_SEARCH_OPEN}{row.answer} {_query(row.question)}{TEXT_SEARCH_CLOSE}")
        if v < 0.85:
            examples.append(Example("text_after_image", history, images, query, row.answer))
            continue
        msg, _ = tool_turn("text_search", row, img, prompts)
        history += [{"role": "assistant", "content": query}, msg]
        examples.append(Example("answer_after_text", history, images, reasoned("answer_after_text", answer),
                                row.answer))
    return examples


def tool_turn(
    kind: str, row: Row, img: Any, prompts: Prompts, *, n_hits: int = 2
) -> tuple[dict[str, Any], list[Any]]:
    """The user turn after a search call, built as the agent loop builds it, and its thumbnails.

    Stand-in results: image-search titles carry the answer (the demo world's page titles do, for
    name questions) with the user image as thumbnail (a reverse image search finds it); text-search
    pages state the answer.
    """
    if kind == "image_search":
        hits = [ImageHit(title=f"{row.answer} - page {k}", url=f"http://demo.local/{k}",
                         thumbnail=img.resize((56, 56))) for k in range(1, n_hits + 1)]
        result, thumbs = render_image_results(hits)
        text = tool_response_text(result, row.question, prompts.after_image_search)
        return {"role": "user", "content": to_content_parts(text, thumbs, QWEN_IMAGE_PAD)}, thumbs
    pages = render_text_results([TextHit(url=f"http://demo.local/t{k}", summary=f"{row.question} {row.answer}.")
                                 for k in range(1, n_hits + 1)])
    return {"role": "user", "content": tool_response_text(pages, row.question, prompts.after_text_search)}, []


def reasoned(kind: str, action: str) -> str:
    """An assistant turn: the fixed reason for this kind of turn, then the action's tag."""
    return f"{REASON_OPEN}{REASONS[kind]}{REASON_CLOSE}{action}"


def _encode(processor: Any, ex: Example) -> dict[str, Any]:
    """Token ids (prompt then target + `<|im_end|>`), labels on the target only, vision inputs."""
    import torch

    prompt = processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=ex.images or None, return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    target_ids = torch.tensor(processor.tokenizer.encode(ex.target + "<|im_end|>", add_special_tokens=False))
    ids = torch.cat([prompt_ids, target_ids])
    labels = torch.cat([torch.full_like(prompt_ids, -100), target_ids])
    out = {"input_ids": ids, "labels": labels}
    if "pixel_values" in enc:
        out.update(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return out


def _collate(items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; vision patches of all examples are concatenated (Qwen2.5-VL's layout)."""
    import torch

    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    vis = [it for it in items if "pixel_values" in it]
    if vis:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in vis])
        batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in vis])
    return batch


def _length_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches of similar length (a one-turn prompt is ~400 tokens, a three-turn one
    ~1000: mixing them would mostly train on padding), in random order."""
    order = rng.sample(range(len(lengths)), len(lengths))
    order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------
# Priming
# --------------------------------------------------------------------------------------------


@dataclass
class PrimeReport:
    """What priming did: where the model is, steps, wall seconds (loading and encoding included),
    mean loss of the first 3 and of the last 10 steps (per assistant token), and the example mix."""

    model_dir: Path
    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    n_examples: int
    examples_by_kind: dict[str, int] = field(default_factory=dict)
    standin_file: Path | None = None


class _Threads:
    """Use at most `n` torch threads inside the block (2-core machines), then restore the old count."""

    def __init__(self, n: int | None) -> None:
        self.n = n

    def __enter__(self) -> None:
        import torch

        self.old = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self.n or self.old, os.cpu_count() or 1)))

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.old)


def prime_policy(
    model_dir: Path | str,
    train_parquet: Path | str,
    *,
    steps: int = 150,
    seconds_budget: float = 60.0,
    seed: int = 0,
    batch_size: int = 4,
    lr: float = 2e-2,
    n_examples: int = 64,
    out_dir: Path | str | None = None,
    num_threads: int | None = 2,
) -> PrimeReport:
    """Teacher-forced AdamW steps on protocol turns from `train_parquet`; save model + processor.

    Loss is on the assistant tokens only (target and its `<|im_end|>`). Stops after `steps` or
    when `seconds_budget` is spent, whichever is first. Saves to `out_dir` (default: overwrite
    `model_dir`) and writes `fvqa_standin.json` there, marking the folder as a demo stand-in.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = Path(model_dir)
    target_dir = Path(out_dir) if out_dir is not None else model_dir
    rows = read_rows(train_parquet)
    if not rows:
        raise ValueError(f"{train_parquet} has no row with one user message and one image")
    with _Threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = time.perf_counter()
        processor = AutoProcessor.from_pretrained(str(model_dir))
        model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
        examples = build_examples(rows, n=n_examples, seed=seed)
        encoded = [_encode(processor, ex) for ex in examples]
        pad_id = processor.tokenizer.pad_token_id
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / max(1, steps)))
        rng = random.Random(seed)
        batches: list[list[int]] = []
        losses: list[float] = []
        model.train()
        done = 0
        while done < steps and time.perf_counter() - start < seconds_budget:
            if not batches:
                batches = _length_batches([len(e["input_ids"]) for e in encoded], batch_size, rng)
            batch = _collate([encoded[i] for i in batches.pop()], pad_id)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            done += 1
        model.eval()
        seconds = time.perf_counter() - start
    tail = losses[-10:] or [float("nan")]
    final = sum(tail) / len(tail)
    head = losses[:3] or [float("nan")]
    first = sum(head) / len(head)
    model.save_pretrained(target_dir)
    processor.save_pretrained(target_dir)
    kinds = dict(Counter(ex.kind for ex in examples))
    standin = target_dir / STANDIN_FILE
    standin.write_text(json.dumps({
        "stand_in": True,
        "what": (f"tiny random Qwen2.5-VL primed with {done} supervised steps on protocol turns from "
                 f"{train_parquet} (demo stand-in, not a trained policy)"),
        "steps": done,
        "seconds": round(seconds, 2),
        "first_loss": round(first, 4),
        "final_loss": round(final, 4),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_examples": len(examples),
        "examples_by_kind": kinds,
        "train_parquet": str(train_parquet),
        "architecture": "Qwen2_5_VLForConditionalGeneration, 2 layers, hidden 64, vocab "
                        f"{len(processor.tokenizer)}",
    }, indent=2) + "\n")
    return PrimeReport(target_dir, done, seconds, first, final, len(examples), kinds, standin)


# --------------------------------------------------------------------------------------------
# Measuring what the primed policy does
# --------------------------------------------------------------------------------------------


@dataclass
class BehaviourReport:
    """Sampled turns: how many parse as protocol turns, of which kind, how many are right, and
    (for simulated rollouts) the reward of each rollout, grouped per row as GRPO groups them."""

    n: int
    kinds: dict[str, int]
    well_formed: int
    correct: int
    samples: list[str] = field(default_factory=list)
    rewards: list[list[float]] = field(default_factory=list)

    @property
    def valid_fraction(self) -> float:
        """Turns `parse_turn` reads as an action (answer, image or text search)."""
        return (self.n - self.kinds.get("invalid", 0)) / self.n if self.n else 0.0

    @property
    def search_fraction(self) -> float:
        return (self.kinds.get("image_search", 0) + self.kinds.get("text_search", 0)) / self.n if self.n else 0.0

    @property
    def answer_fraction(self) -> float:
        return self.kinds.get("answer", 0) / self.n if self.n else 0.0

    @property
    def groups_with_signal(self) -> int:
        """Rows whose rollouts did not all score the same: GRPO advantages there are not all 0."""
        return sum(len(set(g)) > 1 for g in self.rewards)

    def summary(self) -> dict[str, Any]:
        """Counts and fractions as plain data (for the CLI, logs and fvqa_standin.json)."""
        flat = [r for g in self.rewards for r in g]
        return {
            "n": self.n, "kinds": self.kinds, "valid": round(self.valid_fraction, 3),
            "well_formed": round(self.well_formed / self.n, 3) if self.n else 0.0,
            "search": round(self.search_fraction, 3), "answer": round(self.answer_fraction, 3),
            "correct_answers": self.correct,
            "mean_reward": round(sum(flat) / len(flat), 4) if flat else None,
            "groups_with_signal": f"{self.groups_with_signal}/{len(self.rewards)}",
        }


def _well_formed(text: str) -> bool:
    """Upstream's stricter per-turn tag rules (one reason pair first, one action)."""
    return is_valid_answer_turn(text) or is_valid_image_search_turn(text) or is_valid_text_search_turn(text)


def sample_turns(
    model_dir: Path | str,
    train_parquet: Path | str,
    *,
    n_rows: int = 4,
    k: int = 4,
    after_image_search: bool = False,
    rollout: bool = True,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    seed: int = 0,
    num_threads: int | None = 2,
) -> BehaviourReport:
    """Sample `k` turns for each of `n_rows` rows at `temperature`, as a rollout would, and count them.

    The counted turn is the first one, or (`after_image_search`) the one after a scripted round-1
    image search and its results. Generation stops at `</search>` / `</text_search>` (the rollout's
    stop strings) or `<|im_end|>`, and vision tokens are suppressed (as the CPU rollout server
    does); the decoded text is classified with `fvqa.protocol.parse_turn`, answers are compared with
    the row's answers (EM). With `rollout`, each sample continues like a real trajectory (stand-in
    tool turns from `tool_turn`, `next_action` with the default limits) and is scored with the
    training reward (`score_turns`), so the report shows whether rewards vary within a group.
    """
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fvqa.protocol import Limits, next_action
    from fvqa.train.reward import answer_correct, score_turns

    rows = read_rows(train_parquet)
    rows = random.Random(seed).sample(rows, min(n_rows, len(rows)))
    prompts = load_prompts()
    limits = Limits()
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = processor.tokenizer
    cfg = model.config
    suppress = [int(getattr(cfg, f)) for f in ("image_token_id", "video_token_id", "vision_start_token_id",
                                               "vision_end_token_id") if getattr(cfg, f, None) is not None]

    def generate(messages: list[dict[str, Any]], images: list[Any]) -> str:
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[prompt], images=images, return_tensors="pt")
        out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                             max_new_tokens=max_new_tokens, stop_strings=list(STOP_STRINGS), tokenizer=tok,
                             suppress_tokens=suppress)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    kinds: Counter[str] = Counter()
    samples: list[str] = []
    rewards: list[list[float]] = []
    well = correct = 0
    with _Threads(num_threads), torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for row in rows:
            img = Image.open(io.BytesIO(row.image)).convert("RGB")
            golds = list(row.candidates) or [row.answer]
            group: list[float] = []
            for _ in range(k):
                messages: list[dict[str, Any]] = [{"role": "user", "content": _user_parts(row.content, img)}]
                images: list[Any] = [img]
                turns: list[str] = []
                if after_image_search:
                    turns.append(reasoned("image_search", IMAGE_SEARCH_TAG))
                    msg, thumbs = tool_turn("image_search", row, img, prompts)
                    messages += [{"role": "assistant", "content": turns[0]}, msg]
                    images += thumbs
                text = generate(messages, images)
                turn = parse_turn(text)
                kinds[turn.kind] += 1
                well += _well_formed(text)
                correct += turn.kind == "answer" and answer_correct(turn.answer, golds) > 0
                samples.append(text)
                turns.append(text)
                while rollout and (action := next_action(turns, limits)).kind != "stop":
                    msg, thumbs = tool_turn(action.kind, row, img, prompts)
                    messages += [{"role": "assistant", "content": turns[-1]}, msg]
                    images += thumbs
                    turns.append(generate(messages, images))
                if rollout:
                    group.append(float(score_turns(turns, golds)["score"]))
            if rollout:
                rewards.append(group)
    return BehaviourReport(n=len(samples), kinds=dict(kinds), well_formed=well, correct=int(correct),
                           samples=samples, rewards=rewards)


def write_standin_note(model_dir: Path | str, **extra: Any) -> Path:
    """Add keys (e.g. the measured behaviour) to the folder's `fvqa_standin.json`."""
    path = Path(model_dir) / STANDIN_FILE
    data = json.loads(path.read_text()) if path.is_file() else {"stand_in": True}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


__all__ = [
    "REASONS", "STANDIN_FILE",
    "BehaviourReport", "Example", "PrimeReport", "Row", "build_examples",
    "demo_corpus", "prime_policy", "read_rows", "reasoned", "sample_turns", "tool_turn", "write_standin_note",
]
