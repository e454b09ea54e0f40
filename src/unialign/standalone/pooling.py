"""Pooled per-layer features of the backbones unialign wraps, from their raw forward outputs.

Standalone (imports only torch): unialign's encoders pool with these functions, and a
sentence-transformers export copies this file verbatim, so an exported folder pools exactly as
unialign does. Layer names are unialign's: ``"final"`` is the embedding the backbone is known for,
``"layerK"`` / ``"blockK"`` / ``"stem"`` intermediate outputs.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

FINAL = "final"
FINAL_NORMS = ("layernorm", "post_layernorm", "vision_model.post_layernorm", "norm")


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only: (B, T, D) with a (B, T) 0/1 mask -> (B, D). Padding never counts,
    so a text's embedding does not depend on what else is in its batch."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def layer_features(features: dict[str, Any], layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Named layers from a sentence-transformers forward pass: ``"final"`` is its ``sentence_embedding``,
    ``"layerK"`` the masked mean of hidden state K (``all_layer_embeddings``). Shared with the exported
    sentence-transformers module, so an export embeds exactly as the encoder did."""
    out: dict[str, torch.Tensor] = {}
    for key in layers:
        if key == FINAL:
            out[key] = features["sentence_embedding"].float()
        else:
            out[key] = masked_mean(features["all_layer_embeddings"][int(key[5:])], features["attention_mask"]).float()
    return out


def effnet_features(net: torch.nn.Module, pixels: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """An ``efficientnet_lite_pytorch`` EfficientNet's ``extract_features`` re-run step by step, so every
    requested block is spatially mean-pooled in one pass; blocks after the last requested one are skipped.
    ``"final"`` is the pooled output of the head conv + BN + ReLU6 (what the classifier reads)."""
    m = net
    want = set(layers)
    out: dict[str, torch.Tensor] = {}
    x = m._swish(m._bn0(m._conv_stem(pixels)))
    if "stem" in want:
        out["stem"] = x.mean((2, 3)).float()
    last = len(m._blocks) - 1 if FINAL in want else max(
        (int(k[5:]) for k in want if k.startswith("block")), default=-1)
    rate = m._global_params.drop_connect_rate
    for idx, block in enumerate(m._blocks[: last + 1]):
        x = block(x, drop_connect_rate=rate * idx / len(m._blocks) if rate else rate)  # inactive in eval
        if f"block{idx}" in want:
            out[f"block{idx}"] = x.mean((2, 3)).float()
    if FINAL in want:
        x = m._swish(m._bn1(m._conv_head(x)))
        out[FINAL] = x.mean((2, 3)).float()
    return {k: out[k] for k in layers}


def final_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    """The norm a ViT-family model applies to its last hidden state (``layernorm``, ``post_layernorm``,
    ...), or None: applied to every layer's tokens before pooling."""
    for path in FINAL_NORMS:
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.Module) and "Norm" in type(mod).__name__:
            return mod
    return None


def pool_tokens(hidden: torch.Tensor, norm: torch.nn.Module | None, pooling: str, prefix: int) -> torch.Tensor:
    """(B, T, D) tokens -> (B, D) or (B, 2D): the final ``norm``, then the class token (``cls``), the
    mean of the patch tokens after the ``prefix`` class/register/distillation tokens (``mean``), or
    both concatenated (``cls+mean``)."""
    if norm is not None:
        hidden = norm(hidden)
    parts = []
    if "cls" in pooling:
        parts.append(hidden[:, 0])
    if "mean" in pooling:
        parts.append(hidden[:, prefix:].mean(1))
    return torch.cat(parts, dim=-1).float()


def pool_hidden_states(hidden_states: Sequence[torch.Tensor], layers: Sequence[str], norm: torch.nn.Module | None,
                       pooling: str, prefix: int) -> dict[str, torch.Tensor]:
    """:func:`pool_tokens` of the requested hidden states (``"layerK"``; ``"final"`` is the last one)."""
    last = len(hidden_states) - 1
    return {k: pool_tokens(hidden_states[last if k == FINAL else int(k[5:])], norm, pooling, prefix) for k in layers}


__all__ = ["FINAL", "FINAL_NORMS", "effnet_features", "final_norm", "layer_features", "masked_mean",
           "pool_hidden_states", "pool_tokens"]
