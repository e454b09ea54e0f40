"""Video through any frozen image encoder: ``video:<image spec>?frames=8&pool=mean&shift=0.125``.

A clip is ``frames`` frames (:func:`unialign.frames.load_frames`, in the DataLoader workers), each run
through the wrapped image encoder (every option that is not a video option goes to it, so
``video:effnet-lite0?image_size=128&frames=8`` wraps ``effnet-lite0?image_size=128``); the per-frame
features of every layer are then pooled over time. Layers are the image encoder's (``final``,
``block0``..), pooled the same way, so layer selection and mixing work on video as on images.

Two ways for the order of frames to reach the features, neither trains the image encoder:

- ``shift``: All-in-One's temporal token rolling (Wang et al. 2022) adapted to a frozen network, in
  the form of TSM's channel shift: forward hooks on intermediate blocks of the image network replace,
  in every frame, a fraction ``shift`` of the block's output channels by those of the previous frame
  and another ``shift`` by those of the next frame (rolled circularly over the clip, as All-in-One
  rolls tokens), so later blocks see neighbouring frames side by side. No parameters; the hooked
  network is the frozen one. A clip of identical frames is unchanged by it (bit for bit); a clip played
  backwards gives different features. Needs the PyTorch backend (the hooks run in eager mode).
  ``shift_blocks``: which blocks are hooked: ``even`` (default: blocks 0, 2, 4, ...), ``all``, or
  indices joined by ``-`` (``3-7-11``). The blocks are the image network's main ``ModuleList``
  (EfficientNet's MBConv blocks, a ViT's transformer layers): any torch image encoder has one.
- ``pool``: ``mean`` (frame averaging: blind to order by construction), ``trend`` (the mean and the
  least-squares slope of each feature over time, 2 x width: order-aware and parameter-free; a clip
  played backwards flips the slope's sign), or ``concat`` (the frames' features side by side in time
  order, frames x width: for the trained attention-pooling head of the align stage, recipe ``temporal``,
  to pool; :attr:`steps` tells it the number of frames).

``frames`` is the number of frames sampled from each clip (default 8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError, DataError
from .base import FINAL, Encoder

VIDEO_DEFAULTS: dict[str, Any] = {"frames": 8, "pool": "mean", "shift": 0.0, "shift_blocks": "even"}
POOLS = {"mean": 1, "trend": 2, "concat": None}  # pool -> width factor (concat: frames)


def temporal_shift(x: torch.Tensor, frames: int, fraction: float) -> torch.Tensor:
    """Roll ``fraction`` of the channels one frame forward in time and as many one frame backward.

    ``x`` is (clips * frames, C, ...) for convolutional maps or (clips * frames, tokens, C) for token
    sequences (channels last); the rolls are circular within each clip."""
    ch = 2 if x.ndim == 3 else 1  # the channel axis of (BT, N, C) tokens / (BT, C, H, W) maps
    fold = int(x.shape[ch] * fraction)
    if fold == 0 or frames < 2:
        return x
    v = x.reshape(-1, frames, *x.shape[1:])  # (clips, frames, ...): the channel axis is now ch + 1
    out = v.clone()
    prev = torch.roll(v.narrow(ch + 1, 0, fold), shifts=1, dims=1)  # frame t gets frame t-1's channels
    nxt = torch.roll(v.narrow(ch + 1, fold, fold), shifts=-1, dims=1)  # ... and frame t+1's
    out.narrow(ch + 1, 0, fold).copy_(prev)
    out.narrow(ch + 1, fold, fold).copy_(nxt)
    return out.reshape(x.shape)


def pool_frames(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(clips, frames, D) per-frame features -> (clips, D * factor): see the module doc for ``pool``."""
    if pool == "mean":
        return x.mean(1)
    if pool == "concat":
        return x.reshape(x.shape[0], -1)
    if pool == "trend":
        t = x.shape[1]
        w = torch.linspace(-1.0, 1.0, t, dtype=x.dtype, device=x.device) if t > 1 else x.new_zeros(1)
        slope = torch.einsum("t,btd->bd", w, x) / w.square().sum().clamp_min(1e-12)
        return torch.cat([x.mean(1), slope], dim=1)
    raise ConfigError(f"pool={pool!r}; accepted: {', '.join(POOLS)}")


