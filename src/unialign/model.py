"""AlignedModel: frozen unimodal encoders + one projection each into one shared space.

It is an ``nn.Module`` (``.to()``, ``.eval()``, ``.parameters()``, ``state_dict()``) with two front
ends that users already know:

- sentence-transformers' ``encode(inputs, batch_size=32, show_progress_bar=None, convert_to_numpy=True,
  convert_to_tensor=False, normalize_embeddings=False, device=None)``: raw inputs of any modality
  (strings, image paths or PIL images, vectors, ...), every keyword doing exactly what it says; a single
  input returns a 1-D vector;
- open_clip's ``encode_image(pixels, normalize=False)`` / ``encode_text(text, normalize=False)``,
  ``forward(image, text) -> (image_features, text_features, logit_scale.exp())`` and ``logit_scale``
  holding the *log* of the scale.

Save folder (``save_pretrained`` / ``from_pretrained``, as in transformers)::

    config.json          format, per modality: encoder (spec, version, dim), layers, projection config;
                         the log logit scale, the weights' checksum, how the model was made (info)
    model.safetensors    projection weights and buffers (the encoders are rebuilt from their specs)
    README.md            model card: what it is, how to load it, its evaluation table
    results/             evaluation records in CLIP_benchmark format, when evaluated

Loading needs only this package (torch, numpy, safetensors) and the encoders' own packages.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .device import pick_device
from .encoders import load_encoder
from .encoders.base import FINAL, Encoder
from .errors import ConfigError, UnialignError
from .io import read_json, sha256_file, write_json, write_text, atomic_path
from .projections import build_projection, projection_config
from .zeroshot import get_templates, zero_shot_classifier

FORMAT = "unialign-model/2"
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class AlignedModel(nn.Module):
    """Encode any of its modalities into one space; classify zero-shot; compare; save and load."""

    def __init__(self, encoders: Mapping[str, Encoder], projections: Mapping[str, nn.Module],
                 layers: Mapping[str, Sequence[str]] | None = None, logit_scale: float = 100.0,
                 info: dict[str, Any] | None = None):
        super().__init__()
        if set(encoders) != set(projections) or not encoders:
            raise UnialignError(f"encoders {sorted(encoders)} and projections {sorted(projections)} must name the "
                                "same (non-empty) set of modalities")
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projections = nn.ModuleDict(dict(projections))
        self.layers = {m: list((layers or {}).get(m, [FINAL])) for m in encoders}
        for m, enc in self.encoders.items():
            width = enc.width(self.layers[m])
            need = getattr(self.projections[m], "in_dim", width)
            if need != width:
                raise UnialignError(f"the {m} projection takes {need}-d features; {enc.spec} layers "
                                    f"{self.layers[m]} give {width}-d")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(float(logit_scale))), requires_grad=False)
        self.info = dict(info or {})
        self.to(next(iter(self.encoders.values())).device)
        self.eval()  # built from fitted projections: ready for inference (train() re-enables dropout)

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.encoders)

    @property
    def image_encoder(self) -> Encoder:
        return self._encoder("image")

    @property
    def text_encoder(self) -> Encoder:
        return self._encoder("text")

    def _encoder(self, modality: str) -> Encoder:
        if modality not in self.encoders:
            raise UnialignError(f"this model has no {modality} side; its modalities are {self.modalities}")
        return self.encoders[modality]

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def embedding_dim(self) -> int:
        """Width of the shared space."""
        m = self.modalities[0]
        return int(self.project(m, torch.zeros(1, self.encoders[m].width(self.layers[m])), normalize=False).shape[1])

    # -- features -> shared space -------------------------------------------------------------------
    @torch.inference_mode()
    def project(self, modality: str, features: Any, normalize: bool = True, batch_size: int = 65536) -> torch.Tensor:
        """Raw encoder features of ``modality`` (its layers concatenated, e.g. rows of a feature store)
        -> shared-space embeddings on the CPU, L2-normalised unless ``normalize=False``."""
        self._encoder(modality)
        proj = self.projections[modality]
        x = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features, dtype=np.float32))
        outs = []
        for s in range(0, len(x), batch_size):
            z = proj(x[s : s + batch_size].to(self.device).float()).float()
            outs.append((F.normalize(z, dim=-1) if normalize else z).cpu())
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    # -- raw inputs -> shared space (sentence-transformers) -----------------------------------------
    def encode(self, inputs: Any, modality: str | None = None, batch_size: int = 32,
               show_progress_bar: bool | None = None, convert_to_numpy: bool = True, convert_to_tensor: bool = False,
               normalize_embeddings: bool = False, device: str | torch.device | None = None) -> np.ndarray | torch.Tensor:
        """Embed raw inputs of one modality (inferred from the first input when not given: strings are
        text, PIL images and image paths (``pathlib.Path``) images). A single input gives a 1-D result.
        ``convert_to_tensor`` returns a torch tensor (on ``device`` if given) and wins over
        ``convert_to_numpy``; ``normalize_embeddings`` L2-normalises, so dot products are cosines."""
        self.eval()  # as sentence-transformers' encode: inference is never stochastic
        single = _is_single(inputs, modality)
        items = [inputs] if single else list(inputs)
        m = modality or self.infer_modality(items[0] if items else "")
        enc = self._encoder(m)
        feats = enc.encode(items, batch_size=batch_size, show_progress_bar=show_progress_bar, convert_to_numpy=False,
                           layers=self.layers[m])
        emb = self.project(m, feats, normalize=normalize_embeddings)
        if single:
            emb = emb[0]
        if convert_to_tensor:
            return emb.to(pick_device(device)) if device is not None else emb
        return emb.numpy() if convert_to_numpy else emb

    def infer_modality(self, item: Any) -> str:
        """The modality of one raw input, for ``encode`` without ``modality``."""
        if isinstance(item, str):
            guess = "text"
        elif hasattr(item, "getpixel") or (isinstance(item, os.PathLike) and Path(item).suffix.lower() in IMAGE_SUFFIXES):
            guess = "image"
        else:
            others = [m for m in self.modalities if m != "text"]
            if len(others) != 1:
                raise UnialignError(f"cannot tell the modality of a {type(item).__name__}; pass modality= "
                                    f"(one of {self.modalities})")
            guess = others[0]
        if guess not in self.encoders:
            raise UnialignError(f"a {type(item).__name__} looks like {guess}, which this model does not take; pass "
                                f"modality= (one of {self.modalities})")
        return guess

    # -- open_clip ----------------------------------------------------------------------------------
    def encode_image(self, image: Any, normalize: bool = False) -> torch.Tensor:
        """open_clip: preprocessed pixels (B, C, H, W) (or a list of PIL images / paths) -> (B, d)."""
        return self._encode_batch("image", image, normalize)

    def encode_text(self, text: Any, normalize: bool = False) -> torch.Tensor:
        """open_clip: token ids from :func:`unialign.openclip.create_model_and_transforms`'s tokenizer
        (or a list of strings) -> (B, d); another tokenizer's ids are refused with a clear error."""
        return self._encode_batch("text", text, normalize)

    @property
    def visual(self) -> "ImageTower":
        """open_clip's ``model.visual``: pixels -> image embeddings, with ``image_size``."""
        return ImageTower(self)

    @property
    def context_length(self) -> int:
        """open_clip's ``model.context_length``: the width of the tokenizer's output."""
        return int(self.text_encoder.context_length)

    def _encode_batch(self, modality: str, batch: Any, normalize: bool) -> torch.Tensor:
        enc = self._encoder(modality)
        batch = batch if isinstance(batch, torch.Tensor) else enc.collate([batch] if isinstance(batch, str) else list(batch))
        feats = enc.features(batch, self.layers[modality])
        return self.project(modality, feats, normalize=normalize).to(self.device)

    def forward(self, image: Any = None, text: Any = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """open_clip's ``CLIP.forward``: normalised features of each given side and the logit scale."""
        img = self.encode_image(image, normalize=True) if image is not None else None
        txt = self.encode_text(text, normalize=True) if text is not None else None
        return img, txt, self.logit_scale.exp()

    # -- zero-shot ------------------------------------------------------------------------------------
    def class_embeddings(self, labels: Sequence[str], templates: str | Sequence[str] = "plain",
                         batch_size: int = 256) -> torch.Tensor:
        """Zero-shot classifier weights (labels, d): :func:`unialign.zeroshot.zero_shot_classifier` over
        this model's text side."""
        return zero_shot_classifier(lambda p: self.encode(p, "text", batch_size=batch_size, convert_to_tensor=True),
                                    labels, get_templates(templates))

    def classify(self, inputs: Sequence[Any], labels: Sequence[str], templates: str | Sequence[str] = "plain",
                 modality: str | None = None, batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """For each input, every label ranked by probability (softmax at the model's logit scale)."""
        if not labels:
            raise UnialignError("classify needs at least one label")
        weights = self.class_embeddings(labels, templates)
        emb = self.encode(list(inputs), modality, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        probs = (self.logit_scale.exp().cpu() * emb.cpu() @ weights.T).softmax(-1)
        return [[(labels[j], float(row[j])) for j in torch.argsort(row, descending=True).tolist()] for row in probs]

    def match(self, images: Sequence[Any], texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """For each image and the text at the same position (or one image and each of several texts), the
        calibrated probability that they match: an image-text consistency check, where a swapped caption
        or image scores low. The calibration, ``P = sigmoid(a * cos + b)`` of the pair's cosine in the
        shared space, is fitted on validation pairs by ``unialign fuse consistency --save-calibration`` and
        kept in ``info["match"]``."""
        cal = self.info.get("match")
        if not cal:
            raise UnialignError("this model has no match calibration; fit one with `unialign fuse consistency "
                                "--model <folder> --save-calibration`")
        images, texts = list(images), [str(t) for t in texts]
        if len(images) != len(texts) and len(images) != 1:
            raise UnialignError(f"match takes pairs (or one image for several texts): got {len(images)} images "
                                f"and {len(texts)} texts")
        if not texts:
            return np.zeros(0)
        img = self.encode(images, "image", batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        txt = self.encode(texts, "text", batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
        cos = (img.cpu() * txt.cpu()).sum(-1).double()  # one image row broadcasts over the texts
        return torch.sigmoid(float(cal["a"]) * cos + float(cal["b"])).numpy()

    @staticmethod
    def similarity(a: Any, b: Any) -> torch.Tensor:
        """Cosine similarity matrix between two sets of embeddings."""
        a, b = (torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float() for x in (a, b))
        return F.normalize(torch.atleast_2d(a), dim=-1) @ F.normalize(torch.atleast_2d(b), dim=-1).T

    # -- persistence ----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "modalities": {m: {"encoder": self.encoders[m].config(), "layers": self.layers[m],
                               "projection": projection_config(self.projections[m])} for m in self.modalities},
            "logit_scale": float(self.logit_scale.item()),
            "info": self.info,
        }

    def save_pretrained(self, folder: str | os.PathLike, results: Sequence[dict[str, Any]] | None = None) -> Path:
        """Write the model folder (see the module doc); ``results``: evaluation records to keep beside it."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("encoders.")}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        config = {**self.config(), "weights_sha256": sha256_file(folder / WEIGHTS_NAME)}
        write_json(folder / CONFIG_NAME, config)
        if results is not None:
            from .results import write_results  # lean: only for evaluated models

            write_results(folder / "results", results)
        write_text(folder / "README.md", model_card(config, results))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None) -> "AlignedModel":
        """Load a folder written by :meth:`save_pretrained`; every problem is one clear error."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.exists():
            raise UnialignError(f"{folder} is not a saved unialign model (no {CONFIG_NAME})")
        try:
            cfg = read_json(cfg_path)
        except ValueError as e:
            raise UnialignError(f"{cfg_path}: not valid JSON ({e}); the model folder is corrupt") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            got = cfg.get("format") if isinstance(cfg, dict) else None
            raise UnialignError(f"{folder}: unsupported model format {got!r} (expected {FORMAT})")
        weights = folder / WEIGHTS_NAME
        if not weights.exists():
            raise UnialignError(f"{folder}: {WEIGHTS_NAME} is missing; the model folder is incomplete")
        if cfg.get("weights_sha256") and sha256_file(weights) != cfg["weights_sha256"]:
            raise UnialignError(f"{folder}: checksum mismatch in {WEIGHTS_NAME} (file changed or corrupt)")
        dev = pick_device(device)
        encoders, projections, layers = {}, {}, {}
        for m, part in cfg["modalities"].items():
            ecfg = part["encoder"]
            try:
                enc = load_encoder(ecfg["spec"], device=dev)
            except ConfigError as e:
                raise UnialignError(f"{folder}: cannot load the {m} encoder: {e}") from None
            if enc.version != ecfg.get("version"):
                warnings.warn(f"{folder}: {m} encoder {ecfg['spec']} has version {enc.version}, the model was trained "
                              f"on {ecfg.get('version')}; embeddings may not match", stacklevel=2)
            if ecfg.get("dim") is not None and enc.dim != ecfg["dim"]:
                raise UnialignError(f"{folder}: {m} encoder {ecfg['spec']} gives {enc.dim}-d features, the model "
                                    f"was trained on {ecfg['dim']}-d ones; load it with the encoder it was trained with")
            encoders[m], layers[m] = enc, part.get("layers", [FINAL])
            projections[m] = build_projection(part["projection"])
        model = cls(encoders, projections, layers, info=cfg.get("info"))
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise UnialignError(f"{folder}: {WEIGHTS_NAME} is not readable ({_last_line(e)})") from None
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensors of other shapes: the weights of another model
            raise UnialignError(f"{folder}: {WEIGHTS_NAME} does not match {CONFIG_NAME} "
                                f"({' '.join(str(e).split())[:300]})") from None
        missing = [k for k in missing if not k.startswith("encoders.")]
        if missing or unexpected:
            raise UnialignError(f"{folder}: {WEIGHTS_NAME} does not match {CONFIG_NAME} (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]})")
        return model.to(dev).eval()


class ImageTower(nn.Module):
    """A view on an AlignedModel's image side as open_clip's ``model.visual`` (``visual(pixels)`` is
    ``encode_image(pixels)``). It registers no modules of its own, so the model's state is unchanged."""

    def __init__(self, model: AlignedModel):
        super().__init__()
        self.__dict__["_model"] = model  # not a submodule: no second copy in state_dict / parameters

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) of the pixels the preprocess transform makes (None when it does not say)."""
        size = getattr(getattr(self._model.image_encoder.loader(), "transform", None), "size", None)
        return (int(size[0]), int(size[1])) if size is not None else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._model.encode_image(pixels)


def _is_single(inputs: Any, modality: str | None) -> bool:
    """One raw input rather than a batch: a string, a path, a PIL image, a 1-D vector, a CHW tensor."""
    if isinstance(inputs, (str, bytes, os.PathLike)) or hasattr(inputs, "getpixel"):
        return True
    if isinstance(inputs, (np.ndarray, torch.Tensor)):
        return inputs.ndim == (3 if modality == "image" else 1)
    return False


def _last_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def model_card(config: dict[str, Any], results: Sequence[dict[str, Any]] | None) -> str:
    """A short README for the save folder."""
    lines = ["# unialign aligned model", "",
             "Frozen unimodal encoders joined by projections into one shared embedding space (CLIP-style).", ""]
    for m, part in config["modalities"].items():
        e = part["encoder"]
        lines.append(f"- {m}: encoder `{e['spec']}` (version {e.get('version')}, layers {part['layers']}), projection "
                     f"`{json.dumps(part['projection'], sort_keys=True)[:200]}`")
    example = {"image": "['cat.png']", "text": "['a cat']"}
    lines += ["", "```python", "from unialign import AlignedModel", "model = AlignedModel.from_pretrained('.')"]
    lines += [f"{m} = model.encode({example.get(m, '[...]')}, modality={m!r}, normalize_embeddings=True)"
              for m in config["modalities"]]
    lines += ["print(model.similarity(" + ", ".join(list(config["modalities"])[:2]) + "))", "```", ""]
    if results:
        from .results import markdown_table

        lines += ["## Evaluation", "", markdown_table(results), ""]
    return "\n".join(lines)


__all__ = ["AlignedModel", "CONFIG_NAME", "FORMAT", "ImageTower", "WEIGHTS_NAME", "model_card"]
