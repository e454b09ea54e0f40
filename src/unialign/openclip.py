"""open_clip's loader contract for a saved unialign model, for tools written against CLIP
(CLIP_benchmark, clip-retrieval, open_clip's zero-shot code)::

    import unialign
    model, preprocess, tokenizer = unialign.create_model_and_transforms("runs/default/model")
    pixels = torch.stack([preprocess(im) for im in pil_images])
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer(["a cat", "a dog"]), normalize=True)
        probs = (model.logit_scale.exp() * img @ txt.T).softmax(-1)

The model *is* the :class:`~unialign.model.AlignedModel` (an ``nn.Module`` with open_clip's
``encode_image`` / ``encode_text(normalize=)``, ``forward`` and log ``logit_scale``); this module only
adds the two callables: ``preprocess(PIL image) -> CHW tensor`` (the image encoder's own picklable
loader, so it runs in DataLoader workers) and ``tokenizer(str | list[str]) -> tokens``.

Unlike ``open_clip.create_model_and_transforms`` (which returns two transforms, train and val) this
returns ``(model, preprocess, tokenizer)``, CLIP_benchmark's ``load_clip`` triple: frozen encoders
have one transform and no training augmentation.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .model import AlignedModel

__all__ = ["TextTokens", "Tokenizer", "create_model_and_transforms"]


class TextTokens(list):
    """The tokenizer's output: the texts themselves (unialign's text encoders tokenize inside
    ``forward``), with ``.to(device)`` so ``tokenizer(texts).to(device)`` works as with token tensors."""

    def to(self, *args: Any, **kwargs: Any) -> "TextTokens":
        return self


class Tokenizer:
    """``tokenizer(str | list[str]) -> TextTokens``; the text encoder truncates at its own maximum length."""

    def __init__(self, text_encoder_spec: str = ""):
        self.spec = text_encoder_spec

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> TextTokens:
        return TextTokens([texts] if isinstance(texts, str) else [str(t) for t in texts])

    def __repr__(self) -> str:
        return f"Tokenizer({self.spec!r})"


def create_model_and_transforms(model: str | os.PathLike | AlignedModel, device: str | torch.device | None = None
                                ) -> tuple[AlignedModel, Any, Tokenizer]:
    """``(model, preprocess, tokenizer)`` of a saved model folder (or a loaded AlignedModel), in eval
    mode on ``device`` (default: auto)."""
    m = model if isinstance(model, AlignedModel) else AlignedModel.from_pretrained(model, device=device)
    if device is not None:
        m.to(device)
    return m.eval(), m.image_encoder.loader(), Tokenizer(m.text_encoder.spec)
