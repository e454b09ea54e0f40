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
loader, so it runs in DataLoader workers) and ``tokenizer(str | list[str]) -> token ids`` (the text
encoder's own tokenizer, padded to ``tokenizer.context_length``).

Unlike ``open_clip.create_model_and_transforms`` (which returns two transforms, train and val) this
returns ``(model, preprocess, tokenizer)``, CLIP_benchmark's ``load_clip`` triple: frozen encoders
have one transform and no training augmentation.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .encoders.base import TextEncoder
from .errors import UnialignError
from .model import AlignedModel

__all__ = ["Tokenizer", "create_model_and_transforms", "load_clip_benchmark"]


class Tokenizer:
    """open_clip's tokenizer contract: ``tokenizer(str | list[str]) -> LongTensor (N, context_length)``,
    the text encoder's own tokenizer, padded to its maximum length (``context_length``). The model's
    ``encode_text`` reads the ids back (attention mask = ids != pad) and refuses other tokenizers' ids."""

    def __init__(self, text_encoder: TextEncoder):
        self.encoder = text_encoder

    @property
    def context_length(self) -> int:
        return self.encoder.context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        return self.encoder.tokenize(texts, context_length)

    def __repr__(self) -> str:
        return f"Tokenizer({self.encoder.spec!r}, context_length={self.context_length})"


def create_model_and_transforms(model: str | os.PathLike | AlignedModel, device: str | torch.device | None = None
                                ) -> tuple[AlignedModel, Any, Tokenizer]:
    """``(model, preprocess, tokenizer)`` of a saved model folder (or a loaded AlignedModel), in eval
    mode on ``device`` (default: auto)."""
    m = model if isinstance(model, AlignedModel) else AlignedModel.from_pretrained(model, device=device)
    if device is not None:
        m.to(device)
    text = m.text_encoder
    if not isinstance(text, TextEncoder):
        raise UnialignError(f"{text.spec} has no tokenizer; the open_clip interface needs a text encoder that has one")
    return m.eval(), m.image_encoder.loader(), Tokenizer(text)


def load_clip_benchmark(model_name: str, pretrained: str, cache_dir: str | None = None,
                        device: str | torch.device = "cpu") -> tuple[AlignedModel, Any, Tokenizer]:
    """CLIP_benchmark's loader signature (an entry of its ``TYPE2FUNC``): ``pretrained`` is the saved
    model folder; ``model_name`` only names the model in result files."""
    return create_model_and_transforms(pretrained, device=device)
