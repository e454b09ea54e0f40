"""sentence-transformers modules for an exported unialign model (``unialign export``).

An exported folder is a ``SentenceTransformer`` whose ``encode`` takes PIL images (or image file paths)
and strings, like ``clip-ViT-B-32``. It uses sentence-transformers' own modules wherever they compute
the same numbers (the text encoder's Transformer and Pooling, ``Dense`` for linear heads and maps,
``Normalize``) and the classes below where unialign's code is needed:

- :class:`EfficientNetImage`, :class:`HFVisionImage`: images -> the pooled layers unialign's image
  encoder reads (its own transform, backbone and pooling);
- :class:`Projection`: any unialign projection (a trained head, an ASIF anchor map, a linear map) on
  the features before it;
- :class:`ModalityRouter`: sentence-transformers' ``Router`` (one route per modality), which also
  encodes a batch that mixes images and strings, route by route.

This file is copied verbatim into the folder next to the files it imports (``heads.py``, ``maps.py``,
``imaging.py``, ``pooling.py``), so loading needs ``trust_remote_code=True`` and no unialign: the
folder's ``modules.json`` names these classes ``st_modules.<Class>``. It needs sentence-transformers 6.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from sentence_transformers.base.modality import format_modality, infer_modality
from sentence_transformers.base.modules.input_module import InputModule
from sentence_transformers.base.modules.module import Module
from sentence_transformers.base.modules.router import Router
from sentence_transformers.util import batch_to_device

from .compose import projection_types
from .imaging import ImageTransform, open_image
from .pooling import effnet_features, final_norm, layer_features, pool_hidden_states

PROJECTIONS: dict[str, type[torch.nn.Module]] = projection_types()  # Tower, LinearMap, AnchorMap, LayerScale, Chain, WeightedConcat
HUB_KEYS = ("token", "cache_folder", "revision", "local_files_only")
FILE_MODULE = __name__.rsplit(".", 1)[-1]  # "st_modules", however the file was imported


def local_reference(class_ref: str) -> str:
    """How a folder's ``modules.json`` / ``router_config.json`` must name a class of this file:
    ``st_modules.<Class>``, the file at the folder's root, wherever it was imported from (unialign's
    tree when exporting, transformers' module cache after loading); other references unchanged."""
    prefix = __name__ + "."
    return FILE_MODULE + "." + class_ref[len(prefix):] if class_ref.startswith(prefix) else class_ref


def _hub(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KEYS if k in kwargs}


class Projection(Module):
    """A unialign projection (``Tower``, ``AnchorMap`` or ``LinearMap``) as a sentence-transformers module.

    Its input is the concatenation of ``layers`` (``"final"``: the ``sentence_embedding`` the modules
    before it made; ``"layerK"``: the masked mean of text hidden state K), its output the new
    ``sentence_embedding`` (unnormalised: a ``Normalize`` module follows)."""

    config_keys = ["projection", "layers"]

    def __init__(self, projection: dict[str, Any], layers: Sequence[str] = ("final",)):
        super().__init__()
        self.projection, self.layers = dict(projection), list(layers)
        options = {k: v for k, v in self.projection.items() if k != "type"}
        self.net = PROJECTIONS[self.projection["type"]](**options)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        parts = layer_features(features, self.layers)
        features["sentence_embedding"] = self.net(torch.cat([parts[k] for k in self.layers], dim=1)).float()
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.net.out_dim)

    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> "Projection":
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **_hub(kwargs))
        module = cls(**config)
        cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **_hub(kwargs))
        return module.eval()


