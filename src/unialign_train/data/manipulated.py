"""Manipulated image-text pairs, made from real ones the way DGM4 (Shao et al., CVPR 2023) made its
dataset, with what was manipulated recorded: a consistency detector's training and test data.

Every record of a part (train / val / test of a protocol) gives its real pair (its image, its caption)
and one manipulated pair:

- ``attribute_swap`` (DGM4's text attribute manipulation) when the caption holds a colour word
  ("red heart"), a skin tone ("medium-dark skin tone") or a gendered word ("man", "girl", "princess"):
  that word is replaced by another of its kind ("blue heart"); the replaced word is the manipulated token;
- otherwise, at random (seeded), ``text_swap``: the caption of another concept, its words that the real
  caption does not hold manipulated ("*smiling* face with *heart-eyes*" for "kissing face with closed
  eyes"), or ``image_swap``: another concept's image in the same style, no word manipulated (DGM4's face
  swap is the image-side manipulation).

Partners come from the same part (held-out concepts stay held out) and preferably the same subcategory
(else category), so a swap is a near miss ("grinning face" for "beaming face with smiling eyes") rather
than an unrelated pair, as DGM4 retrieved semantically close captions. A swap of one genuine image for
another leaves no trace in the pixels, so text swaps and image swaps give pairs of the same kind (an
image of one concept, a caption of another); only the recorded words tell them apart.

Words are the caption split at white space (DGM4's ``fake_text_pos`` indexes them the same way).
Records carry ``manipulation``, ``fake``, ``fake_words``, ``source`` (the real record's id),
``image_concept`` and ``text_concept`` (the concept whose caption the text is; "" for an attribute swap
that names no concept of the dataset) and ``part``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from unialign.errors import DataError

from .records import Dataset

KINDS = ("real", "text_swap", "attribute_swap", "image_swap")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink", "grey")
SKIN_TONES = ("light", "medium-light", "medium", "medium-dark", "dark")  # only before "skin tone"
GENDERED = (("man", "woman", "person"), ("men", "women", "people"), ("boy", "girl"), ("male", "female"),
            ("prince", "princess"), ("mrs.", "mr."))
PUNCTUATION = ":,.;!?()\"'"


def attribute_slots(caption: str) -> list[tuple[int, list[str]]]:
    """(word index, replacements) of each colour, skin-tone or gendered word of a caption."""
    words = caption.split()
    slots = []
    for i, w in enumerate(words):
        core = w.strip(PUNCTUATION).lower()
        after = words[i + 1].lower() if i + 1 < len(words) else ""
        if core in COLOURS:
            slots.append((i, [c for c in COLOURS if c != core]))
        elif core in SKIN_TONES and after == "skin":
            slots.append((i, [t for t in SKIN_TONES if t != core]))
        else:
            for group in GENDERED:
                if core in group:
                    slots.append((i, [g for g in group if g != core]))
    return slots


def swap_attribute(caption: str, rng: np.random.Generator) -> tuple[str, list[int]] | None:
    """The caption with one attribute word replaced (keeping its punctuation and capitalisation of the
    first letter), and that word's index; None when it has no attribute word."""
    slots = attribute_slots(caption)
    if not slots:
        return None
    i, options = slots[int(rng.integers(len(slots)))]
    words = caption.split()
    old = words[i]
    core = old.strip(PUNCTUATION)
    new = str(rng.choice(options))
    if core[:1].isupper():
        new = new[:1].upper() + new[1:]
    start = old.find(core)
    words[i] = old[:start] + new + old[start + len(core):]
    return " ".join(words), [i]


def new_words(original: str, swapped: str) -> list[int]:
    """Indices of the words of ``swapped`` that ``original`` does not hold (punctuation and case aside):
    the words a text swap made false ("face" stays true of a face); all of them if none differ."""
    have = {w.strip(PUNCTUATION).lower() for w in original.split()}
    words = swapped.split()
    differ = [i for i, w in enumerate(words) if w.strip(PUNCTUATION).lower() not in have]
    return differ or list(range(len(words)))


