"""Fusion modules: interchangeable heads that predict a target from two or more frozen encoders.

Every module maps a :class:`Batch` (pooled features and/or token sequences per modality, and which
modalities each record has) to outputs (B, n_out). A record may lack a modality (a record without
audio, a caption dropped): pooled modules leave it out (late fusion averages the heads it has) or see
zeros plus a presence flag (concat-MLP); token modules give it one learned "null" token in that
modality's stream, so attention always has something to attend to. Training drops modalities at random
(``modality_dropout``) so those paths are learned, not guessed.

- :class:`LateFusion`: one MLP head per modality on its pooled features, logits averaged over the
  modalities a record has. Each head alone is the unimodal baseline.
- :class:`ConcatMLP`: one MLP on the concatenated standardised pooled features.
Token modules standardise each token layer with statistics of the training tokens (frozen, as the pooled
heads do) before their own LayerNorms.

- :class:`ManagerFusion` (ManagerTower): a small co-attention cross-modal encoder whose every layer
  takes, per modality, a *manager*'s learned softmax mix of several unimodal layers (each LayerNorm'd
  and mapped to the fusion width; :class:`~unialign.projections.LayerMixHead` applied token by token),
  from the second layer on with the previous cross-modal output as one more expert.
- :class:`BridgeFusion` (BridgeTower): the same encoder, its input the layer below the top ``k``
  unimodal layers, and before cross-modal layer l a *bridge* ``Z = LayerNorm(Z + W_l X_l)`` adds
  unimodal layer l of the top k.
- :class:`LegoBlock`, :class:`LegoMerge`, :class:`LegoFuse` (MM-Lego): per modality a learnable latent
  array cross-attends to the encoder's tokens in the frequency domain; blocks trained alone on the task
  are merged with no multimodal training, or stacked and fine-tuned briefly.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unialign.projections import LayerMixHead, Standardize, Tower, make_head

from .tokens import TokenBatch


@dataclass
class Batch:
    """What a fusion module reads for B records: ``pooled[m]`` (B, D_m) features, ``tokens[m]`` the
    record's tokens (only for modules that use tokens), ``present[m]`` (B,) which records have modality m."""

    pooled: dict[str, torch.Tensor]
    tokens: dict[str, TokenBatch]
    present: dict[str, torch.Tensor]

    def to(self, device: torch.device) -> "Batch":
        tok = {m: TokenBatch([x.to(device) for x in t.layers], t.mask.to(device), t.words.to(device))
               for m, t in self.tokens.items()}
        return Batch({m: x.to(device) for m, x in self.pooled.items()}, tok,
                     {m: p.to(device) for m, p in self.present.items()})


