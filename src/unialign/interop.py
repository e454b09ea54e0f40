"""open_clip-style access to a saved unialign model, for tools written against CLIP (CLIP_benchmark,
clip-retrieval, open_clip's zero-shot code)::

    import unialign
    model, preprocess, tokenizer = unialign.create_model_and_transforms("runs/default/model")
    pixels = torch.stack([preprocess(im) for im in pil_images])
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokenizer(["a cat", "a dog"]), normalize=True)
        probs = (model.logit_scale.exp() * img @ txt.T).softmax(-1)

The contract followed (CLIP_benchmark's ``load_clip`` returns the same triple):

- ``preprocess(PIL image) -> CHW float tensor``: the image encoder's own picklable transform, so it
  runs in DataLoader workers; non-RGB images are composited on white first, as unialign's loader does.
- ``tokenizer(str | list[str]) -> TextTokens``: the text encoders here tokenize inside their forward
  pass, so the "tokens" are the strings themselves in a list with a no-op ``.to(device)``.
- ``model.encode_image(pixels, normalize=False)`` / ``model.encode_text(tokens, normalize=False)``:
  projected shared-space embeddings, unnormalised unless ``normalize=True`` (open_clip's default).
  The raw norm of a head's output carries no meaning; every unialign consumer normalises.
- ``model.logit_scale``: a frozen ``nn.Parameter`` holding the *log* of the learned scale, as in
  open_clip, so ``model.logit_scale.exp()`` is the scale (``AlignedModel.logit_scale`` is the scale).
- ``model(image, text)`` returns ``(image_features, text_features, logit_scale.exp())`` with both
  feature sets normalised, like open_clip's ``CLIP.forward``; ``model.eval()`` and ``model.to(...)``
  work as on any module (``.to`` moves the frozen encoders too).

Unlike ``open_clip.create_model_and_transforms`` (which returns two transforms, train and val) this
returns ``(model, preprocess, tokenizer)``: the frozen encoders have one transform and no training
augmentation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .device import autocast, pick_device
from .encoders.base import Encoder

__all__ = ["OpenCLIPModel", "Preprocess", "TextTokens", "Tokenizer", "create_model_and_transforms"]


class Preprocess:
    """Picklable ``PIL image -> tensor``: non-RGB to RGB (alpha on white), then the encoder's transform."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if getattr(img, "mode", "RGB") != "RGB":
            from .data.base import to_rgb

            img = to_rgb(img)
        return self.transform(img)

    def __repr__(self) -> str:
        return f"Preprocess({self.transform!r})"


class TextTokens(list):
    """The tokenizer's output: the texts themselves (unialign's text encoders tokenize in ``forward``),
    with ``.to(device)`` so ``tokenizer(texts).to(device)`` works as with open_clip's token tensors."""

    def to(self, *args: Any, **kwargs: Any) -> "TextTokens":
        return self


class Tokenizer:
    """``tokenizer(str | list[str]) -> TextTokens``; ``context_length`` is accepted and ignored
    (the text encoder truncates at its own maximum length)."""

    def __init__(self, text_encoder_spec: str = ""):
        self.spec = text_encoder_spec

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> TextTokens:
        return TextTokens([texts] if isinstance(texts, str) else [str(t) for t in texts])

    def __repr__(self) -> str:
        return f"Tokenizer({self.spec!r})"


def _move_encoder(enc: Encoder, device: torch.device) -> None:
    """Move a frozen encoder's modules and tensors (whatever attributes hold them) to ``device``."""
    for name, val in list(vars(enc).items()):
        if isinstance(val, torch.nn.Module):
            val.to(device)
        elif isinstance(val, torch.Tensor):
            setattr(enc, name, val.to(device))
    enc.device = device


class OpenCLIPModel(torch.nn.Module):
    """An :class:`~unialign.model.AlignedModel` behind open_clip's model interface."""

    def __init__(self, aligned: Any):
        super().__init__()
        self.aligned = aligned
        if isinstance(aligned.projection, torch.nn.Module):
            self.projection = aligned.projection  # registered, so .eval()/.to()/.parameters() reach it
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(aligned.logit_scale)), requires_grad=False)

    @property
    def image_encoder(self) -> Encoder:
        return self.aligned.image_encoder

    @property
    def text_encoder(self) -> Encoder:
        return self.aligned.text_encoder

    @property
    def device(self) -> torch.device:
        return self.aligned.device

    def _features(self, enc: Encoder, batch: Any, layers: Sequence[str]) -> torch.Tensor:
        with torch.no_grad(), autocast(enc.device):
            out = enc.forward(batch, list(layers))
        # concatenated in layer order, fp32, as the feature store and AlignedModel.encode_* do; the clone
        # turns inference-mode tensors into ordinary ones so a trainable head can still take gradients
        return torch.cat([out[l].float() for l in layers], dim=1).clone()

    def _project(self, fn: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, normalize: bool) -> torch.Tensor:
        emb = torch.as_tensor(fn(feats.to(self.device).float())).float().to(self.device)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Preprocessed pixels (B, C, H, W) -> shared-space embeddings (B, d)."""
        feats = self._features(self.image_encoder, image.to(self.image_encoder.device), self.aligned.image_layers)
        return self._project(self.aligned.projection.project_image, feats, normalize)

    def encode_text(self, text: Sequence[str], normalize: bool = False) -> torch.Tensor:
        """Tokenizer output (the texts) -> shared-space embeddings (B, d)."""
        texts = [text] if isinstance(text, str) else [str(t) for t in text]
        feats = self._features(self.text_encoder, texts, self.aligned.text_layers)
        return self._project(self.aligned.projection.project_text, feats, normalize)

    def forward(self, image: torch.Tensor | None = None, text: Sequence[str] | None = None):
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        return img, txt, self.logit_scale.exp()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "OpenCLIPModel":
        super()._apply(fn, *args, **kwargs)
        # find where the logit scale went: that is the device .to() asked for
        dev = self.logit_scale.device
        if dev != self.aligned.device:
            for enc in (self.aligned.image_encoder, self.aligned.text_encoder):
                _move_encoder(enc, dev)
            self.aligned.device = dev
        return self


def create_model_and_transforms(model_dir: str | Path | Any, device: str | torch.device | None = None
                                 ) -> tuple[OpenCLIPModel, Preprocess, Tokenizer]:
    """Load a saved unialign model (a folder, or an ``AlignedModel``) as ``(model, preprocess, tokenizer)``
    with open_clip's calling conventions; the model is in eval mode on ``device`` (default: auto)."""
    from .model import AlignedModel

    aligned = model_dir if isinstance(model_dir, AlignedModel) else AlignedModel.load(model_dir, device=device)
    model = OpenCLIPModel(aligned)
    if device is not None:
        model.to(pick_device(device))
    model.eval()
    return model, Preprocess(aligned.image_encoder.preprocess()), Tokenizer(aligned.text_encoder.spec)
