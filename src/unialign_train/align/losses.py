"""Contrastive losses and the STRUCTURE regulariser, as modules holding their own learnable scalars.

All losses take the heads' raw outputs, L2-normalise them, and accept an optional ``groups`` vector:
pairs in the same group (same concept, identical caption) are not treated as negatives of each other.
Without it, the same emoji in two styles within one batch would be pushed apart.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def _same_group(groups: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if groups is None:
        return torch.eye(n, dtype=torch.bool, device=device)
    g = groups.to(device)
    return g[:, None] == g[None, :]


class InfoNCE(nn.Module):
    """Symmetric InfoNCE (CLIP). Temperature learnable (init 0.07, clamped to [t_min, t_max]) or fixed."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True, t_min: float = 0.001, t_max: float = 0.5):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)), requires_grad=learnable)
        self.min_log, self.max_log = math.log(1.0 / t_max), math.log(1.0 / t_min)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(self.min_log, self.max_log).exp()

    def forward(self, img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        logits = self.scale() * img @ txt.T
        n = len(img)
        target = torch.arange(n, device=img.device)
        if groups is not None:  # hide same-group off-diagonal entries: they are not negatives
            hide = _same_group(groups, n, img.device) & ~torch.eye(n, dtype=torch.bool, device=img.device)
            logits = logits.masked_fill(hide, float("-inf"))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class SigLIP(nn.Module):
    """Sigmoid loss with learnable scale (init 20 in log space, clamped to [1, 100]) and bias (init -10),
    averaged over all N^2 pairs (SAIL's normalisation). Same-group pairs count as positives."""

    def __init__(self, scale: float = 20.0, bias: float = -10.0, learnable: bool = True, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)), requires_grad=learnable)
        self.bias = nn.Parameter(torch.tensor(float(bias)), requires_grad=learnable)
        self.max_log = math.log(max_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(0.0, self.max_log).exp()

    def forward(self, img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        logits = self.scale() * img @ txt.T + self.bias
        labels = 2.0 * _same_group(groups, len(img), img.device).float() - 1.0
        return -F.logsigmoid(labels * logits).mean()


LOSSES: dict[str, type[nn.Module]] = {"infonce": InfoNCE, "siglip": SigLIP}


def make_loss(kind: str, **options: float | bool) -> nn.Module:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[kind](**options)


def multi_positive(loss: nn.Module, img: torch.Tensor, txts: Sequence[torch.Tensor], groups: torch.Tensor | None = None) -> torch.Tensor:
    """SAIL's multi-positive captions: one N x N loss block per caption set, averaged."""
    return torch.stack([loss(img, t, groups) for t in txts]).mean()


# -- STRUCTURE ----------------------------------------------------------------------------------
def _transition(z: torch.Tensor, tau: float) -> torch.Tensor:
    z = F.normalize(z.float(), dim=-1)
    z = z - z.mean(0, keepdim=True)
    return torch.softmax(z @ z.T / tau, dim=-1)


def _js(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence 0.5 KL(P||M) + 0.5 KL(Q||M), averaged over rows."""
    m = 0.5 * (p + q)
    kl_pm = (p * ((p + eps).log() - (m + eps).log())).sum(-1)
    kl_qm = (q * ((q + eps).log() - (m + eps).log())).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


def structure_regularizer(frozen: torch.Tensor, projected: torch.Tensor, levels: int = 1, tau: float = 0.05) -> torch.Tensor:
    """STRUCTURE: keep the batch's neighbourhood geometry of the frozen features in the projection.

    Both sides are L2-normalised and mean-centred; ``P = softmax_rows(Z Z^T / tau)`` (diagonal
    included); levels l = 1..L compare the l-step transition matrices ``P^l`` with the symmetric
    Jensen-Shannon divergence built from KL(P||M) (the reference code uses KL(M||P); both are
    symmetric and zero iff equal), weighted 1/l and averaged over levels. Computed in fp32.
    """
    with torch.autocast(device_type=projected.device.type, enabled=False):
        p_frozen = _transition(frozen.detach(), tau)
        p_proj = _transition(projected, tau)
        total = projected.new_zeros((), dtype=torch.float32)
        pf, pp = p_frozen, p_proj
        for l in range(1, levels + 1):
            if l > 1:
                pf, pp = pf @ p_frozen, pp @ p_proj
            total = total + _js(pf, pp) / l
        return total / levels
