"""Device choice in one place: CUDA when present (bf16 autocast), else CPU (fp32)."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` or ``"auto"`` means CUDA if available, else MPS, else CPU."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True) -> ContextManager:
    """bf16 autocast on CUDA (frozen encoders and heads both tolerate it); a no-op on CPU, where
    bf16 matmuls are often slower than fp32 and would change cached numbers."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
