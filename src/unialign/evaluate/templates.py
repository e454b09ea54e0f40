"""Prompt templates for zero-shot classification. Chosen on validation concepts only."""
from __future__ import annotations

EMOJI = ["an emoji of {}.", "{}", "an icon of {}.", "a {} emoji."]

PHOTO = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a product photo of a {}.",
]

TEMPLATES: dict[str, list[str]] = {"emoji": EMOJI, "photo": PHOTO, "plain": ["{}"]}


def get_templates(name_or_list: str | list[str]) -> list[str]:
    """A named set, or a list of format strings each holding one ``{}``."""
    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATES:
            raise ValueError(f"unknown template set {name_or_list!r}; choose one of {sorted(TEMPLATES)} or give a list")
        return list(TEMPLATES[name_or_list])
    bad = [t for t in name_or_list if t.count("{}") != 1]
    if bad or not name_or_list:
        raise ValueError(f"templates must each contain exactly one '{{}}'; bad: {bad or '(empty list)'}")
    return list(name_or_list)