def main_blocks(net: torch.nn.Module) -> torch.nn.ModuleList:
    """The image network's sequence of blocks: its longest ``ModuleList`` (first one on ties)."""
    lists = [m for m in net.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        raise ConfigError(f"{type(net).__name__} has no list of blocks to put a temporal shift in; use shift=0")
    return max(lists, key=len)


def chosen_blocks(n: int, which: str) -> list[int]:
    """Block indices from ``shift_blocks``: ``all``, ``even``, or indices joined by ``-``."""
    which = str(which)
    if which == "all":
        return list(range(n))
    if which == "even":
        return list(range(0, n, 2))
    try:
        idx = sorted({int(t) for t in which.split("-") if t != ""})
    except ValueError:
        idx = []
    if not idx or any(i < 0 or i >= n for i in idx):
        raise ConfigError(f"shift_blocks={which!r}: give all, even, or block indices in 0..{n - 1} joined by '-' "
                          "(e.g. 2-6-10)")
    return idx


@dataclass(frozen=True)
class VideoLoader:
    """Picklable ``clip path -> (frames, C, H, W)``: :func:`unialign.frames.load_frames`, then the image
    encoder's own loader on each frame. A list of PIL images / image paths is a clip as it is."""

    frame_loader: Callable[[Any], torch.Tensor]
    frames: int

    def __call__(self, item: Any) -> torch.Tensor:
        from ..frames import load_frames, sample_indices

        if isinstance(item, (list, tuple)):
            if not item:
                raise DataError("a clip given as a list of frames needs at least one frame")
            picked = [item[i] for i in sample_indices(len(item), self.frames)]
        else:
            picked = load_frames(item, self.frames)
        return torch.stack([self.frame_loader(f) for f in picked])


class VideoEncoder(Encoder):
    """A frozen image encoder applied frame by frame, with temporal pooling and optional temporal shift."""

    modality = "video"

    def __init__(self, name: str, device: str | torch.device | None = None, **options: Any):
        from . import format_spec, load_encoder, parse_spec

        super().__init__()
        video = {k: options.pop(k) for k in list(options) if k in VIDEO_DEFAULTS}
        opts = {**VIDEO_DEFAULTS, **video}
        self.frames, self.pool, self.shift = int(opts["frames"]), str(opts["pool"]), float(opts["shift"])
        if self.frames < 1:
            raise ConfigError(f"video:{name}: frames={self.frames}; needs at least 1")
        if self.pool not in POOLS:
            raise ConfigError(f"video:{name}: pool={self.pool!r}; accepted: {', '.join(POOLS)}")
        if not 0.0 <= self.shift <= 0.5:
            raise ConfigError(f"video:{name}: shift={self.shift}; the fraction of channels rolled each way, in [0, 0.5]")
        if not name:
            raise ConfigError("video: needs an image encoder spec, e.g. video:effnet-lite0?frames=8")
        if self.shift > 0:  # the hooks run in eager PyTorch; an exported graph would bypass them
            if options.setdefault("backend", "torch") != "torch":
                raise ConfigError(f"video:{name}: shift={self.shift} needs backend=torch (hooks run in eager "
                                  f"PyTorch), got backend={options['backend']}")
        self.image = load_encoder(name, device, **options)
        if self.image.modality != "image":
            raise ConfigError(f"video:{name}: wraps an image encoder; {self.image.spec} encodes {self.image.modality}")
        self.shift_blocks = str(opts["shift_blocks"])
        self._hooked: list[int] = []
        self._active = 0  # frames per clip while this encoder runs the image network; 0: hooks pass through
        if self.shift > 0:
            blocks = main_blocks(self.image)
            self._hooked = chosen_blocks(len(blocks), self.shift_blocks)
            for i in self._hooked:
                blocks[i].register_forward_hook(self._shift_hook)
        factor = POOLS[self.pool] or self.frames
        self.steps = self.frames if self.pool == "concat" else 1
        self.layer_dims = {k: d * factor for k, d in self.image.layer_dims.items()}
        self.dim = self.layer_dims[FINAL]
        inner_name, inner_opts = parse_spec(self.image.spec)
        self.spec = format_spec(f"video:{inner_name}", {**inner_opts, **opts},
                                {**VIDEO_DEFAULTS, **({"shift_blocks": opts["shift_blocks"]} if not self.shift else {})})
        self.version = self.image.version
        self.backend, self.quantize = self.image.backend, self.image.quantize
        self.freeze(device)

    def _shift_hook(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        if not self._active:
            return output
        if isinstance(output, tuple):  # transformer layers return (hidden, ...)
            return (temporal_shift(output[0], self._active, self.shift), *output[1:])
        return temporal_shift(output, self._active, self.shift)

    def loader(self) -> VideoLoader:
        frame_loader = self.image.loader()
        if frame_loader is None:
            raise ConfigError(f"{self.image.spec} has no image loader")
        return VideoLoader(frame_loader, self.frames)

    def backend_info(self) -> str:
        return self.image.backend_info()

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """(clips, frames, C, H, W) -> each requested layer pooled over space (by the image encoder) and
        then over time."""
        self.check_layers(layers)
        if batch.ndim != 5 or batch.shape[1] != self.frames:
            raise DataError(f"{self.spec}: takes clips of shape (N, {self.frames}, C, H, W); got {tuple(batch.shape)} "
                            "(use its loader())")
        b, t = batch.shape[:2]
        self._active = t if self.shift > 0 else 0
        try:
            out = self.image.forward(batch.reshape(b * t, *batch.shape[2:]), list(layers))
        finally:
            self._active = 0
        return {k: pool_frames(v.float().reshape(b, t, -1), self.pool) for k, v in out.items()}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "image": self.image.config(), "frames": self.frames, "pool": self.pool,
                "shift": self.shift, "shift_blocks": self._hooked, "layers": self.layer_dims}


__all__ = ["POOLS", "VIDEO_DEFAULTS", "VideoEncoder", "VideoLoader", "chosen_blocks", "main_blocks", "pool_frames",
           "temporal_shift"]
