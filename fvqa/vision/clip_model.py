"""Build an open_clip model the one way the project needs it (crawler scoring and the local image index).

`fvqa-tiny` (a two-layer, 64-pixel ViT, config shipped as `fvqa-tiny.json`) is registered on demand for
offline mechanics. `pretrained=None` gives random weights seeded identically in every process, so an
index embedded by one process can be searched from another; the seed does not touch the global RNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fvqa.errors import ConfigError

TINY_NAME = "fvqa-tiny"
TINY_CONFIG = Path(__file__).with_name(f"{TINY_NAME}.json")
RANDOM_SEED = 0


def load_clip(model: str, pretrained: str | None, device: str = "cpu", *, hint: str = "") -> tuple[Any, Any, Any]:
    """(model in eval mode on `device`, image preprocess, tokenizer); a ConfigError (plus `hint`) if unloadable."""
    import open_clip
    import torch

    if model == TINY_NAME and TINY_NAME not in open_clip.list_models():
        open_clip.add_model_config(TINY_CONFIG)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model)
    except Exception as exc:  # noqa: BLE001 - open_clip raises RuntimeError/ValueError/OSError here
        raise ConfigError(
            f"cannot load CLIP model {model!r} (pretrained={pretrained!r}): {exc}. "
            f"Pretrained weights must be in the local cache when offline{hint}."
        ) from exc
    net.eval()
    return net, preprocess, tokenizer
