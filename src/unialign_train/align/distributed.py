"""Multi-GPU / multi-node training with torch.distributed (torchrun, DDP-style), open_clip's way.

- Every rank holds the full heads and the same data order; it encodes its contiguous slice of each
  global batch, then :func:`gather_features` all-gathers the projections so the loss sees every
  negative of the global batch. The gathered list gets the *local* tensors substituted back, so
  gradients flow into this rank's slice only (open_clip's ``gather_features`` with
  ``gather_with_grad=False``); the loss value is the full-batch loss on every rank.
- :func:`sync_gradients` then **sums** the head gradients over ranks (each rank holds the exact
  gradient through its own slice, so the sum is the full-batch gradient) and averages the loss's
  own scalars (temperature, bias: every rank computed the same full-batch gradient for them). The
  result equals a single process on the full batch, so learning rates do not depend on world size.
- Launch: ``torchrun --nproc_per_node 4 -m unialign train config.yaml``; ``train`` initialises the
  process group from torchrun's environment (NCCL on CUDA, gloo on CPU), uses ``cuda:LOCAL_RANK``,
  and only rank 0 validates and writes checkpoints.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (or without torch.distributed): the one process that writes files."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: torch.device | None = None) -> bool:
    """Initialise the default process group from torchrun's variables (if not done already).

    Returns whether torch.distributed is in use. The backend is NCCL when CUDA is used, else gloo."""
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under torchrun; other devices unchanged."""
    if device.type == "cuda" and device.index is None and is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_gather_no_grad(x: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return out


def gather_features(image: torch.Tensor, text: torch.Tensor, gather_with_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``gather_features``: concatenate every rank's (equal-sized) local batch in rank order.

    With ``gather_with_grad=False`` (default) the gathered copies carry no gradient and this rank's own
    tensors are put back in its slot, so the backward pass reaches this rank's slice;
    ``gather_with_grad=True`` uses the differentiable all_gather (gradients to every slice)."""
    if not is_initialized() or world_size() == 1:
        return image, text
    if gather_with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(image)), torch.cat(all_gather(text))
    r = rank()
    imgs, txts = all_gather_no_grad(image), all_gather_no_grad(text)
    imgs[r], txts[r] = image, text
    return torch.cat(imgs), torch.cat(txts)


class GatheredLoss(torch.nn.Module):
    """Wraps a contrastive loss: gathers both sides over ranks before calling it. ``groups`` must be
    the *global* batch's groups (every rank knows the whole batch's items)."""

    def __init__(self, loss: torch.nn.Module, gather_with_grad: bool = False):
        super().__init__()
        self.loss, self.gather_with_grad = loss, gather_with_grad

    @property
    def temperature(self) -> float:
        return self.loss.temperature

    def forward(self, img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        img, txt = gather_features(img, txt, self.gather_with_grad)
        return self.loss(img, txt, groups)


def sync_gradients(model_params: Iterable[torch.nn.Parameter], loss_params: Iterable[torch.nn.Parameter] = ()) -> None:
    """Sum head gradients over ranks (full-batch gradient); average the loss scalars' gradients."""
    if not is_initialized() or world_size() == 1:
        return
    for params, op in ((model_params, "sum"), (loss_params, "mean")):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat /= world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_params(module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not is_initialized() or world_size() == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def broadcast_flag(value: bool, device: torch.device) -> bool:
    """Rank 0's boolean, on every rank (early-stopping decisions)."""
    if not is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([1 if value else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
