"""One small interface for every frozen encoder, of any modality.

An encoder is an ``nn.Module`` whose ``forward(batch, layers)`` returns a dict of pooled feature
tensors: ``"final"`` is the embedding the encoder is known for; other keys (``"layer3"``, ``"block7"``)
are per-layer pooled outputs, returned only when asked for, so that layer selection and layer mixing
can read them from the store. Being a module, it moves with ``.to(device)`` and shows its weights in
``.parameters()`` like any other part of an aligned model; it is built frozen (eval mode, no grads).

What a batch is depends on the modality, and the split of work is the same for all:
:meth:`Encoder.loader` returns a plain picklable callable ``item -> tensor`` (an image path or PIL
image -> a normalised CHW tensor) that runs in DataLoader worker processes, and ``forward`` runs the
model on the stacked tensors in the main process, so decoding never stalls the model. Text encoders
have no loader: their batches are lists of strings, tokenised inside ``forward``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..device import autocast, pick_device
from ..errors import ConfigError
from ..progress import progress

FINAL = "final"
MODALITIES = ("image", "text", "audio", "video", "vector")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(torch.nn.Module):
    """Frozen encoder. Subclasses set ``spec``, ``modality``, ``dim``, ``layer_dims`` and ``version``
    and implement ``forward``; those taking tensors (images, audio, video) also implement ``loader``."""

    spec: str  # the string that names it, e.g. "effnet-lite0", "st:all-MiniLM-L6-v2", "hf:/path"
    modality: str  # one of MODALITIES
    dim: int  # size of the "final" output
    version: str  # weights identity (fingerprint or package version); recorded in stores and models
    layer_dims: dict[str, int]  # every key forward() can return, including "final"

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("cpu")

    # -- to implement -------------------------------------------------------------------------
    def forward(self, batch: Any, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """Pooled features for a batch: stacked tensors, or a list of strings (text).
        Returns float tensors of shape (batch, layer_dims[k]) for each requested key."""
        raise NotImplementedError

    def loader(self) -> Callable[[Any], torch.Tensor] | None:
        """Picklable callable ``item -> tensor`` (a path or an in-memory object), or None when batches
        are passed to ``forward`` as they are (text)."""
        return None

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder with :func:`unialign.encoders.load_encoder`."""
        return {"spec": self.spec, "modality": self.modality, "dim": self.dim, "version": self.version}

    # -- shared -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are (CPU for weightless encoders)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return self._device

    def freeze(self, device: str | torch.device | None = None) -> "Encoder":
        """Eval mode, no gradients, moved to ``device`` (default: CUDA, MPS, else CPU)."""
        self._device = pick_device(device)
        self.eval().to(self._device)
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Encoder":
        """Frozen encoders stay in eval mode (dropout off, norm statistics fixed) whatever their parent does."""
        return super().train(False)

    @property
    def layers(self) -> list[str]:
        return list(self.layer_dims)

    def check_layers(self, layers: Sequence[str]) -> None:
        unknown = [l for l in layers if l not in self.layer_dims]
        if unknown:
            raise ConfigError(f"encoder {self.spec}: unknown layer(s) {unknown}; available: {self.layers}")

    def width(self, layers: Sequence[str]) -> int:
        """Size of the concatenation of ``layers`` (what a projection of those layers takes)."""
        self.check_layers(layers)
        return sum(self.layer_dims[l] for l in layers)

    def collate(self, items: Sequence[Any]) -> Any:
        """Raw inputs -> one batch for ``forward`` (loads and stacks what needs loading)."""
        load = self.loader()
        if load is None:
            return [str(x) for x in items]
        return torch.stack([x if isinstance(x, torch.Tensor) else load(x) for x in items])

    @torch.inference_mode()
    def features(self, batch: Any, layers: Sequence[str] = (FINAL,)) -> torch.Tensor:
        """``forward`` on one collated batch, its ``layers`` concatenated in order as float32: the row
        format of the feature store and of every projection."""
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device, non_blocking=True)
        with autocast(self.device):
            out = self.forward(batch, list(layers))
        return torch.cat([out[l].float() for l in layers], dim=1)

    def encode(
        self,
        inputs: Sequence[Any],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = False,
        layers: Sequence[str] = (FINAL,),
    ) -> np.ndarray | torch.Tensor:
        """Raw encoder features of raw inputs (strings, image paths or PIL images, ...), batched:
        sentence-transformers' ``encode`` for one frozen encoder. Several ``layers`` are concatenated."""
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.check_layers(layers)
        items = list(inputs)
        show = show_progress_bar if show_progress_bar is not None else len(items) > 4 * batch_size
        chunks = [self.features(self.collate(items[s : s + batch_size]), layers).cpu()
                  for s in progress(range(0, len(items), batch_size), desc=f"encode {self.modality}", disable=not show)]
        emb = torch.cat(chunks) if chunks else torch.zeros(0, self.width(layers))
        if normalize_embeddings:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.numpy() if convert_to_numpy else emb

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, modality={self.modality}, dim={self.dim}"


