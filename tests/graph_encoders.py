"""A tiny encoder with an exportable graph (a small conv net): what the backend tests run when the
property under test is the runtime (cache, atomic writes, store keys), not a real model's numerics.
Exports in about a second."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from unialign.encoders.base import FINAL, Encoder, Graph, ImageLoader


class _Prep:
    """Picklable preprocessing: 16x16 RGB in [-1, 1]."""

    def __call__(self, im: Image.Image) -> torch.Tensor:
        arr = np.asarray(im.convert("RGB").resize((16, 16)), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class _Layers(torch.nn.Module):
    def __init__(self, net: torch.nn.Sequential, layers: Sequence[str]):
        super().__init__()
        self.net, self.layers = net, list(layers)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.net[1](self.net[0](pixels))
        out = {"conv": h.mean((2, 3))}
        out[FINAL] = self.net[2](h).mean((2, 3))
        return tuple(out[k] for k in self.layers)


class TinyConvEncoder(Encoder):
    """conv(3->8) + ReLU6 -> "conv" (pooled); conv(8->12) -> "final" (pooled). Seeded weights."""

    modality = "image"

    def __init__(self, backend: str = "auto", quantize: str = "none", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(),
                                       torch.nn.Conv2d(8, 12, 3, stride=2, padding=1))
        self.spec = "tiny-conv" + ("" if backend == "auto" else f"?backend={backend}")
        self.graph_name = "tiny-conv"
        self.dim, self.version = 12, f"seed{seed}"
        self.layer_dims = {FINAL: 12, "conv": 8}
        self.freeze("cpu")
        self.use_backend(backend, quantize)

    def loader(self) -> Any:
        return ImageLoader(_Prep())

    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        return self.run_graph({"pixels": batch}, layers)

    def graph_module(self, layers: Sequence[str]) -> torch.nn.Module:
        return _Layers(self.net, layers)

    def graph(self, layers: Sequence[str]) -> Graph:
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return Graph(self.graph_module(layers), {"pixels": x}, list(layers), {"pixels": {0: "batch"}})
