"""Reading media files into what encoders take: images (and, for other modalities, their loaders).

One loader per modality, shared by feature extraction, the model's ``encode`` and the server, so an
image is decoded the same way everywhere: EXIF rotation applied, transparency composited on white,
any PIL mode turned into 8-bit RGB, and every unreadable file reported by path with the reason.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from .errors import ImageLoadError
from .standalone.imaging import to_rgb  # shipped with sentence-transformers exports, hence standalone

# Pillow's decompression-bomb guard, made an error instead of a warning: 8192 x 8192 is far above
# anything an encoder looks at, far below what exhausts memory.
MAX_IMAGE_PIXELS = 8192 * 8192


def open_source(source: str | os.PathLike | bytes, name: str | None, error: type[Exception],
                what: str) -> tuple[str, Any]:
    """``(where, file)`` of a path or of an upload's bytes, after the checks every media loader makes
    first: a missing path, a directory, zero bytes; each raised as ``error(where, reason)``."""
    if isinstance(source, (bytes, bytearray)):
        where = name or "upload"
        if not source:
            raise error(where, "file is empty (0 bytes)")
        return where, io.BytesIO(source)
    p = Path(source)
    where = str(p)
    if not p.exists():
        raise error(where, "file does not exist")
    if p.is_dir():
        raise error(where, f"is a directory, not {what}")
    if p.stat().st_size == 0:
        raise error(where, "file is empty (0 bytes)")
    return where, p


def load_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """Open an image (a path, or the bytes of an uploaded file) as RGB, applying EXIF rotation and
    compositing alpha on white.

    Raises :class:`ImageLoadError` naming the file (``name`` for bytes) for anything that is not a
    readable image: missing, zero bytes, truncated, a directory, a text file; ``too_large`` is set on
    the error when the image has more than ``max_pixels`` pixels (decompression bombs included).
    """
    where, fh = open_source(source, name, ImageLoadError, "an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = max(MAX_IMAGE_PIXELS, max_pixels)
            with Image.open(fh) as im:
                if im.width * im.height > max_pixels:
                    raise ImageLoadError(where, f"image too large ({im.width}x{im.height} = {im.width * im.height} "
                                                f"pixels; the limit is {max_pixels})", too_large=True)
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(where, f"image too large (decompression bomb guard): {e}", too_large=True) from None
    except Exception as e:  # PIL raises many types for bad files; all mean "not a readable image"
        raise ImageLoadError(where, f"not a readable image ({type(e).__name__}: {e})") from None


__all__ = ["MAX_IMAGE_PIXELS", "load_image", "to_rgb"]
