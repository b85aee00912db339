"""A tiny Qwen2.5-VL built offline in seconds: random weights, real architecture, real processor.

`build_tiny_qwen(out_dir) -> path` saves a model folder that `AutoModelForImageTextToText` and
`AutoProcessor` load like any Qwen2.5-VL checkpoint: 2 decoder layers (hidden 64), a 2-block vision
tower, a `Qwen2_5_VLProcessor` made of a `Qwen2VLImageProcessor` (small pixel budget, so an image
is a handful of tokens), a `Qwen2VLVideoProcessor` and a byte-level BPE tokenizer trained on the
fly with Qwen's special tokens and a ChatML chat template. With random weights the output is
gibberish; the plumbing (chat template, image tokens, mrope positions, generation, saving) is real.
Tests use it as is; the demo primes it (`fvqa.demo.policy`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fvqa.protocol import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    IMAGE_SEARCH_TAG,
    REASON_CLOSE,
    REASON_OPEN,
    TEXT_SEARCH_CLOSE,
    TEXT_SEARCH_OPEN,
)

MODEL_DIRNAME = "tiny-qwen2.5-vl"

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# ChatML as Qwen2-VL uses it: a default system turn, and each image part as vision start/pad/end.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "<reason>The image shows a tower.</reason><search><img></search>",
    "<reason>I know it.</reason><answer>Eiffel Tower</answer>",
    "<reason>Look it up.</reason><text_search>who built the tower</text_search>",
    "Searched results: <information>[Image Search Results] title: page</information>",
    "Original user's question: What is this? Which country, year, maker, height, weight?",
    "the a of and in to is was by from for with on this that it at as be are",
    "0 1 2 3 4 5 6 7 8 9 France Japan Peru Kenya Norway",
]
"""The base tokenizer corpus. Unchanged from the test-only builder, so `corpus=None` gives the same
400-token vocabulary (and the same random model) the tests were written against."""

PROTOCOL_TOKENS = (
    IMAGE_SEARCH_TAG, REASON_OPEN, REASON_CLOSE, TEXT_SEARCH_OPEN, TEXT_SEARCH_CLOSE, ANSWER_OPEN, ANSWER_CLOSE,
    "<information>", "</information>",
)
"""Tags the demo tokenizer (built with a corpus) holds as single tokens; the image-search call is one."""

DEFAULT_VOCAB = 400
CORPUS_VOCAB = 1536
"""Vocabulary with a demo corpus: prompts, tags and answers become few tokens, the model stays tiny."""

def build_tokenizer(vocab_size: int | None = None, corpus: Iterable[str] | None = None):  # -> PreTrainedTokenizerFast
    """Byte-level BPE trained on protocol strings (plus `corpus`), wrapped as a Qwen2 tokenizer.

    Without `corpus` this is exactly the 400-token tokenizer the tests use; with one (the demo's
    prompts, questions and answers) the vocabulary grows to `CORPUS_VOCAB` so that the long
    opening prompt and most answers cost few tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    extra = [s for s in (corpus or ()) if s]
    if vocab_size is None:
        vocab_size = CORPUS_VOCAB if extra else DEFAULT_VOCAB
    tok = Tokenizer(models.BPE())
    if extra:
        # Qwen2's own pre-tokenisation (what `Qwen2Tokenizer` applies again when the folder is
        # loaded), so every learned merge is one the reloaded tokenizer can use.
        from tokenizers import Regex, normalizers
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4 + extra, trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)
    if extra:
        # The tags as whole tokens (not special: decoding keeps them). A 2-layer model then learns
        # the protocol's structure in a few seconds instead of spelling `<`, `search`, `><`, `img`...
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in PROTOCOL_TOKENS])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_qwen(
    out_dir: Path | str,
    *,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int | None = None,
    subdir: str | None = MODEL_DIRNAME,
) -> Path:
    """Save a tiny random Qwen2.5-VL (model + processor) under `out_dir/subdir`; return that folder.

    `subdir=None` saves into `out_dir` itself. `corpus` adds text the BPE tokenizer is trained on
    (see `build_tokenizer`); the architecture does not depend on it except for the vocabulary size.
    """
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir) / subdir if subdir else Path(out_dir)
    tokenizer = build_tokenizer(vocab_size, corpus)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden, heads = 64, 4
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    pixels = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)  # 4..16 vision tokens per image
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels, size={"shortest_edge": pixels["min_pixels"],
                                                              "longest_edge": pixels["max_pixels"]}),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
