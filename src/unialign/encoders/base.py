"""One small interface for every frozen encoder, image or text.

An encoder turns a batch into a dict of pooled feature tensors: ``"final"`` is the embedding the
encoder is known for; other keys (``"layer3"``, ``"block7"``) are per-layer pooled outputs, returned
only when asked for, so that layer selection and layer mixing can read them from the store.

Image encoders split the work in two on purpose: :meth:`Encoder.preprocess` (PIL image -> tensor) is a
plain picklable callable that runs in DataLoader worker processes, and :meth:`Encoder.forward` runs
the model on stacked tensors in the main process, so decoding never stalls the model.
"""
from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..device import autocast, pick_device

Modality = Literal["image", "text"]
FINAL = "final"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(ABC):
    """Frozen encoder. Subclasses set ``spec``, ``modality``, ``dim``, ``layer_dims`` and ``version``."""

    spec: str  # the string that names it, e.g. "effnet-lite0", "st:all-MiniLM-L6-v2", "hf:/path"
    modality: Modality
    dim: int  # size of the "final" output
    version: str  # weights identity (file hash or package version); recorded in stores and models
    layer_dims: dict[str, int]  # every key forward() can return, including "final"
    device: torch.device

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def forward(self, batch: Any, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """Pooled features for a batch: stacked image tensors (image) or a list of strings (text).
        Returns float tensors of shape (batch, layer_dims[k]) for each requested key."""

    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """Picklable callable PIL.Image -> CHW float tensor (image encoders only)."""
        raise NotImplementedError(f"{self.spec} is a {self.modality} encoder and takes no images")

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder with :func:`unialign.encoders.load_encoder`."""
        return {"spec": self.spec, "modality": self.modality, "dim": self.dim, "version": self.version}

    # -- shared -------------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        return list(self.layer_dims)

    def check_layers(self, layers: Sequence[str]) -> None:
        unknown = [l for l in layers if l not in self.layer_dims]
        if unknown:
            from ..errors import ConfigError

            raise ConfigError(f"encoder {self.spec}: unknown layer(s) {unknown}; available: {self.layers}")

    @torch.inference_mode()
    def encode(
        self,
        inputs: Sequence[Any],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = False,
        layers: Sequence[str] = (FINAL,),
    ) -> np.ndarray | torch.Tensor:
        """sentence-transformers-style convenience: strings (text) or PIL images / paths (image).

        Several ``layers`` are concatenated along the feature axis in the given order (what a head
        trained on those layers of the feature store expects); normalisation applies to the result.
        """
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.check_layers(layers)
        from ..data.base import load_image

        prep = self.preprocess() if self.modality == "image" else None
        chunks = []
        starts = range(0, len(inputs), batch_size)
        show = show_progress_bar if show_progress_bar is not None else len(inputs) > 4 * batch_size
        for s in tqdm(starts, disable=not show, desc=f"encode {self.modality}"):
            items = list(inputs[s : s + batch_size])
            if prep is not None:
                imgs = [load_image(x) if isinstance(x, (str, bytes)) or hasattr(x, "__fspath__") else x for x in items]
                batch = torch.stack([x if isinstance(x, torch.Tensor) else prep(x) for x in imgs])
            else:
                batch = [str(x) for x in items]
            with autocast(self.device):
                out = self.forward(batch, layers)
            chunks.append(torch.cat([out[l].float().cpu() for l in layers], dim=1))
        dim = sum(self.layer_dims[l] for l in layers)
        emb = torch.cat(chunks) if chunks else torch.zeros(0, dim)
        if normalize_embeddings:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.numpy() if convert_to_numpy else emb

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, modality={self.modality}, dim={self.dim}, device={self.device})"


def set_eval(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Freeze a module: eval mode, no grads, moved to device."""
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
            from ..data.base import to_rgb  # alpha onto white, the same rule as load_image

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
    "ImageTransform",
    "Modality",
    "center_crop",
    "masked_mean",
    "pick_device",
    "set_eval",
    "weights_fingerprint",
]
