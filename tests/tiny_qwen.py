"""The tiny random Qwen2.5-VL the tests use; it lives in `fvqa.demo.tiny_model` (the demo primes it).

`build_tiny_qwen(tmp_dir) -> path` saves a model folder under `tmp_dir/tiny-qwen2.5-vl` that
`AutoModelForImageTextToText` and `AutoProcessor` load like any Qwen2.5-VL checkpoint. Re-exported
here so tests keep importing it as `from tiny_qwen import build_tiny_qwen`.
"""

from __future__ import annotations

from fvqa.demo.tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_qwen, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tiny_qwen", "build_tokenizer"]
