"""Zero-shot classification: prompt templates and the one template-ensemble classifier.

CLIP's recipe (open_clip's ``build_zero_shot_classifier``): every class name is put through every
template, the prompts are embedded, each embedding is L2-normalised, a class's embeddings are averaged
and the average is renormalised. Every part of unialign that turns class names into class vectors
(the model's ``classify``, early-stopping validation, evaluation, the report, the server, curation's
concept prototypes) calls :func:`zero_shot_classifier`. Templates were chosen on validation concepts.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

EMOJI = ["an emoji of {}.", "{}", "an icon of {}.", "a {} emoji."]

PHOTO = [
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a product photo of a {}.",
]

# audio: instrument sounds (a General-MIDI name such as "acoustic grand piano") and spoken items
SOUND = ["the sound of a {}.", "{}", "a {} playing a note.", "music played on a {}."]
SPEECH = ["{}", "someone saying {}.", "a recording of a person saying {}."]

TEMPLATES: dict[str, list[str]] = {"emoji": EMOJI, "photo": PHOTO, "plain": ["{}"], "sound": SOUND, "speech": SPEECH}


def get_templates(name_or_list: str | Sequence[str]) -> list[str]:
    """A named set, or a list of format strings each holding one ``{}``."""
    if isinstance(name_or_list, str):
        if name_or_list not in TEMPLATES:
            raise ValueError(f"unknown template set {name_or_list!r}; choose one of {sorted(TEMPLATES)} or give a list")
        return list(TEMPLATES[name_or_list])
    temps = list(name_or_list)
    bad = [t for t in temps if not isinstance(t, str) or t.count("{}") != 1]
    if bad or not temps:
        raise ValueError(f"templates must each contain exactly one '{{}}'; bad: {bad or '(empty list)'}")
    return temps


def zero_shot_classifier(encode: Callable[[list[str]], Any], classnames: Sequence[str],
                         templates: str | Sequence[str] = "plain") -> torch.Tensor:
    """(classes, d) unit class vectors: the renormalised mean of each class's normalised prompt embeddings.

    ``encode(prompts) -> (len(prompts), d)`` embeds a list of strings (numpy or torch): the aligned
    model's text side, or a raw text encoder when prototypes live in the encoder's own space.
    """
    names = [str(c) for c in classnames]
    if not names:
        raise ValueError("a zero-shot classifier needs at least one class name")
    temps = get_templates(templates)
    prompts = [t.format(c) for c in names for t in temps]
    emb = encode(prompts)
    emb = torch.as_tensor(np.asarray(emb) if not isinstance(emb, torch.Tensor) else emb).float().cpu()
    return F.normalize(F.normalize(emb.view(len(names), len(temps), -1), dim=-1).mean(1), dim=-1)


__all__ = ["EMOJI", "PHOTO", "SOUND", "SPEECH", "TEMPLATES", "get_templates", "zero_shot_classifier"]
