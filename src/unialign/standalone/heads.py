"""Trained projections: small modules mapping one frozen encoder's features into the shared space.

Every head starts with :class:`Standardize`, a frozen per-dimension affine fitted on the training
features (like a frozen BatchNorm): frozen encoders emit features with wildly different scales and
offsets (EfficientNet's are all positive), and centring them is what makes a linear map work.
Heads are built from data (``make_head(kind, in_dim, out_dim, **options)``), so a recipe is a config.

Standalone (imports only torch): ``unialign.projections`` re-exports it, and a sentence-transformers
export copies this file verbatim, so the exported folder runs the very same heads.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
import torch.nn.functional as F


class Standardize(nn.Module):
    """x -> (x - mean) / std with statistics fitted once on training features and then frozen."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> "Standardize":
        x = x.double()
        self.mean.copy_(x.mean(0).float())
        self.std.copy_(x.std(0).clamp_min(1e-6).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class LinearHead(nn.Module):
    """One linear map: the LiT / STRUCTURE baseline."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(x))


class IdentityHead(nn.Module):
    """No map at all: the side stays in its own (standardised) feature space and the other side's head
    learns to map into it (ShareLock's frozen image side). Only meaningful with ``out_dim == in_dim``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(f"an identity head keeps its input space: out_dim must equal in_dim {in_dim}, got {out_dim}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MLPHead(nn.Module):
    """``depth`` hidden layers of GELU MLP with optional LayerNorm and dropout, then a linear out."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024, depth: int = 1, dropout: float = 0.1,
                 layernorm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.LayerNorm(d) if layernorm else nn.Identity(), nn.Dropout(dropout), nn.Linear(d, hidden), nn.GELU()]
            d = hidden
        layers += [nn.Dropout(dropout), nn.Linear(d, out_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResidualHead(nn.Module):
    """Freeze-Align's block: LayerNorm, dropout, then ``Linear(x) + Linear(GELU(Linear(x)))``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or 4 * out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Linear(in_dim, out_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.norm(x))
        return self.skip(x) + self.fc2(F.gelu(self.fc1(x)))


class StarHead(nn.Module):
    """SAIL's gated "star"/GLU head: ``LayerNorm -> g(ReLU6(f1 x) * f2 x)``, f1, f2 ``expand``x wide,
    Xavier-initialised."""

    def __init__(self, in_dim: int, out_dim: int, expand: int = 8, dropout: float = 0.0):
        super().__init__()
        width = expand * in_dim
        self.norm = nn.LayerNorm(in_dim)
        self.f1 = nn.Linear(in_dim, width)
        self.f2 = nn.Linear(in_dim, width)
        self.drop = nn.Dropout(dropout)
        self.g = nn.Linear(width, out_dim)
        for lin in (self.f1, self.f2, self.g):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.g(self.drop(F.relu6(self.f1(x)) * self.f2(x)))


class LayerMixHead(nn.Module):
    """ManagerTower-style static layer aggregation: each selected layer's pooled features get their own
    LayerNorm and a linear map to a common width, are mixed with softmax weights (one scalar per layer
    or one per layer and dimension), and the mix goes through an inner head.

    The input is the concatenation of the layers' features in ``layer_dims`` order, so the head fits the
    same (batch, features) interface as every other head.
    """

    def __init__(self, in_dim: int, out_dim: int, layer_dims: Sequence[int] = (), width: int = 512,
                 per_dim: bool = False, inner: str = "linear", **inner_options: Any):
        super().__init__()
        layer_dims = list(layer_dims) or [in_dim]
        if sum(layer_dims) != in_dim:
            raise ValueError(f"layer dims {layer_dims} sum to {sum(layer_dims)}, input has {in_dim}")
        self.layer_dims = layer_dims
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in layer_dims)
        self.maps = nn.ModuleList(nn.Linear(d, width) for d in layer_dims)
        self.weights = nn.Parameter(torch.zeros(len(layer_dims), width if per_dim else 1))
        self.inner = make_head(inner, width, out_dim, **inner_options)

    def mix_weights(self) -> torch.Tensor:
        return self.weights.softmax(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.layer_dims, dim=-1)
        stacked = torch.stack([m(n(p)) for p, n, m in zip(parts, self.norms, self.maps)])  # (L, B, width)
        return self.inner((self.mix_weights()[:, None, :] * stacked).sum(0))


class TemporalHead(nn.Module):
    """Attention pooling over time, trained: for clips whose features hold every frame side by side in
    time order (``video:...&pool=concat``), where a fixed pooling (mean, trend) would decide for the
    model what matters in time.

    Each frame's features (all layers of that frame) go through LayerNorm and a linear map to ``width``;
    a temporal convolution over neighbouring frames (``kernel``, residual; 0: none) puts each frame beside
    its neighbours, and a learned embedding of the frame's position lets order reach the head; ``depth`` pre-norm
    transformer layers let frames attend to each other (motion is a relation between frames); then one
    learned query attends over the frames (the multi-head attention pooling of the Set Transformer's PMA
    and SigLIP's MAP head) and a linear map gives the output. Input layout: each layer's ``frames``
    blocks in turn, ``[layer0: f0 .. f(T-1)][layer1: f0 .. f(T-1)]...``, the concatenation of the stored
    ``pool=concat`` layers; ``layer_dims`` are those layers' widths (frames x per-frame width each).
    """

    def __init__(self, in_dim: int, out_dim: int, frames: int = 0, layer_dims: Sequence[int] = (), width: int = 256,
                 heads: int = 4, depth: int = 1, kernel: int = 3, dropout: float = 0.1):
        super().__init__()
        layer_dims = [int(d) for d in layer_dims] or [in_dim]
        if frames < 2:
            raise ValueError(f"a temporal head needs the number of frames (>= 2) each item holds, got frames={frames}; "
                             "store clips with pool=concat")
        if sum(layer_dims) != in_dim or any(d % frames for d in layer_dims):
            raise ValueError(f"layer widths {layer_dims} (input {in_dim}) are not {frames} frames side by side")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.frames, self.layer_dims = int(frames), layer_dims
        frame_dim = sum(d // frames for d in layer_dims)
        self.norm_in = nn.LayerNorm(frame_dim)
        self.embed = nn.Linear(frame_dim, width)
        if kernel < 0 or (kernel and kernel % 2 == 0):
            raise ValueError(f"kernel {kernel}: the temporal convolution's width, an odd number (0: none)")
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2) if kernel else None
        # position embeddings on the scale of the frame embeddings, so order reaches the attention from the
        # first step (at ViT's 0.02 the head stayed blind to order on the moving emoji's validation objects)
        self.position = nn.Parameter(torch.randn(frames, width) * 0.5)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=dropout, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth))
        self.query = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pool = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    def frame_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) in the layout above -> (B, frames, per-frame width of all layers)."""
        parts = torch.split(x, self.layer_dims, dim=-1)
        return torch.cat([p.reshape(x.shape[0], self.frames, -1) for p in parts], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.norm_in(self.frame_tokens(x)))
        if self.conv is not None:  # neighbouring frames side by side: a motion is a difference between them
            h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.position
        for block in self.blocks:
            h = block(h)
        pooled, _ = self.pool(self.query.expand(h.shape[0], -1, -1), h, h, need_weights=False)
        return self.out(self.norm_out(pooled[:, 0]))


HEADS: dict[str, type[nn.Module]] = {
    "linear": LinearHead,
    "mlp": MLPHead,
    "residual": ResidualHead,
    "star": StarHead,
    "layermix": LayerMixHead,
    "temporal": TemporalHead,
    "identity": IdentityHead,
}


def make_head(kind: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    """Build a head by name; unknown names or options raise a ValueError naming what is accepted."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    try:
        return HEADS[kind](in_dim, out_dim, **options)
    except TypeError as e:
        raise ValueError(f"head {kind!r}: {e}") from None


class Tower(nn.Module):
    """A trained projection for one modality: Standardize + head. Outputs are *not* normalised
    (losses and users do that); ``Tower(**tower.config())`` rebuilds it."""

    kind_of_projection = "head"

    def __init__(self, kind: str, in_dim: int, out_dim: int, options: dict[str, Any] | None = None):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.options = kind, int(in_dim), int(out_dim), dict(options or {})
        self.standardize = Standardize(self.in_dim)
        self.head = make_head(kind, self.in_dim, self.out_dim, **self.options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardize(x.float()))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim, "options": self.options}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["HEADS", "IdentityHead", "LayerMixHead", "LinearHead", "MLPHead", "ResidualHead", "Standardize", "StarHead", "TemporalHead", "Tower",
           "count_parameters", "make_head"]
