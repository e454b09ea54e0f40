"""AlignedModel: two frozen encoders + a trained (or closed-form) projection into one shared space.

Save folder (explains itself)::

    config.json            encoders (spec, version, layers), projection kind and hyper-parameters
    projection.safetensors head weights, or the closed-form map's arrays
    results.json           evaluation results, if any
    README.md              model card: what it is, how to load it, its evaluation table

Loading needs only this module and the encoders, no training code.
"""
from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .align.heads import HeadPair
from .device import pick_device
from .encoders import load_encoder
from .encoders.base import FINAL, Encoder
from .errors import UnialignError
from .evaluate.templates import get_templates
from .io import atomic_path, read_json, sha256_file, write_json, write_text

FORMAT = "unialign-model/1"


class ClosedFormProjection:
    """Adapter giving a closed-form aligner (ASIF, Procrustes, ...) the projection interface."""

    def __init__(self, aligner: Any):
        self.aligner = aligner

    def project_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.aligner.transform_image(x.detach().cpu().float().numpy()))

    def project_text(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.aligner.transform_text(x.detach().cpu().float().numpy()))


def make_projection(kind: str, config: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    if kind == "heads":
        heads = HeadPair.from_config(config)
        heads.load_state_dict(state)
        return heads.eval()
    if kind == "closed_form":
        from .align.closed_form import closed_form_from_state

        return ClosedFormProjection(closed_form_from_state(config["name"], config["params"], state))
    raise UnialignError(f"unknown projection kind {kind!r} in model config")


class AlignedModel:
    """Encode images and texts into one space; classify zero-shot; compare; save and load."""

    def __init__(self, image_encoder: Encoder, text_encoder: Encoder, projection: Any,
                 image_layers: Sequence[str] = (FINAL,), text_layers: Sequence[str] = (FINAL,),
                 logit_scale: float = 100.0, info: dict[str, Any] | None = None):
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.projection = projection
        self.image_layers, self.text_layers = list(image_layers), list(text_layers)
        self.logit_scale = float(logit_scale)
        self.info = dict(info or {})
        self.device = image_encoder.device
        if isinstance(projection, torch.nn.Module):
            projection.to(self.device).eval()

    @functools.cached_property
    def embedding_dim(self) -> int:
        """Width of the shared space, found by projecting one zero text-feature row (heads and
        closed-form maps alike, without knowing how either computes its output)."""
        width = sum(self.text_encoder.layer_dims[l] for l in self.text_layers)
        return int(self.project_text_features(np.zeros((1, width), np.float32)).shape[1])

    # -- features -> shared space ---------------------------------------------------------------
    @torch.inference_mode()
    def project_image_features(self, feats: np.ndarray | torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        """Cached image features (concatenated layers) -> normalised shared-space embeddings."""
        return self._project(self.projection.project_image, feats, batch_size)

    @torch.inference_mode()
    def project_text_features(self, feats: np.ndarray | torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
        return self._project(self.projection.project_text, feats, batch_size)

    def _project(self, fn: Any, feats: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(feats, dtype=np.float32) if not isinstance(feats, torch.Tensor) else feats)
        # heads run on the encoders' device; closed-form maps are numpy, so their input stays on the CPU
        device = self.device if isinstance(self.projection, torch.nn.Module) else "cpu"
        outs = [F.normalize(fn(x[s : s + batch_size].to(device).float()).float(), dim=-1).cpu()
                for s in range(0, len(x), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, 0)

    # -- raw inputs -> shared space -------------------------------------------------------------
    def encode_image(self, images: Sequence[Any], batch_size: int = 32, show_progress_bar: bool | None = None,
                     convert_to_numpy: bool = True, normalize_embeddings: bool = True) -> np.ndarray | torch.Tensor:
        """PIL images, paths or preprocessed tensors -> embeddings (normalised by default)."""
        feats = self.image_encoder.encode(list(images), batch_size=batch_size, show_progress_bar=show_progress_bar,
                                          convert_to_numpy=False, layers=self.image_layers)
        return self._finish(self.project_image_features(feats), convert_to_numpy, normalize_embeddings)

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 32, show_progress_bar: bool | None = None,
                    convert_to_numpy: bool = True, normalize_embeddings: bool = True) -> np.ndarray | torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        feats = self.text_encoder.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                         convert_to_numpy=False, layers=self.text_layers)
        return self._finish(self.project_text_features(feats), convert_to_numpy, normalize_embeddings)

    @staticmethod
    def _finish(emb: torch.Tensor, convert_to_numpy: bool, normalize: bool) -> np.ndarray | torch.Tensor:
        # embeddings come out of _project normalised; "unnormalised" keeps that (heads' raw norm is meaningless)
        return emb.numpy() if convert_to_numpy else emb

    def class_embeddings(self, labels: Sequence[str], templates: str | Sequence[str] = "plain",
                         batch_size: int = 256) -> torch.Tensor:
        """Zero-shot classifier weights: each label through every template, averaged, renormalised."""
        temps = get_templates(templates if isinstance(templates, str) else list(templates))
        prompts = [t.format(l) for l in labels for t in temps]
        emb = self.encode_text(prompts, batch_size=batch_size, convert_to_numpy=False)
        return F.normalize(emb.view(len(labels), len(temps), -1).mean(1), dim=-1)

    def classify(self, images: Sequence[Any], labels: Sequence[str], templates: str | Sequence[str] = "plain",
                 batch_size: int = 32) -> list[list[tuple[str, float]]]:
        """For each image, all labels ranked by probability (softmax over the learned logit scale)."""
        if not labels:
            raise UnialignError("classify needs at least one label")
        weights = self.class_embeddings(labels, templates)
        img = self.encode_image(images, batch_size=batch_size, convert_to_numpy=False)
        probs = (self.logit_scale * img @ weights.T).softmax(-1)
        ranked = []
        for row in probs:
            order = torch.argsort(row, descending=True).tolist()
            ranked.append([(labels[j], float(row[j])) for j in order])
        return ranked

    @staticmethod
    def similarity(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix between two sets of embeddings."""
        a, b = torch.as_tensor(np.asarray(a)).float(), torch.as_tensor(np.asarray(b)).float()
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    # -- persistence ------------------------------------------------------------------------------
    def _projection_payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if isinstance(self.projection, HeadPair):
            state = {k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()}
            return {"kind": "heads", "config": self.projection.config()}, state
        if isinstance(self.projection, ClosedFormProjection):
            al = self.projection.aligner
            state = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in al.state_dict().items()}
            return {"kind": "closed_form", "config": {"name": al.name, "params": al.config()}}, state
        raise UnialignError(f"cannot save projection of type {type(self.projection).__name__}")

    def save(self, folder: str | Path, results: dict[str, Any] | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        proj_cfg, state = self._projection_payload()
        with atomic_path(folder / "projection.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "image_encoder": {**self.image_encoder.config(), "layers": self.image_layers},
            "text_encoder": {**self.text_encoder.config(), "layers": self.text_layers},
            "projection": proj_cfg,
            "projection_sha256": sha256_file(folder / "projection.safetensors"),  # verified on load
            "logit_scale": self.logit_scale,
            "info": self.info,
        }
        write_json(folder / "config.json", config)
        if results is not None:
            write_json(folder / "results.json", results)
        write_text(folder / "README.md", model_card(config, results))
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> "AlignedModel":
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.exists():
            raise UnialignError(f"{folder} is not a saved unialign model (no config.json)")
        try:
            cfg = read_json(cfg_path)
        except ValueError as e:
            raise UnialignError(f"{cfg_path}: not valid JSON ({e}); the model folder is corrupt") from None
        if cfg.get("format") != FORMAT:
            raise UnialignError(f"{folder}: unsupported model format {cfg.get('format')!r} (expected {FORMAT})")
        dev = pick_device(device)
        encoders = []
        for key in ("image_encoder", "text_encoder"):
            ecfg = cfg[key]
            enc = load_encoder(ecfg["spec"], device=dev)
            if enc.version != ecfg.get("version"):
                warnings.warn(f"{folder}: {key} {ecfg['spec']} has version {enc.version}, the model was trained on "
                              f"{ecfg.get('version')}; embeddings may not match", stacklevel=2)
            enc.check_layers(ecfg.get("layers", [FINAL]))
            if ecfg.get("dim") is not None and enc.dim != ecfg["dim"]:
                raise UnialignError(f"{folder}: {key} {ecfg['spec']} gives {enc.dim}-d features, the model was "
                                    f"trained on {ecfg['dim']}-d ones; load it with the encoder it was trained with")
            encoders.append(enc)
        proj_path = folder / "projection.safetensors"
        if not proj_path.exists():
            raise UnialignError(f"{folder}: projection.safetensors is missing; the model folder is incomplete")
        if cfg.get("projection_sha256") and sha256_file(proj_path) != cfg["projection_sha256"]:
            raise UnialignError(f"{folder}: checksum mismatch in projection.safetensors (file changed or corrupt)")
        try:
            state = load_file(str(proj_path))
            projection = make_projection(cfg["projection"]["kind"], cfg["projection"]["config"], state)
        except UnialignError:
            raise
        except Exception as e:  # safetensors / torch errors: a corrupt file or one of another model
            reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise UnialignError(f"{folder}: projection.safetensors does not match config.json ({reason})") from None
        if isinstance(projection, HeadPair):
            for tower, enc, key in ((projection.image, encoders[0], "image_encoder"), (projection.text, encoders[1], "text_encoder")):
                need = sum(enc.layer_dims[l] for l in cfg[key].get("layers", [FINAL]))
                if tower.in_dim != need:
                    raise UnialignError(f"{folder}: the {key.split('_')[0]} head expects {tower.in_dim}-d features, "
                                        f"{cfg[key]['spec']} gives {need}-d")
        return cls(encoders[0], encoders[1], projection, cfg["image_encoder"].get("layers", [FINAL]),
                   cfg["text_encoder"].get("layers", [FINAL]), cfg.get("logit_scale", 100.0), cfg.get("info"))


def model_card(config: dict[str, Any], results: dict[str, Any] | None) -> str:
    """A short README for the save folder."""
    from .evaluate.report import markdown_table

    proj = config["projection"]
    lines = [
        "# unialign aligned model",
        "",
        "Two frozen unimodal encoders joined by a learned projection into one shared embedding space (CLIP-style).",
        "",
        f"- image encoder: `{config['image_encoder']['spec']}` (version {config['image_encoder'].get('version')}, "
        f"layers {config['image_encoder']['layers']})",
        f"- text encoder: `{config['text_encoder']['spec']}` (version {config['text_encoder'].get('version')}, "
        f"layers {config['text_encoder']['layers']})",
        f"- projection: {proj['kind']} `{json.dumps(proj['config'], sort_keys=True)[:300]}`",
        "",
        "```python",
        "from unialign import AlignedModel",
        "model = AlignedModel.load('.')",
        "img = model.encode_image(['cat.png'])",
        "txt = model.encode_text(['a cat'])",
        "print(model.similarity(img, txt))",
        "```",
        "",
    ]
    if results:
        lines += ["## Evaluation", "", markdown_table(results), ""]
    return "\n".join(lines)
