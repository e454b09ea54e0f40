"""Encoder-agnostic layer names for configs: ``last-N`` means the N deepest layers of whatever encoder
runs (the embedding ``final`` included), so one config works for EfficientNet (``block13, block14,
block15, final``), MiniLM (``layer4, layer5, final``) or any other encoder. ``shallow-N`` means N layers
evenly spaced over the shallower half of the encoder, from the shallowest, meant to carry the low-level
statistics the deep layers have pooled away (EfficientNet-Lite0: ``stem, block2, block5``).

``auto`` (in ``layers`` of the main job) asks the job to choose among the candidate sets
:data:`AUTO_SETS` on validation (:mod:`unialign_train.choose`); :func:`auto_sets` resolves them for one
encoder and :func:`auto_candidates` names the layers it extracts for that.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from unialign.encoders.base import FINAL
from unialign.errors import ConfigError

AUTO = "auto"
_LAST = re.compile(r"^last-(\d+)$")
_SHALLOW = re.compile(r"^shallow-(\d+)$")
# The sets ``auto`` compares: nested deep sets, and last-4 / last-8 with the shallow layers the default adds.
AUTO_SETS = ("last-1", "last-2", "last-3", "last-4", "last-6", "last-8", "last-4,shallow-3", "last-8,shallow-3")


def depth_order(encoder: Any) -> list[str]:
    """The encoder's layers shallow to deep (its own listing order), the embedding ``final`` last."""
    names = list(encoder.layer_dims)
    return [n for n in names if n != FINAL] + ([FINAL] if FINAL in names else [])


def shallow_layers(order: Sequence[str], n: int) -> list[str]:
    """``n`` layers evenly spaced over the shallower half of ``order`` (shallow to deep), the shallowest
    first: positions ``i * len(half) // n``. All of the half when it has fewer than ``n`` layers."""
    half = list(order[: max(1, len(order) // 2)])
    k = min(n, len(half))
    return [half[i * len(half) // k] for i in range(k)]


def resolve_layer_names(encoder: Any, names: str | Sequence[str]) -> list[str]:
    """Concrete layers of ``encoder`` for config names, deepest last, without repeats.

    Each name is a layer of the encoder, ``last-N`` (the N deepest, ``final`` included; all of them
    when the encoder has fewer, so ``last-8`` works for a two-layer encoder too) or ``shallow-N``
    (:func:`shallow_layers`). A comma-separated string is a list. ``auto`` is not resolved here: the main
    job chooses it (see the module doc).
    """
    items = [s.strip() for s in names.split(",")] if isinstance(names, str) else [str(s) for s in names]
    order = depth_order(encoder)
    out: list[str] = []
    for name in (s for s in items if s):
        last, shallow = _LAST.match(name), _SHALLOW.match(name)
        if name == AUTO:
            raise ConfigError(f"layers: {AUTO!r} is chosen by the main job on validation; it cannot be combined "
                              f"with other names (got {items})")
        if last or shallow:
            n = int((last or shallow).group(1))
            if n < 1:
                raise ConfigError(f"layers: {name} asks for no layer; say {name.split('-')[0]}-1 or more")
            out += order[-n:] if last else shallow_layers(order, n)
        elif name in encoder.layer_dims:
            out.append(name)
        else:
            raise ConfigError(f"layers: {name!r} is not a layer of {encoder.spec}; it has {', '.join(order)} "
                              "(or say last-N for the N deepest, shallow-N for N spread over the shallower half)")
    if not out:
        raise ConfigError("layers: give at least one layer name, e.g. [final] or [last-4]")
    rank = {n: i for i, n in enumerate(order)}
    return sorted(dict.fromkeys(out), key=rank.__getitem__)


def auto_sets(encoder: Any) -> dict[str, list[str]]:
    """The candidate sets of ``auto`` (:data:`AUTO_SETS`) as ``encoder``'s layers, by name; a set whose layers
    equal an earlier one's is left out (on a two-layer encoder every ``last-N`` with N >= 2 is the same set),
    so no set is fitted twice."""
    out: dict[str, list[str]] = {}
    for spec in AUTO_SETS:
        names = resolve_layer_names(encoder, spec)
        if names not in out.values():
            out[spec] = names
    return out


def auto_candidates(encoder: Any) -> list[str]:
    """The layers ``auto`` extracts (one store): ``final`` first, then every other layer of
    :func:`auto_sets` shallow to deep. Every candidate set is read from this store."""
    used = {n for names in auto_sets(encoder).values() for n in names}
    return [FINAL] + [n for n in depth_order(encoder) if n in used and n != FINAL]


__all__ = ["AUTO", "AUTO_SETS", "auto_candidates", "auto_sets", "depth_order", "resolve_layer_names", "shallow_layers"]
