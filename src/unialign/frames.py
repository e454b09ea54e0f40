"""Reading a video as a fixed number of RGB frames: animated WebP / GIF / APNG files, or a folder of frames.

Video encoders look at a clip through a frozen image encoder, so a clip becomes ``frames`` still images,
decoded the way :func:`unialign.media.load_image` decodes any image (transparency composited on white,
any PIL mode turned into 8-bit RGB, the same pixel limit) and reported by path with the reason when
unreadable. It runs in the feature-extraction DataLoader workers (through the video encoder's loader).

Which frames: ``frames`` indices spread evenly over the whole clip, first and last included
(``round(linspace(0, n - 1, frames))``, ties rounded away from the clip's middle). The choice is
symmetric in time: the frames sampled from a clip played backwards are the frames sampled from the
clip, reversed (unless an odd number of frames is taken from a clip of even length: the middle sample
then falls between two frames), which is what lets a test show that frame averaging cannot tell a clip
from its reverse. A clip shorter than ``frames`` repeats frames; a still image is a clip of one frame.

A folder of frames is read in natural name order (``frame2.png`` before ``frame10.png``), every image
file in it counting as one frame.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .errors import ImageLoadError
from .media import MAX_IMAGE_PIXELS, load_image
from .standalone.imaging import to_rgb

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class VideoLoadError(ImageLoadError):
    """One clip could not be read; ``path`` names it (the file or folder), ``reason`` says why."""


def sample_indices(n: int, frames: int) -> list[int]:
    """``frames`` frame indices spread evenly over ``n`` frames, first and last included."""
    if n < 1 or frames < 1:
        raise ValueError(f"need n >= 1 and frames >= 1, got n={n}, frames={frames}")
    if frames == 1:
        return [(n - 1) // 2]
    x = np.linspace(0, n - 1, frames)
    # ties round away from the middle of the clip, so the sampling is exactly symmetric in time
    return [int(i) for i in np.where(x <= (n - 1) / 2, np.floor(x + 0.5), np.ceil(x - 0.5))]


def load_frames(source: str | os.PathLike, frames: int, max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """``frames`` RGB frames of a clip (see the module doc for which), in time order.

    Raises :class:`VideoLoadError` naming the clip for anything unreadable: missing, empty (0 bytes or
    a folder with no image in it), truncated or corrupt at any sampled frame, frames too large."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    p = Path(source)
    if p.is_dir():
        files = _frame_files(p)
        if not files:
            raise VideoLoadError(str(p), f"folder holds no frames (image files: {', '.join(FRAME_SUFFIXES)})")
        try:
            return [load_image(files[i], max_pixels) for i in sample_indices(len(files), frames)]
        except ImageLoadError as e:
            raise VideoLoadError(str(p), f"frame {Path(e.path).name}: {e.reason}", e.too_large) from None
    return _file_frames(p, frames, max_pixels)


def _file_frames(p: Path, frames: int, max_pixels: int) -> list[Image.Image]:
    where = str(p)
    if not p.exists():
        raise VideoLoadError(where, "file does not exist")
    if p.stat().st_size == 0:
        raise VideoLoadError(where, "file is empty (0 bytes)")
    at = -1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > max_pixels:
                    raise VideoLoadError(where, f"frames too large ({im.width}x{im.height} pixels; the limit is "
                                                f"{max_pixels})", too_large=True)
                n = int(getattr(im, "n_frames", 1))
                out: dict[int, Image.Image] = {}
                for at in sorted(set(sample_indices(n, frames))):  # forward seeks: animated formats decode in order
                    im.seek(at)
                    im.load()
                    out[at] = to_rgb(im)  # a copy: alpha on white, 8-bit RGB
                return [out[i] for i in sample_indices(n, frames)]
    except VideoLoadError:
        raise
    except Exception as e:  # PIL raises many types for bad files; all mean "not a readable clip"
        frame = f" at frame {at}" if at > 0 else ""
        raise VideoLoadError(where, f"not a readable video{frame} ({type(e).__name__}: {e})") from None


def _frame_files(folder: Path) -> list[Path]:
    files = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FRAME_SUFFIXES]
    return sorted(files, key=lambda f: _natural_key(f.name))


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def save_clip(frames: Sequence[Image.Image], path: str | os.PathLike, duration_ms: int = 80) -> Path:
    """Write frames as a lossless animated WebP (what the dataset builders render), atomically."""
    from .io import atomic_path

    if not frames:
        raise ValueError("a clip needs at least one frame")
    path = Path(path)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="WEBP", save_all=True, append_images=list(frames[1:]), lossless=True,
                       duration=duration_ms, loop=0)
    return path


__all__ = ["FRAME_SUFFIXES", "VideoLoadError", "load_frames", "sample_indices", "save_clip"]