def build_manipulated(ds: Dataset, parts: Mapping[str, Sequence[int]], seed: int = 0,
                      caption: str = "label") -> Dataset:
    """A real and a manipulated pair per record of each part (see the module doc); ``caption`` is the
    record field that holds the pair's text (the emoji label: "red heart", "man technologist")."""
    rng = np.random.default_rng(seed)
    label_concept = {str(r[caption]).strip(): r["concept"] for r in ds.records}
    records: list[dict[str, Any]] = []
    counts = {k: 0 for k in KINDS}
    for part, idx in parts.items():
        idx = [int(i) for i in idx]
        if not idx:
            continue
        index = _PartIndex(ds, idx)
        for i in idx:
            r = ds.records[i]
            text = str(r[caption]).strip()
            if not r.get("image") or not text:
                continue
            out = [_pair(r, part, "real", r["image"], text, [], r["concept"], r["concept"])]
            swapped = swap_attribute(text, rng)
            if swapped is not None:
                new, words = swapped
                out.append(_pair(r, part, "attribute_swap", r["image"], new, words, r["concept"], label_concept.get(new, "")))
            else:
                kind = "text_swap" if rng.random() < 0.5 else "image_swap"
                j = index.partner(i, rng, same_style=kind == "image_swap")
                if j is None and kind == "image_swap":  # no other concept drawn in this style: swap the text
                    kind, j = "text_swap", index.partner(i, rng, same_style=False)
                if j is not None:
                    p = ds.records[j]
                    if kind == "text_swap":
                        other = str(p[caption]).strip()
                        out.append(_pair(r, part, kind, r["image"], other, new_words(text, other), r["concept"],
                                         p["concept"]))
                    else:
                        out.append(_pair(r, part, kind, p["image"], text, [], p["concept"], r["concept"]))
            for rec in out:
                counts[rec["manipulation"]] += 1
            records.extend(out)
    if not records:
        raise DataError(f"no pairs could be made from {ds.name}: records need an image and a {caption!r}")
    meta = {"source": ds.name, "seed": seed, "caption": caption, "counts": counts, "protocol": ds.meta.get("protocol")}
    return Dataset(f"{ds.name}-manipulated", records, ds.root, None, meta)


def _pair(r: Mapping[str, Any], part: str, kind: str, image: str, text: str, words: list[int], image_concept: str,
          text_concept: str) -> dict[str, Any]:
    return {"id": f"{r['id']}/{kind}", "concept": r["concept"], "label": r["label"], "style": r["style"],
            "image": image, "text": [text], "manipulation": kind, "fake": kind != "real", "fake_words": words,
            "source": r["id"], "image_concept": image_concept, "text_concept": text_concept, "part": part}


class _PartIndex:
    """Partners within one part: records by (concept, style), concepts by subcategory and category."""

    def __init__(self, ds: Dataset, idx: Sequence[int]):
        self.ds = ds
        self.at = {(ds.records[i]["concept"], ds.records[i]["style"]): i for i in idx}
        self.groups: dict[tuple[str, str], list[int]] = {}
        for i in idx:
            r = ds.records[i]
            for key in ("subcategory", "category"):
                self.groups.setdefault((key, str(r.get(key) or "")), []).append(i)
        self.all = list(idx)

    def partner(self, i: int, rng: np.random.Generator, same_style: bool) -> int | None:
        """A record of another concept (with another label), from the same subcategory if any, else the
        same category, else anywhere in the part; in ``i``'s style when ``same_style``."""
        r = self.ds.records[i]
        for key in ("subcategory", "category", None):
            pool = self.groups.get((key, str(r.get(key) or "")), []) if key else self.all
            if key and not r.get(key):
                continue
            ok = [j for j in pool if self.ds.records[j]["concept"] != r["concept"]
                  and self.ds.records[j]["label"] != r["label"]
                  and (not same_style or self.ds.records[j]["style"] == r["style"])]
            if ok:
                return int(ok[int(rng.integers(len(ok)))])
        return None


__all__ = ["COLOURS", "GENDERED", "KINDS", "SKIN_TONES", "attribute_slots", "build_manipulated", "new_words", "swap_attribute"]