def as_image(item: Any) -> Image.Image:
    """One image input as sentence-transformers passes it: a PIL image, a local file path (decoded
    with its EXIF rotation, as unialign decodes files) or an (H, W, C) uint8 array."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str) and item.startswith(("http://", "https://", "data:")):
        raise ValueError(f"image URLs are not fetched here; download the image and pass it as a PIL image: {item[:80]}")
    if isinstance(item, (str, os.PathLike)):
        return open_image(item)
    if isinstance(item, np.ndarray) and item.ndim == 3 and item.dtype == np.uint8:
        return Image.fromarray(item)
    raise ValueError(f"an image input is a PIL image, an image file path or an (H, W, C) uint8 array; "
                     f"got a {type(item).__name__}")


class ImageEncoder(InputModule):
    """Images -> ``pixel_values`` (:meth:`preprocess`, unialign's :class:`ImageTransform`) -> the
    backbone's pooled ``layers``, concatenated, as ``sentence_embedding`` (:meth:`forward`)."""

    config_file_name = "unialign_image_config.json"  # a Hugging Face backbone saves its own config.json
    save_in_root = False

    def __init__(self, transform: dict[str, Any], layers: Sequence[str], dim: int):
        super().__init__()
        self.transform, self.layers, self.dim = dict(transform), list(layers), int(dim)
        self.image_transform = ImageTransform.from_config(self.transform)

    @property
    def modalities(self) -> list[str]:
        return ["image"]

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        return {"pixel_values": torch.stack([self.image_transform(as_image(x)) for x in inputs])}

    def pooled(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        out = self.pooled(features["pixel_values"])
        features["sentence_embedding"] = torch.cat([out[k] for k in self.layers], dim=1)
        return features

    def get_embedding_dimension(self) -> int:
        return self.dim

    get_sentence_embedding_dimension = get_embedding_dimension

    def train(self, mode: bool = True) -> "ImageEncoder":
        """The backbone is frozen: eval mode (batch norm statistics fixed) whatever its parent does."""
        return super().train(False)


class EfficientNetImage(ImageEncoder):
    """An EfficientNet-Lite backbone (architecture from ``efficientnet_lite_pytorch``, weights from this
    module's ``model.safetensors``: no weights package needed)."""

    config_keys = ["model_name", "image_size", "transform", "layers", "dim"]

    def __init__(self, model_name: str, image_size: int, transform: dict[str, Any], layers: Sequence[str], dim: int):
        super().__init__(transform, layers, dim)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError("this model's image encoder needs: pip install efficientnet-lite-pytorch") from None
        self.model_name, self.image_size = str(model_name), int(image_size)
        self.net = EfficientNet.from_name(self.model_name, image_size=self.image_size)
        self.net.requires_grad_(False)
        self.eval()

    def pooled(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return effnet_features(self.net, pixels, self.layers)

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> "EfficientNetImage":
        module = cls(**cls.load_config(model_name_or_path, subfolder=subfolder, **_hub(kwargs)))
        cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **_hub(kwargs))
        return module


class HFVisionImage(ImageEncoder):
    """A Hugging Face ViT-family vision model (saved beside this module's config with
    ``save_pretrained``), its hidden states normalised by the model's final norm and pooled
    (``cls``, ``mean`` of the patch tokens after ``prefix`` special tokens, or ``cls+mean``)."""

    config_keys = ["pooling", "prefix", "model_kwargs", "transform", "layers", "dim"]

    def __init__(self, pooling: str, prefix: int, transform: dict[str, Any], layers: Sequence[str], dim: int,
                 model_kwargs: dict[str, Any] | None = None, model: torch.nn.Module | None = None):
        super().__init__(transform, layers, dim)
        if model is None:
            raise ValueError("HFVisionImage is built with its vision model; load it with HFVisionImage.load")
        self.pooling, self.prefix, self.model_kwargs = str(pooling), int(prefix), dict(model_kwargs or {})
        self.model = model.requires_grad_(False)
        self.norm = final_norm(self.model)
        self.eval()

    def pooled(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.model(pixel_values=pixels, output_hidden_states=True, **self.model_kwargs).hidden_states
        return pool_hidden_states(hidden, self.layers, self.norm, self.pooling, self.prefix)

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> "HFVisionImage":
        from transformers import AutoModel

        folder = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **_hub(kwargs))
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
        return cls(**cls.load_config(model_name_or_path, subfolder=subfolder, **_hub(kwargs)), model=model)


class ModalityRouter(Router):
    """sentence-transformers' ``Router`` with one route per modality (``"image"``, ``"text"``), which
    also takes a batch mixing them: ``encode([pil_image, "a cat face"])``.

    sentence-transformers 6 calls a mixed batch a ``"message"`` batch and refuses it unless the first
    module lists that modality; this router lists it, splits such a batch by each input's modality
    (sentence-transformers' own ``infer_modality``), runs every part through its route and puts the
    embeddings back in input order. Each input is embedded by its own route alone, so its embedding is
    the one a single-modality batch gives. Chat messages and multi-part inputs are refused."""

    @property
    def modalities(self) -> list[Any]:
        return [*super().modalities, "message"]

    def _modality_of(self, item: Any) -> str:
        modality = infer_modality(item, supported_modalities=list(self.sub_modules))
        if modality not in self.sub_modules:
            raise ValueError(f"this model embeds one modality per input ({', '.join(self.sub_modules)}); got a "
                             f"{format_modality(modality)} input ({type(item).__name__})")
        return modality

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None,
                   modality: Any = None, **kwargs: Any) -> dict[str, Any]:
        if modality is not None or not inputs:
            return super().preprocess(inputs, prompt=prompt, task=task, modality=modality, **kwargs)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(inputs):
            groups.setdefault(self._modality_of(item), []).append(i)
        if len(groups) == 1:
            return super().preprocess(inputs, prompt=prompt, task=task, modality=next(iter(groups)), **kwargs)
        parts = []
        for m, idx in groups.items():
            parts.append((idx, super().preprocess([inputs[i] for i in idx], prompt=prompt, task=task, modality=m, **kwargs)))
        return {"parts": parts, "batch_size": len(inputs)}

    def forward(self, features: dict[str, Any], task: str | None = None, modality: Any = None,
                **kwargs: Any) -> dict[str, Any]:
        if "parts" not in features:
            return super().forward(features, task=task, modality=modality, **kwargs)
        device = next(self.parameters()).device
        out: torch.Tensor | None = None
        for idx, part in features["parts"]:
            emb = super().forward(batch_to_device(part, device), task=task, **kwargs)["sentence_embedding"]
            if out is None:
                out = emb.new_empty(features["batch_size"], emb.shape[1])
            out[torch.as_tensor(idx, device=emb.device)] = emb
        return {"sentence_embedding": out}

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        """Router's save, with this file's classes named as the folder's ``st_modules.<Class>``, so a
        loaded model saved again still loads (sentence-transformers copies this file to the root)."""
        super().save(output_path, *args, **kwargs)
        path = os.path.join(output_path, self.config_file_name)
        with open(path, encoding="utf8") as f:
            config = json.load(f)
        config["types"] = {k: local_reference(v) for k, v in config["types"].items()}
        with open(path, "w", encoding="utf8") as f:
            json.dump(config, f, indent=4)


__all__ = ["EfficientNetImage", "HFVisionImage", "ImageEncoder", "ModalityRouter", "Projection", "as_image",
           "local_reference"]