@dataclass(frozen=True)
class ImageLoader:
    """Picklable ``path | PIL image -> tensor``: :func:`unialign.media.load_image`, then ``transform``."""

    transform: Callable[[Image.Image], torch.Tensor]

    def __call__(self, item: Any) -> torch.Tensor:
        from ..errors import DataError
        from ..media import load_image, to_rgb

        if isinstance(item, (str, bytes, os.PathLike)):
            img = load_image(item)
        elif isinstance(item, Image.Image):
            img = item if item.mode == "RGB" else to_rgb(item)
        else:
            raise DataError(f"an image input is a file path, bytes, a PIL image or a batch of preprocessed pixels; "
                            f"got a {type(item).__name__}")
        return self.transform(img)


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> normalised CHW float tensor, in plain PIL + numpy (torchvision is not a dependency).

    A frozen dataclass of numbers, so it pickles into DataLoader workers and compares by value.
    Steps: RGB; resize (shorter side to ``resize_shorter``, or exactly to ``resize_hw``); center crop
    to ``crop_hw``; scale to [0, 1]; subtract ``mean`` and divide by ``std`` per channel.
    ``resample`` is a PIL filter code (3 = bicubic, 2 = bilinear), as stored in HF processor configs.
    """

    crop_hw: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_shorter: int | None = None
    resize_hw: tuple[int, int] | None = None
    resample: int = 3
    rescale: float = 1.0 / 255.0

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            from ..media import to_rgb  # alpha onto white, the same rule as load_image

            img = to_rgb(img)
        if self.resize_hw is not None:
            h, w = self.resize_hw
            if img.size != (w, h):
                img = img.resize((w, h), resample=self.resample)
        elif self.resize_shorter is not None:
            w, h = img.size
            s = self.resize_shorter / min(w, h)
            size = (max(1, round(w * s)), max(1, round(h * s)))
            if size != img.size:
                img = img.resize(size, resample=self.resample)
        if self.crop_hw is not None:
            img = center_crop(img, self.crop_hw)
        arr = np.asarray(img, dtype=np.float32) * np.float32(self.rescale)
        arr = (arr - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the tensors it makes."""
        return self.crop_hw or self.resize_hw or (self.resize_shorter, self.resize_shorter)  # type: ignore[return-value]


def center_crop(img: Image.Image, hw: tuple[int, int]) -> Image.Image:
    """Center crop to (height, width); pads with black first if the image is smaller (torchvision's rule)."""
    th, tw = hw
    w, h = img.size
    if w < tw or h < th:
        canvas = Image.new("RGB", (max(w, tw), max(h, th)))
        canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        img, (w, h) = canvas, canvas.size
    left, top = int(round((w - tw) / 2.0)), int(round((h - th) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only: (B, T, D) with a (B, T) 0/1 mask -> (B, D). Padding never counts,
    so a text's embedding does not depend on what else is in its batch."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def weights_fingerprint(model: torch.nn.Module, extra: str = "", sample: int = 4096) -> str:
    """Cheap stable weights identity: sha256 (12 hex) over every parameter and buffer's name, shape,
    dtype and a strided sample of up to ``sample`` values (plus ``extra``, e.g. the config).

    Hashing whole weight files costs seconds for large models and depends on where and in which format
    they are stored; this costs milliseconds and is the same on any device and across runs, while any
    retrained or fine-tuned weights change (nearly) every value and hence the sample."""
    h = hashlib.sha256(extra.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        vals = flat[::step][:sample].to("cpu", torch.float64).numpy()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(vals.tobytes())
    return h.hexdigest()[:12]


__all__ = [
    "Encoder",
    "FINAL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoader",
    "ImageTransform",
    "MODALITIES",
    "center_crop",
    "masked_mean",
    "weights_fingerprint",
]
