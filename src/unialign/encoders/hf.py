"""Hugging Face ``AutoModel`` towers (``hf:<id-or-path>``), image or text, chosen from the config.

Image towers (ViT-family token models: DINOv2 with or without registers, ViT, DeiT, CLIP/SigLIP vision):
- ``pooling``: ``cls`` (class token), ``mean`` (mean of patch tokens, register/distillation tokens
  excluded) or ``cls+mean`` (both concatenated, 2 x width: SAIL's choice for DINOv2). Default
  ``cls+mean`` for DINOv2, ``cls`` for other models with a class token, ``mean`` for those without.
- Tokens are taken *after* the model's final norm (``layernorm`` / ``post_layernorm``), which is what
  DINOv2/ViT ``last_hidden_state`` and CLIP ``pooler_output`` are built from. The per-layer outputs
  "layer0".."layerN" (layer0 = embeddings) apply the same final norm to every hidden state before
  pooling: the intermediate residual stream has a scale that grows with depth, and the final norm puts
  all layers on the footing the model itself was trained to read out (as DINOv2's own
  ``get_intermediate_layers(norm=True)`` does). So "layerN" equals "final".
- Preprocessing comes from the saved image processor config (resize, center crop, mean/std,
  resample filter), read as a plain dict so no torchvision is needed. Without a processor config:
  resize the shorter side to ``config.image_size``, center crop, ImageNet mean/std. ``image_size``
  rescales the crop (and proportionally the resize); the model interpolates position embeddings.

Text towers (BERT, RoBERTa, MPNet, ...; the encoder of encoder-decoder models): "final" is the masked
mean of ``last_hidden_state``, "layerK" the masked mean of hidden state K. ``max_length`` defaults to
128 tokens (captions are short; capped at the tokenizer's own limit).

Both take ``backend`` (``auto``: OpenVINO / ONNX Runtime on CPU when installed; ``torch``, ``onnx``,
``openvino``): the tower and the pooling of the requested layers are exported together with
``torch.onnx.export``, checked against PyTorch on example inputs, and refused if they disagree (run
such a model with ``backend=torch``). ``quantize=int8``: dynamic int8 MatMul weights.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..standalone.pooling import final_norm, pool_hidden_states  # standalone: shipped with exports
from .base import (FINAL, IMAGENET_MEAN, IMAGENET_STD, Encoder, Graph, ImageLoader, ImageTransform, TextEncoder,
                   config_identity, masked_mean, weights_fingerprint)
from .runtime import BACKEND_OPTIONS, without_backend

POOLINGS = ("cls", "mean", "cls+mean")
NO_CLS_TYPES = {"siglip_vision_model", "siglip2_vision_model"}
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_hf_encoder(name: str, device: str | torch.device | None = None, **options: Any) -> Encoder:
    from transformers import AutoConfig

    from ..progress import quiet_hub_bars

    quiet_hub_bars()
    if not name:
        raise ConfigError("hf: needs a model id or a local path, e.g. hf:facebook/dinov2-base")
    local = Path(name).expanduser()
    source = str(local.resolve()) if local.exists() else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"hf:{name}: cannot load a model config ({e})") from None
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        raise ConfigError(
            f"hf:{name} is a two-tower model ({type(config).__name__}); save or name one tower "
            "(e.g. its vision model) and load that"
        )
    if is_vision_config(config):
        return HFImageEncoder(source, config, device, **options)
    return HFTextEncoder(source, config, device, **options)


def is_vision_config(config: Any) -> bool:
    """Image if the config describes pixels (image_size + num_channels) and no vocabulary."""
    name = type(config).__name__
    if name.endswith("VisionConfig"):
        return True
    return hasattr(config, "image_size") and hasattr(config, "num_channels") and not hasattr(config, "vocab_size")


def _load_model(source: str, config: Any) -> torch.nn.Module:
    from transformers import AutoModel

    # fp32 explicitly: cached features must not depend on the checkpoint's storage dtype; CUDA runs
    # use bf16 autocast on top (see unialign.device.autocast).
    model = AutoModel.from_pretrained(source, config=config, dtype=torch.float32)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return model


def _fingerprint(model: torch.nn.Module, config: Any, extra: Any = None) -> str:
    return weights_fingerprint(model, extra=json.dumps([config_identity(config), extra], sort_keys=True, default=str))


class HFImageEncoder(Encoder):
    modality = "image"

    def __init__(self, source: str, config: Any, device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        model_type = str(getattr(config, "model_type", ""))
        self.has_cls = model_type not in NO_CLS_TYPES
        default_pooling = "cls+mean" if model_type.startswith("dinov2") else ("cls" if self.has_cls else "mean")
        defaults = {"pooling": default_pooling, "image_size": None, **BACKEND_OPTIONS}
        opts = check_options(f"hf:{source}", options, defaults)
        self.pooling = str(opts["pooling"])
        if self.pooling not in POOLINGS:
            raise ConfigError(f"hf:{source}: pooling={self.pooling!r}; accepted: {', '.join(POOLINGS)}")
        if "cls" in self.pooling and not self.has_cls:
            raise ConfigError(f"hf:{source}: {model_type} has no class token; use pooling=mean")
        # tokens before the patches: CLS, DeiT's distillation token, DINOv2 register tokens
        self.prefix = (int(self.has_cls) + int(model_type == "deit")
                       + int(getattr(config, "num_register_tokens", 0) or 0))

        self.model = _load_model(source, config)
        self.norm = final_norm(self.model)
        self.transform, processor_info = image_transform(source, config, opts["image_size"])
        self.image_size = self.transform.crop_hw[0] if self.transform.crop_hw else self.transform.resize_hw[0]
        params = inspect.signature(self.model.forward).parameters
        self._kwargs = {"interpolate_pos_encoding": True} if (
            "interpolate_pos_encoding" in params and self.image_size != getattr(config, "image_size", None)) else {}

        width = int(config.hidden_size)
        self.dim = 2 * width if self.pooling == "cls+mean" else width
        n_hidden = int(config.num_hidden_layers) + 1
        self.layer_dims = {FINAL: self.dim, **{f"layer{i}": self.dim for i in range(n_hidden)}}
        self.spec = format_spec(f"hf:{source}", opts, defaults)
        self.processor_info = processor_info
        self.version = _fingerprint(self.model, config, processor_info)
        self.freeze(device)
        self.graph_name = format_spec(f"hf:{source}", without_backend(opts), defaults)
        self.use_backend(opts["backend"], opts["quantize"])

    def loader(self) -> ImageLoader:
        return ImageLoader(self.transform)

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        return self.run_graph({"pixel_values": batch}, layers)

    def graph_module(self, layers: Sequence[str]) -> torch.nn.Module:
        return HFImageLayers(self.model, self.norm, self.pooling, self.prefix, self._kwargs, layers, self.spec)

    def graph(self, layers: Sequence[str]) -> Graph:
        """Two seeded random images, normalised like real ones, as the example; the batch axis varies."""
        h, w = self.transform.size
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(2, 3, h, w, generator=g) - torch.tensor(self.transform.mean).view(1, 3, 1, 1)) \
            / torch.tensor(self.transform.std).view(1, 3, 1, 1)
        return Graph(self.graph_module(layers), {"pixel_values": x.to(self.device)}, list(layers),
                     {"pixel_values": {0: "batch"}})

    def config(self) -> dict[str, Any]:
        t = self.transform
        return {
            **super().config(),
            "pooling": self.pooling,
            "image_size": self.image_size,
            "final_norm": self.norm is not None,
            "mean": list(t.mean),
            "std": list(t.std),
            "processor": self.processor_info,
            "layers": self.layer_dims,
        }


def image_transform(source: str, config: Any, image_size: int | None) -> tuple[ImageTransform, dict[str, Any]]:
    """The model's eval preprocessing from its saved processor config (or the fallback); ``image_size``
    overrides the final size and scales the resize by the same factor."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        proc, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError):
        proc = {}
    if not proc:
        size = int(image_size or getattr(config, "image_size", 224))
        t = ImageTransform(crop_hw=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_shorter=size)
        return t, {"source": "fallback: config.image_size, ImageNet mean/std"}

    def hw(v: Any) -> tuple[int, int] | None:
        if v is None:
            return None
        if isinstance(v, int):
            return (v, v)
        if "height" in v and "width" in v:
            return (int(v["height"]), int(v["width"]))
        return None

    resize_shorter = resize_hw = crop = None
    size = proc.get("size")
    if proc.get("do_resize", True) and size is not None:
        if isinstance(size, dict) and "shortest_edge" in size:
            resize_shorter = int(size["shortest_edge"])
        else:
            resize_hw = hw(size)
    if proc.get("do_center_crop", False):
        crop = hw(proc.get("crop_size"))
    if image_size is not None:
        target = int(image_size)
        ref = crop or resize_hw or (resize_shorter, resize_shorter)
        if resize_shorter is not None and ref[0]:
            resize_shorter = max(target, round(resize_shorter * target / ref[0]))
        if resize_hw is not None:
            resize_hw = (target, target)
        if crop is not None or resize_hw is None:
            crop = (target, target)
    elif crop is None and resize_hw is None:
        s = int(resize_shorter or getattr(config, "image_size", 224))
        crop = (s, s)  # shortest-edge resize alone gives non-square inputs that cannot be stacked
    normalise = proc.get("do_normalize", True)
    mean = tuple(proc.get("image_mean") or IMAGENET_MEAN) if normalise else (0.0, 0.0, 0.0)
    std = tuple(proc.get("image_std") or IMAGENET_STD) if normalise else (1.0, 1.0, 1.0)
    rescale = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    t = ImageTransform(
        crop_hw=crop, mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),  # type: ignore[arg-type]
        resize_shorter=resize_shorter, resize_hw=resize_hw, resample=int(proc.get("resample", 3)), rescale=rescale,
    )
    keep = ("image_processor_type", "size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std")
    return t, {"source": "processor config", **{k: proc[k] for k in keep if k in proc}}


