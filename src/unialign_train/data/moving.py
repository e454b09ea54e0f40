"""Moving-object clips rendered from the project's emoji: text that is only right if time is read.

The usual way moving-object benchmarks are built (Moving MNIST, CATER, the "something-something"
direction pairs): a known object moves across a plain canvas in a described way, and the caption names
both the object and the motion: ``"a running shoe moving left"``. Six motions come in three pairs that
are each other's time reverse (left/right, up/down, growing/shrinking); a clip's reverse partner is
rendered along the very same path, played backwards. So a model that averages its frames sees the
same picture for "moving left" and "moving right" and must fail on the pair: the benchmark of
order-aware video features.

Objects are emoji concepts of the things categories (animals, food, travel, activities, objects; no
faces, flags or symbols), drawn in one vendor style of the emoji set (default ``google``, Noto's
Apache-2.0 art), a seeded draw of ``n_objects``. Splits hold out objects (concepts): the motion words
are seen in training, the test objects never.

Layout under the output folder (default ``datasets_dir()/"moving-emoji"``)::

    clips/<code>_<motion>.webp       lossless animated WebP, ``frames`` frames of ``canvas`` px
    records.parquet, dataset.json    the saved Dataset (style = the motion)

Clips are written atomically and the dataset last, so an interrupted build resumes where it stopped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unialign import paths
from unialign.errors import ConfigError, DataError
from unialign.frames import save_clip
from unialign.progress import progress

from .emoji import build_emoji
from .records import Dataset

# motion -> caption phrase; consecutive pairs are each other's time reverse
MOTIONS: dict[str, str] = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                           "growing": "growing bigger", "shrinking": "shrinking"}
REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up", "growing": "shrinking", "shrinking": "growing"}
THINGS = ("Animals & Nature", "Food & Drink", "Travel & Places", "Activities", "Objects")
FORMAT = 1


def build_moving(n_objects: int = 120, frames: int = 15, canvas: int = 96, object_size: int = 40,
                 style: str = "google", seed: int = 0, root: str | os.PathLike | None = None,
                 force: bool = False) -> Dataset:
    """Build (or load, when built with the same settings) the moving-emoji clips: one record per
    (object, motion), ``id`` ``"<code>/<motion>"``, ``style`` the motion, ``text`` one caption."""
    settings = {"n_objects": n_objects, "frames": frames, "canvas": canvas, "object_size": object_size,
                "style": style, "seed": seed, "format": FORMAT}
    _check(settings)
    out = Path(root) if root is not None else paths.datasets_dir() / "moving-emoji"
    if not force and (out / "dataset.json").exists():
        ds = Dataset.load(out)
        if ds.meta.get("settings") == settings:
            return ds
    emoji = build_emoji()
    if style not in emoji.meta.get("styles", []):
        raise ConfigError(f"moving clips: style {style!r} is not in the emoji set (it has {emoji.meta.get('styles')})")
    objects = pick_objects(emoji, style, n_objects, seed)
    records = []
    for i in progress(objects, desc="render moving clips", unit="object", disable=len(objects) < 20):
        r = emoji.records[i]
        sprite = Image.open(emoji.path(i)).convert("RGBA")
        rng = np.random.default_rng([seed, int(r["concept"].split("-")[0], 16)])
        for motion, clip in render_motions(sprite, frames, canvas, object_size, rng).items():
            rel = f"clips/{r['concept']}_{motion}.webp"
            if force or not (out / rel).exists():
                save_clip(clip, out / rel)
            records.append({"id": f"{r['concept']}/{motion}", "concept": r["concept"], "label": r["label"],
                            "style": motion, "video": rel, "text": [f"a {r['label']} {MOTIONS[motion]}"],
                            "motion": motion, "category": r["category"]})
    meta = {"settings": settings, "motions": list(MOTIONS), "reverse": REVERSE, "protocol": {},
            "source": f"emoji style {style}"}
    Dataset("moving-emoji", records, Path("."), None, meta).save(out)
    return Dataset.load(out)


def pick_objects(emoji: Dataset, style: str, n: int, seed: int) -> list[int]:
    """Record indices of ``n`` emoji of things (seeded draw, in dataset order) drawn in ``style``."""
    pool = [i for i, r in enumerate(emoji.records) if r["style"] == style and r.get("category") in THINGS]
    if len(pool) < n:
        raise DataError(f"moving clips: only {len(pool)} emoji of things in style {style}; asked for {n}")
    return sorted(np.random.default_rng(seed).choice(pool, size=n, replace=False).tolist())


def render_motions(sprite: Image.Image, frames: int, canvas: int, size: int, rng: np.random.Generator
                   ) -> dict[str, list[Image.Image]]:
    """The six clips of one object. Each reverse pair shares one random path (an offset across the
    motion, the extent along it): the second clip is the first played backwards."""
    lo, hi = size / 2, canvas - size / 2
    t = np.linspace(0.0, 1.0, frames)
    across = rng.uniform(lo, hi, size=2)  # the row of the horizontal path, the column of the vertical one
    start, end = lo + rng.uniform(0, 0.15) * (hi - lo), hi - rng.uniform(0, 0.15) * (hi - lo)
    path = start + (end - start) * t  # increasing coordinate over time
    centre = rng.uniform(canvas * 0.4, canvas * 0.6, size=2)
    scale = np.linspace(0.35, 1.0, frames)
    clips = {
        "right": [_place(sprite, canvas, size, (x, across[0])) for x in path],
        "down": [_place(sprite, canvas, size, (across[1], y)) for y in path],
        "growing": [_place(sprite, canvas, max(2, int(round(size * s))), tuple(centre)) for s in scale],
    }
    clips["left"], clips["up"], clips["shrinking"] = clips["right"][::-1], clips["down"][::-1], clips["growing"][::-1]
    return {m: clips[m] for m in MOTIONS}


def _place(sprite: Image.Image, canvas: int, size: int, centre: tuple[float, float]) -> Image.Image:
    """The sprite resized to ``size`` px, alpha-composited on a white canvas at ``centre`` (x, y)."""
    im = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    s = sprite.resize((size, size), Image.Resampling.LANCZOS)
    im.paste(s, (int(round(centre[0] - size / 2)), int(round(centre[1] - size / 2))), s)
    return im


def _check(s: dict[str, Any]) -> None:
    for k in ("n_objects", "frames", "canvas", "object_size"):
        if not isinstance(s[k], int) or s[k] < 1:
            raise ConfigError(f"moving clips: {k} must be a positive integer, got {s[k]!r}")
    if s["frames"] < 2:
        raise ConfigError("moving clips: frames must be at least 2 (a motion needs two)")
    if s["object_size"] >= s["canvas"]:
        raise ConfigError(f"moving clips: object_size {s['object_size']} must be smaller than canvas {s['canvas']}")


def reverse_pairs(records: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """(i, j) record index pairs of one object's clip and its time reverse (each pair once)."""
    at = {(r["concept"], r["motion"]): i for i, r in enumerate(records)}
    return [(i, at[(r["concept"], REVERSE[r["motion"]])]) for i, r in enumerate(records)
            if r["motion"] < REVERSE[r["motion"]] and (r["concept"], REVERSE[r["motion"]]) in at]


__all__ = ["MOTIONS", "REVERSE", "build_moving", "pick_objects", "render_motions", "reverse_pairs"]
