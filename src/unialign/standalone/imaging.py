"""Images into what an image encoder takes: any PIL mode to RGB, resize, center crop, normalise.

Standalone (imports only numpy, torch and PIL): unialign's encoders and image loader use it, and a
sentence-transformers export copies this file verbatim, so an exported folder preprocesses pixels
exactly as unialign does, without unialign installed.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode (P, PA, LA, RGBA, CMYK, I;16, I, F, L, 1) to 8-bit RGB; transparency becomes white.

    High-bit-depth images are scaled by their type's full range (16-bit: 65535, float: 1.0), not by
    the image's own maximum, so a dark 16-bit photo stays dark instead of being stretched to white.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if arr.size == 0 or arr.max() <= 1.0 else 255.0
        elif im.mode == "I" and arr.size and arr.max() > 65535:
            top = float(arr.max())
        else:
            top = 65535.0
        im = Image.fromarray((arr / top * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "PA", "LA", "RGBa") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file as RGB with its EXIF rotation applied (unialign's ``load_image`` adds the
    checks and error messages around this)."""
    with Image.open(path) as im:
        im.load()
        return to_rgb(ImageOps.exif_transpose(im))


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
            img = to_rgb(img)  # alpha onto white, the same rule as unialign's load_image
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

    def config(self) -> dict[str, Any]:
        """Its fields as JSON-ready values; ``ImageTransform.from_config(t.config()) == t``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ImageTransform":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


__all__ = ["ImageTransform", "center_crop", "open_image", "to_rgb"]