class HFTextEncoder(TextEncoder):

    def __init__(self, source: str, config: Any, device: str | torch.device | None = None, **options: Any):
        from transformers import AutoTokenizer

        from . import check_options, format_spec

        super().__init__()
        defaults = {"max_length": 128, **BACKEND_OPTIONS}
        opts = check_options(f"hf:{source}", options, defaults)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        limit = getattr(self.tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None
        self.max_length = min(int(opts["max_length"]), limit) if limit else int(opts["max_length"])
        self.model = _load_model(source, config)
        width = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model"))
        n_hidden = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "num_layers")) + 1
        self.dim = width
        self.layer_dims = {FINAL: width, **{f"layer{i}": width for i in range(n_hidden)}}
        self.spec = format_spec(f"hf:{source}", opts, defaults)
        self.version = _fingerprint(self.model, config, {"tokenizer": type(self.tokenizer).__name__,
                                                         "vocab_size": len(self.tokenizer)})
        self.freeze(device)
        self.graph_name = format_spec(f"hf:{source}", without_backend(opts), defaults)
        self.use_backend(opts["backend"], opts["quantize"])

    @torch.inference_mode()
    def forward(self, batch: Sequence[str] | torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        return self.run_graph(self.model_inputs(batch), layers)

    def model_inputs(self, batch: Sequence[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids, attention mask (and token types where the tokenizer makes them), in the graph's order."""
        if isinstance(batch, torch.Tensor):  # ids from tokenize()
            enc = self.inputs_from_ids(batch)
        else:
            enc = self.tokenizer(list(batch), padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        return {k: enc[k] for k in TOKEN_INPUTS if k in enc}

    def graph_module(self, layers: Sequence[str]) -> torch.nn.Module:
        return HFTextLayers(self.model, layers)

    def graph(self, layers: Sequence[str]) -> Graph:
        """Two texts of different lengths as the example; batch and sequence axes vary."""
        inputs = self.model_inputs(["an emoji of a grinning face with big eyes", "a red heart"])
        return Graph(self.graph_module(layers), {k: v.to(self.device) for k, v in inputs.items()}, list(layers),
                     {k: {0: "batch", 1: "sequence"} for k in inputs}, {"sequence": int(self.max_length)})

    def config(self) -> dict[str, Any]:
        return {**super().config(), "pooling": "masked mean", "max_length": self.max_length,
                "layers": self.layer_dims}


class HFImageLayers(torch.nn.Module):
    """Pixels -> the requested layers pooled from the tower's hidden states: the graph every backend runs."""

    def __init__(self, model: torch.nn.Module, norm: torch.nn.Module | None, pooling: str, prefix: int,
                 kwargs: dict[str, Any], layers: Sequence[str], spec: str):
        super().__init__()
        self.model, self.norm = model, norm
        self.pooling, self.prefix, self.kwargs, self.layers, self.spec = pooling, prefix, dict(kwargs), list(layers), spec

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.model(pixel_values=pixel_values, output_hidden_states=True, **self.kwargs).hidden_states
        if hidden[-1].ndim != 3:
            raise ConfigError(f"{self.spec}: hidden states of shape {tuple(hidden[-1].shape)}; only token models "
                              "(ViT, DINOv2, CLIP/SigLIP vision) are supported")
        out = pool_hidden_states(hidden, self.layers, self.norm, self.pooling, self.prefix)
        return tuple(out[k] for k in self.layers)


class HFTextLayers(torch.nn.Module):
    """Token tensors -> masked means of the requested hidden states: the graph every backend runs."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[str]):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states
        return tuple(masked_mean(out.last_hidden_state if k == FINAL else hidden[int(k[5:])], attention_mask).float()
                     for k in self.layers)