class FusionModule(nn.Module):
    """Base of the fusion modules: what inputs a module reads, and its loss on a batch.

    ``uses_tokens``: the batch must carry token sequences. ``fixed_length``: sequences are padded to a
    fixed length per modality (a Fourier transform over positions needs one), not to the batch's longest.
    """

    uses_tokens = False
    fixed_length = False

    def __init__(self, modalities: Sequence[str]):
        super().__init__()
        self.modalities = list(modalities)

    def loss(self, batch: Batch, y: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
        return criterion(self(batch), y)

    def standardizers(self) -> dict[str, Standardize]:
        """Standardize modules to fit on each modality's training features before training."""
        return {}

    def token_standardizers(self) -> list[tuple[str, int, Standardize]]:
        """(modality, layer index, Standardize) to fit on the training tokens of that layer."""
        return []


def standardized(tokens: TokenBatch, norms: Sequence[Standardize | None]) -> list[torch.Tensor]:
    """Token layers through their fitted standardisers (as pooled heads standardise: EfficientNet's
    channels differ in scale by orders of magnitude), padding kept at zero."""
    keep = tokens.mask[..., None].float()
    return [(n(x) if n is not None else x) * keep for x, n in zip(tokens.layers, norms)]


# -- pooled baselines ------------------------------------------------------------------------------------
class LateFusion(FusionModule):
    """Per-modality MLP heads (a :class:`~unialign.projections.Tower`: standardise + MLP) on pooled
    features; the prediction averages the logits of the heads a record has. Each head is trained on its
    own loss, so the heads are exactly the unimodal baselines."""

    def __init__(self, dims: dict[str, int], n_out: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__(list(dims))
        self.heads = nn.ModuleDict({m: Tower("mlp", d, n_out, {"hidden": hidden, "dropout": dropout}) for m, d in dims.items()})

    def per_modality(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](batch.pooled[m]) for m in self.modalities}

    def forward(self, batch: Batch) -> torch.Tensor:
        outs = self.per_modality(batch)
        w = torch.stack([batch.present[m].float() for m in self.modalities], 1)  # (B, M)
        w = w / w.sum(1, keepdim=True).clamp_min(1.0)
        return sum(w[:, j, None] * outs[m] for j, m in enumerate(self.modalities))

    def loss(self, batch: Batch, y: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
        losses = []
        for m, out in self.per_modality(batch).items():
            has = batch.present[m]
            if has.any():
                losses.append(criterion(out[has], y[has]))
        return torch.stack(losses).mean()

    def standardizers(self) -> dict[str, Standardize]:
        return {m: self.heads[m].standardize for m in self.modalities}


class ConcatMLP(FusionModule):
    """Standardised pooled features of every modality, concatenated with one presence flag each, into
    one MLP; a missing modality contributes zeros (its training mean) and a 0 flag."""

    def __init__(self, dims: dict[str, int], n_out: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__(list(dims))
        self.norms = nn.ModuleDict({m: Standardize(d) for m, d in dims.items()})
        self.mlp = make_head("mlp", sum(dims.values()) + len(dims), n_out, hidden=hidden, dropout=dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        parts, flags = [], []
        for m in self.modalities:
            has = batch.present[m].float()[:, None]
            parts.append(self.norms[m](batch.pooled[m].float()) * has)
            flags.append(has)
        return self.mlp(torch.cat(parts + flags, 1))

    def standardizers(self) -> dict[str, Standardize]:
        return dict(self.norms)


# -- cross-modal transformers over tokens ---------------------------------------------------------------
def feed_forward(d: int, dropout: float, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, mult * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(mult * d, d))


class CrossLayer(nn.Module):
    """One co-attention layer (BridgeTower's and METER's cross-modal layer): per modality stream,
    self-attention over its tokens, cross-attention to the tokens of every other stream, feed-forward;
    pre-LayerNorm residuals. ``mask[m]`` marks real tokens."""

    def __init__(self, modalities: Sequence[str], d: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        mha = lambda: nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)  # noqa: E731
        self.modalities = list(modalities)
        self.self_norm = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        self.self_attn = nn.ModuleDict({m: mha() for m in modalities})
        self.cross_norm = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        self.context_norm = nn.ModuleDict({m: nn.LayerNorm(d) for m in modalities})
        self.cross_attn = nn.ModuleDict({m: mha() for m in modalities})
        self.ff = nn.ModuleDict({m: feed_forward(d, dropout) for m in modalities})

    def forward(self, x: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = {}
        for m in self.modalities:
            q = self.self_norm[m](x[m])
            h[m] = x[m] + self.self_attn[m](q, q, q, key_padding_mask=~mask[m], need_weights=False)[0]
        out = {}
        for m in self.modalities:
            others = [n for n in self.modalities if n != m]
            y = h[m]
            if others:
                ctx = self.context_norm[m](torch.cat([h[n] for n in others], 1))
                keep = torch.cat([mask[n] for n in others], 1)
                y = y + self.cross_attn[m](self.cross_norm[m](y), ctx, ctx, key_padding_mask=~keep, need_weights=False)[0]
            out[m] = y + self.ff[m](y)
        return out


def with_null(x: torch.Tensor, mask: torch.Tensor, present: torch.Tensor, null: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Records without the modality (``present`` False) get one token, the learned ``null``, instead of
    their (empty) sequence."""
    keep = present[:, None, None]
    first = torch.where(keep[:, 0], x[:, 0], null.expand_as(x[:, 0]))
    x = torch.cat([first[:, None], torch.where(keep, x[:, 1:], torch.zeros_like(x[:, 1:]))], 1)
    lone = torch.zeros_like(mask)
    lone[:, 0] = True
    return x, torch.where(present[:, None], mask, lone)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.float()[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class TokenFusion(FusionModule):
    """Shared skeleton of the two cross-modal encoders: a stack of :class:`CrossLayer` whose per-layer
    inputs subclasses compute (``layer_input``), a null token per modality, and a head on the
    concatenated masked-mean of each stream."""

    uses_tokens = True

    def __init__(self, layer_dims: dict[str, Sequence[int]], n_out: int, width: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.1, hidden: int = 256):
        super().__init__(list(layer_dims))
        self.layer_dims = {m: [int(d) for d in dims] for m, dims in layer_dims.items()}
        self.width, self.depth = width, depth
        self.token_norms = nn.ModuleDict({m: nn.ModuleList(Standardize(d) for d in dims) for m, dims in self.layer_dims.items()})
        self.null = nn.ParameterDict({m: nn.Parameter(torch.randn(width) * 0.02) for m in self.modalities})
        self.layers = nn.ModuleList(CrossLayer(self.modalities, width, heads, dropout) for _ in range(depth))
        self.head = make_head("mlp", width * len(self.modalities), n_out, hidden=hidden, dropout=dropout)

    def layer_input(self, level: int, m: str, layers: list[torch.Tensor], previous: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def token_standardizers(self) -> list[tuple[str, int, Standardize]]:
        return [(m, j, n) for m, norms in self.token_norms.items() for j, n in enumerate(norms)]

    def encode(self, batch: Batch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each stream's tokens after the cross-modal layers, and their masks."""
        z: dict[str, torch.Tensor | None] = {m: None for m in self.modalities}
        layers = {m: standardized(batch.tokens[m], self.token_norms[m]) for m in self.modalities}
        mask = {}
        for level, layer in enumerate(self.layers):
            x = {}
            for m in self.modalities:
                t = batch.tokens[m]
                x[m], mask[m] = with_null(self.layer_input(level, m, layers[m], z[m]), t.mask, batch.present[m], self.null[m])
            z = layer(x, mask)
        return z, mask

    def forward(self, batch: Batch) -> torch.Tensor:
        z, mask = self.encode(batch)
        return self.head(torch.cat([masked_mean(z[m], mask[m]) for m in self.modalities], 1))


def per_token(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A (rows, features) module applied to every token of (B, T, features)."""
    b, t, d = x.shape
    return module(x.reshape(b * t, d)).reshape(b, t, -1)


class ManagerFusion(TokenFusion):
    """ManagerTower: before cross-modal layer l, a manager per modality mixes the unimodal layers (and,
    from the second layer on, the previous cross-modal output) with learned softmax weights, each
    expert LayerNorm'd and mapped to the fusion width (:class:`LayerMixHead`, one scalar per expert)."""

    def __init__(self, layer_dims: dict[str, Sequence[int]], n_out: int, width: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.1, hidden: int = 256):
        super().__init__(layer_dims, n_out, width, depth, heads, dropout, hidden)
        self.managers = nn.ModuleDict({m: nn.ModuleList(
            LayerMixHead(sum(dims) + (width if level else 0), width, list(dims) + ([width] if level else []), width=width)
            for level in range(depth)) for m, dims in self.layer_dims.items()})

    def layer_input(self, level: int, m: str, layers: list[torch.Tensor], previous: torch.Tensor | None) -> torch.Tensor:
        experts = layers + ([previous] if previous is not None else [])
        return per_token(self.managers[m][level], torch.cat(experts, -1))

    def mix_weights(self) -> dict[str, list[list[float]]]:
        """Each manager's softmax weights over its experts (unimodal layers, then the previous output)."""
        return {m: [mgr.mix_weights()[:, 0].tolist() for mgr in mgrs] for m, mgrs in self.managers.items()}


class Bridge(nn.Module):
    """BridgeTower's bridge layer: ``LayerNorm(z + W x)``, a unimodal layer's tokens ``x`` added into the
    cross-modal stream ``z``."""

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.norm(z + self.proj(x))


class BridgeFusion(TokenFusion):
    """BridgeTower: the cross-modal encoder starts from unimodal layer N-k (mapped and LayerNorm'd), and
    before its layer l a bridge adds unimodal layer N-k+l (the top k layers, k = depth, in order)."""

    def __init__(self, layer_dims: dict[str, Sequence[int]], n_out: int, width: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.1, hidden: int = 256):
        super().__init__(layer_dims, n_out, width, depth, heads, dropout, hidden)
        short = [m for m, dims in self.layer_dims.items() if len(dims) < depth + 1]
        if short:
            raise ValueError(f"bridges need {depth + 1} unimodal layers per modality (depth {depth}); {short} have fewer")
        self.start = nn.ModuleDict({m: nn.Sequential(nn.Linear(dims[-depth - 1], width), nn.LayerNorm(width))
                                    for m, dims in self.layer_dims.items()})
        self.bridges = nn.ModuleDict({m: nn.ModuleList(Bridge(d, width) for d in dims[-depth:])
                                      for m, dims in self.layer_dims.items()})

    def layer_input(self, level: int, m: str, layers: list[torch.Tensor], previous: torch.Tensor | None) -> torch.Tensor:
        z = self.start[m](layers[-self.depth - 1]) if previous is None else previous
        return self.bridges[m][level](z, layers[-self.depth + level])


# -- MM-Lego ---------------------------------------------------------------------------------------------
class LegoBlock(FusionModule):
    """MM-Lego's LegoBlock for one modality: the encoder's last-layer tokens (LayerNorm'd, mapped to
    ``width``, one self-attention layer) are read by a learnable latent array (``latents`` x ``width``)
    through ``depth`` rounds of cross-attention + feed-forward (weights shared across rounds, as in the
    reference code), in the frequency domain: each round normalises the latent over the latent axis, takes
    its FFT there and lets the real part attend to the real part of the tokens' FFT over positions; between
    rounds the latent goes back through the inverse FFT (imaginary part kept). The block's output is the
    complex latent in the frequency domain, which blocks share in shape, so they can be merged; its head
    reads the mean over latents of the real part (LayerNorm, Linear).

    Token sequences are zero-padded to a fixed length (the FFT over positions depends on it)."""

    uses_tokens = True
    fixed_length = True

    def __init__(self, modality: str, in_dim: int, n_out: int, latents: int = 16, width: int = 64, depth: int = 2,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__([modality])
        self.modality, self.depth = modality, depth
        self.standardize = Standardize(in_dim)
        self.norm_in = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, width)
        self.token_norm = nn.LayerNorm(width)
        self.token_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.token_ff = feed_forward(width, dropout)
        self.latent = nn.Parameter(torch.randn(latents, width))
        self.latent_norm = nn.LayerNorm(width)
        self.context_norm = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.latent_ff = feed_forward(width, dropout)
        self.head_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, n_out)

    def encode(self, tokens: TokenBatch, init: torch.Tensor | None = None) -> torch.Tensor:
        """(B, latents, width) complex latent in the frequency domain; ``init``: a (B, latents, width)
        real latent to start from instead of the learned one (LegoFuse's stacking)."""
        keep = tokens.mask[..., None].float()
        x = self.proj(self.norm_in(self.standardize(tokens.layers[-1]))) * keep
        q = self.token_norm(x)
        keys = tokens.mask.clone()
        keys[:, 0] |= ~keys.any(1)  # a record without tokens (a missing modality) attends to one zero token
        x = x + self.token_attn(q, q, q, key_padding_mask=~keys, need_weights=False)[0]
        x = (x + self.token_ff(x)) * keep
        context = self.context_norm(torch.fft.fft(x, dim=1).real)
        l = self.latent.expand(len(x), -1, -1) if init is None else init
        for i in range(self.depth):
            spectrum = torch.fft.fft(l / l.norm(dim=1, keepdim=True).clamp_min(1e-6), dim=1)
            l = spectrum.real
            l = l + self.cross_attn(self.latent_norm(l), context, context, need_weights=False)[0]
            l = l + self.latent_ff(l)
            if i < self.depth - 1:
                l = torch.fft.ifft(torch.complex(l, spectrum.imag), dim=1).real
        return torch.complex(l, spectrum.imag)

    def token_standardizers(self) -> list[tuple[str, int, Standardize]]:
        return [(self.modality, -1, self.standardize)]

    def logits(self, latent: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(latent.real.mean(1)))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.logits(self.encode(batch.tokens[self.modality]))


def merge_latents(latents: torch.Tensor, weights: torch.Tensor, rule: str = "harmonic") -> torch.Tensor:
    """Merge (M, B, ...) complex latents with per-record weights (M, B) that sum to 1 over the blocks a
    record has (0 for the others).

    ``harmonic`` (MM-Lego's merge): the weighted harmonic mean of the magnitudes, ``1 / sum_i w_i / |l_i|``,
    and the circular mean of the phases, ``angle(sum_i w_i exp(i phi_i))``. (The reference code scales the
    magnitude by an extra ``2 a (1 - a)``, 1/2 at equal weights, and averages phases arithmetically, which
    wraps wrongly across +-pi; with this rule, merging a block with itself gives the block.)
    ``mean``: the weighted mean of the complex latents."""
    w = weights.reshape(weights.shape + (1,) * (latents.dim() - weights.dim())).to(latents.real.dtype)
    if rule == "mean":
        return (w * latents).sum(0)
    if rule != "harmonic":
        raise ValueError(f"unknown merge rule {rule!r}; accepted: harmonic, mean")
    magnitude = 1.0 / (w / latents.abs().clamp_min(1e-8)).sum(0).clamp_min(1e-8)
    phase = torch.angle((w * torch.exp(1j * torch.angle(latents))).sum(0))
    return torch.polar(magnitude, phase)


def presence_weights(batch: Batch, modalities: Sequence[str]) -> torch.Tensor:
    """(M, B): 1 / (number of modalities the record has) for each it has, 0 for the others."""
    w = torch.stack([batch.present[m].float() for m in modalities])
    return w / w.sum(0, keepdim=True).clamp_min(1.0)


class LegoMerge(FusionModule):
    """LegoMerge: unimodal LegoBlocks combined with no multimodal training. Each record's latents (of
    the blocks it has) are merged in the frequency domain (:func:`merge_latents`) and read by the mean
    of those blocks' heads (LayerNorm and Linear parameters averaged; the reference code's linear
    ``PlugHeads``), so a record with one modality gets exactly that block's prediction."""

    uses_tokens = True
    fixed_length = True

    def __init__(self, blocks: Sequence[LegoBlock], rule: str = "harmonic"):
        super().__init__([b.modality for b in blocks])
        self.blocks = nn.ModuleDict({b.modality: b for b in blocks})
        self.rule = rule

    def forward(self, batch: Batch) -> torch.Tensor:
        w = presence_weights(batch, self.modalities)
        latents = torch.stack([self.blocks[m].encode(batch.tokens[m]) for m in self.modalities])
        return merged_head(list(self.blocks.values()), merge_latents(latents, w, self.rule), w)


def merged_head(blocks: Sequence[LegoBlock], latent: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The blocks' heads averaged with per-record weights (M, B), applied to a merged latent."""
    x = F.layer_norm(latent.real.mean(1), blocks[0].head_norm.normalized_shape, eps=blocks[0].head_norm.eps)
    mix = lambda p: torch.einsum("mb,m...->b...", weights, torch.stack(p))  # noqa: E731
    gamma, beta = mix([b.head_norm.weight for b in blocks]), mix([b.head_norm.bias for b in blocks])
    weight, bias = mix([b.head.weight for b in blocks]), mix([b.head.bias for b in blocks])
    return torch.einsum("bd,bod->bo", x * gamma + beta, weight) + bias


class LegoFuse(FusionModule):
    """LegoFuse: the blocks stacked, the latent passing from one block to the next (back through the
    inverse FFT into the latent domain between blocks), read by the averaged heads, then fine-tuned
    briefly on multimodal data. A record without a modality skips that block."""

    uses_tokens = True
    fixed_length = True

    def __init__(self, blocks: Sequence[LegoBlock]):
        super().__init__([b.modality for b in blocks])
        self.blocks = nn.ModuleDict({b.modality: copy.deepcopy(b) for b in blocks})

    def forward(self, batch: Batch) -> torch.Tensor:
        blocks = list(self.blocks.values())
        first = blocks[0]
        state = first.latent.expand(len(batch.present[first.modality]), -1, -1)
        out = None
        for b in blocks:
            z = b.encode(batch.tokens[b.modality], init=None if b is first else state)
            has = batch.present[b.modality][:, None, None]
            out = z if out is None else torch.where(has, z, out)
            state = torch.where(has, torch.fft.ifft(z, dim=1).real, state)
        equal = torch.full((len(blocks), len(state)), 1.0 / len(blocks), device=state.device)
        return merged_head(blocks, out, equal)


__all__ = ["Batch", "Bridge", "BridgeFusion", "ConcatMLP", "CrossLayer", "FusionModule", "LateFusion", "LegoBlock",
           "LegoFuse", "LegoMerge", "ManagerFusion", "TokenFusion", "merge_latents", "merged_head", "presence_weights",
           "standardized", "with_null"]
