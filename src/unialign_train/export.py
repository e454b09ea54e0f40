"""``unialign export``: a saved model as a sentence-transformers folder that embeds images and strings.

``SentenceTransformer(out, trust_remote_code=...).encode([pil_image, "a cat face"])`` gives the
normalised shared-space embeddings ``AlignedModel.encode(..., normalize_embeddings=True)`` gives, in a
process that never imports unialign. The folder is sentence-transformers' own modules wherever they
compute the same numbers, and :mod:`unialign.standalone.st_modules` where unialign's code is needed;
that file and the standalone files it imports (heads, maps, image transform, pooling: the code
unialign itself runs) are copied verbatim into the folder. Per modality, one route::

    text    the st: encoder's own modules (Transformer, Pooling, any Dense; minus its trailing Normalize)
            -> projection
    image   EfficientNetImage (effnet-lite*: efficientnet_lite_pytorch's architecture, the weights in the
            folder) or HFVisionImage (hf: ViT-family towers, saved with save_pretrained) -> projection

    projection  a trained linear head on one input        -> ST Dense (Standardize folded into it)
                a linear map (Procrustes, lstsq, CCA)     -> ST Normalize + ST Dense (centring folded in)
                anything else (MLP/residual/star/layermix heads, ASIF anchor maps, text layer mixing)
                                                          -> st_modules.Projection (unialign's module)

Two routes sit in an ``st_modules.ModalityRouter`` (sentence-transformers' Router, plus batches that mix
images and strings); one route is a plain module list. ``Normalize`` ends every export. Loading needs
``trust_remote_code=True`` exactly when a module of ``st_modules`` is in the folder: always with an
image side, for a text-only export only when its projection is not a plain Dense. The folder's
README.md says which and why.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from unialign.errors import UnialignError
from unialign.io import atomic_path, write_text

EXPORTABLE = ("image", "text")
SUPPORTED = "st: text encoders; effnet-lite* and hf: (ViT-family) image encoders"


def export_sentence_transformers(model: Any, out: str | Path, modalities: Sequence[str] | None = None,
                                 fold_linear: bool = True) -> Path:
    """Write ``model`` (an :class:`~unialign.model.AlignedModel`) as a SentenceTransformer folder.

    ``modalities``: the sides to export (default: all of the model's); ``fold_linear=False`` keeps
    linear heads and maps as unialign modules instead of folding them into sentence-transformers'
    ``Dense``. Anything that cannot be exported is refused with a one-line :class:`UnialignError`
    before anything is written."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize

    from unialign.standalone.st_modules import ModalityRouter

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UnialignError(f"export: {out} is not empty; choose a new folder")
    mods = check_exportable(model, modalities)
    device = model.device
    try:
        routes = {m: route(model, m, fold_linear) for m in mods}
        first: list[torch.nn.Module] = (routes[mods[0]] if len(mods) == 1
                                        else [ModalityRouter(routes, default_route=mods[0], allow_empty_key=False)])
        st = SentenceTransformer(modules=[*first, Normalize()], device="cpu", similarity_fn_name="cosine")
        st.save(str(out), create_model_card=False)
    finally:
        model.to(device)  # routes share the encoders' modules (moved to the CPU): put them back where they ran
    remote = write_code(out)
    info = export_info(model, mods, routes, remote)
    write_text(out / "unialign_export.json", json.dumps(info, indent=2, default=str) + "\n")
    write_text(out / "README.md", readme(info))
    return out


def check_exportable(model: Any, modalities: Sequence[str] | None) -> list[str]:
    """The modalities to export, in the model's order; a one-line error for any that cannot be."""
    mods = list(modalities) if modalities else list(model.modalities)
    unknown = [m for m in mods if m not in model.modalities]
    if unknown:
        raise UnialignError(f"export: this model has no {', '.join(unknown)} side; its modalities are "
                            f"{', '.join(model.modalities)}")
    for m in mods:
        if m not in EXPORTABLE:
            others = [x for x in model.modalities if x in EXPORTABLE]
            hint = f"; export the other side alone with --modalities {','.join(others)}" if others else ""
            raise UnialignError(f"export: the {m} side cannot be exported (sentence-transformers takes images and "
                                f"strings){hint}")
        if encoder_kind(model.encoders[m]) is None:
            raise UnialignError(f"export: the {m} encoder {model.encoders[m].spec} cannot be exported to "
                                f"sentence-transformers; exportable: {SUPPORTED}")
    return [m for m in model.modalities if m in mods]


def encoder_kind(encoder: Any) -> str | None:
    """``"st"``, ``"effnet"`` or ``"hf-image"`` for the encoders an export can carry, else None."""
    from unialign.encoders.effnet import EfficientNetLiteEncoder
    from unialign.encoders.hf import HFImageEncoder
    from unialign.encoders.st import SentenceTransformerEncoder

    if isinstance(encoder, SentenceTransformerEncoder):
        return "st"
    if isinstance(encoder, EfficientNetLiteEncoder):
        return "effnet"
    if isinstance(encoder, HFImageEncoder):
        return "hf-image"
    return None


def route(model: Any, modality: str, fold_linear: bool) -> list[torch.nn.Module]:
    """One modality's modules: its encoder, then its projection (on CPU, in eval mode)."""
    enc, layers = model.encoders[modality], list(model.layers[modality])
    proj = model.projections[modality].cpu().eval()
    if encoder_kind(enc) == "st":  # ST's own modules; layer mixing is read from their outputs by Projection
        return [*(m.cpu() for m in enc.pipeline), *projection_modules(proj, layers, fold_linear)]
    return [image_module(enc, layers), *projection_modules(proj, ["final"], fold_linear)]


def image_module(enc: Any, layers: list[str]) -> torch.nn.Module:
    """The image encoder as an ``st_modules`` input module: the same transform, backbone and pooling."""
    from unialign.encoders import parse_spec
    from unialign.encoders.effnet import VARIANTS
    from unialign.standalone.st_modules import EfficientNetImage, HFVisionImage

    common = {"transform": enc.transform.config(), "layers": layers, "dim": enc.width(layers)}
    if encoder_kind(enc) == "effnet":
        module = EfficientNetImage(VARIANTS[parse_spec(enc.spec)[0]][0], enc.image_size, **common)
        module.net.load_state_dict(enc.model.state_dict())
        return module
    return HFVisionImage(enc.pooling, enc.prefix, model_kwargs=dict(enc._kwargs), model=enc.model.cpu(), **common)


def projection_modules(proj: torch.nn.Module, layers: list[str], fold_linear: bool) -> list[torch.nn.Module]:
    """sentence-transformers' Dense (after Normalize for a linear map) where the projection is one affine
    map of one input, else unialign's module (bit-identical parameters)."""
    from sentence_transformers.base.modules.normalize import Normalize

    from unialign.projections import LinearMap, Tower, projection_config
    from unialign.projections.heads import LinearHead
    from unialign.standalone.st_modules import Projection

    if fold_linear and layers == ["final"]:
        if isinstance(proj, Tower) and isinstance(proj.head, LinearHead):
            return [folded_dense(proj)]
        if isinstance(proj, LinearMap):
            return [Normalize(), map_dense(proj)]
    module = Projection(projection_config(proj), layers)
    module.net.load_state_dict(proj.state_dict())
    return [module.eval()]


def dense(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Module:
    """A sentence-transformers Dense computing ``weight @ x + bias`` (float64 in, float32 stored)."""
    from sentence_transformers.base.modules.dense import Dense

    layer = Dense(weight.shape[1], weight.shape[0], bias=True, activation_function=torch.nn.Identity())
    with torch.no_grad():
        layer.linear.weight.copy_(weight.float())
        layer.linear.bias.copy_(bias.float())
    return layer


def folded_dense(tower: Any) -> torch.nn.Module:
    """A linear Tower on one input, ``W (x - m) / s + b``, as one Dense: ``(W / s) x + (b - W m / s)``."""
    lin = tower.head.proj
    w = lin.weight.detach().double()
    mean, std = tower.standardize.mean.detach().double(), tower.standardize.std.detach().double()
    wf = w / std[None, :]
    bias = lin.bias.detach().double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return dense(wf, bias - wf @ mean)


def map_dense(linear_map: Any) -> torch.nn.Module:
    """A LinearMap after its input normalisation, ``(x - m) @ W``, as one Dense: ``W^T x - W^T m``."""
    mean = linear_map.mean.detach().double()
    w = (torch.eye(linear_map.in_dim, dtype=torch.float64) if linear_map.identity
         else linear_map.weight.detach().double())
    return dense(w.T, -(mean @ w))


def write_code(out: Path) -> bool:
    """Copy ``st_modules.py`` and the files it imports into ``out`` and name its classes there, when the
    folder uses any; True when it does (loading then needs ``trust_remote_code=True``)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from unialign.standalone import st_modules

    refs = [m["type"] for m in json.loads((out / "modules.json").read_text())]
    router = out / "router_config.json"
    if router.exists():
        refs += list(json.loads(router.read_text())["types"].values())
    if not any(not r.startswith("sentence_transformers.") for r in refs):
        return False
    for f in [st_modules.__file__, *get_relative_import_files(st_modules.__file__)]:
        with atomic_path(out / Path(f).name) as tmp:
            shutil.copyfile(f, tmp)
    modules = json.loads((out / "modules.json").read_text())
    for m in modules:
        m["type"] = st_modules.local_reference(m["type"])
    write_text(out / "modules.json", json.dumps(modules, indent=2) + "\n")
    return True


def module_names(modules: Sequence[torch.nn.Module]) -> list[str]:
    return [type(m).__name__ for m in modules]


def export_info(model: Any, mods: list[str], routes: dict[str, list[torch.nn.Module]], remote: bool) -> dict[str, Any]:
    """What ``unialign_export.json`` records: sources, modules per modality, whether code is shipped."""
    from unialign.projections import projection_config

    return {
        "exported_from": "unialign",
        "modalities": mods,
        "trust_remote_code": remote,
        "routes": {m: [*module_names(r), "Normalize"] for m, r in routes.items()},
        "encoders": {m: model.encoders[m].config() for m in mods},
        "layers": {m: model.layers[m] for m in mods},
        "projections": {m: projection_config(model.projections[m]) for m in mods},
        "logit_scale": float(model.logit_scale.exp()),
        "not_exported": [m for m in model.modalities if m not in mods],
    }


def readme(info: dict[str, Any]) -> str:
    """The folder's model card: how to load it, and whether and why it runs its own code."""
    mods, remote = info["modalities"], info["trust_remote_code"]
    flag = ", trust_remote_code=True" if remote else ""
    examples = {"image": 'Image.open("cat.png")', "text": '"an emoji of a cat face"'}
    lines = ["# unialign model (sentence-transformers export)", "",
             f"A unialign aligned model ({' + '.join(mods)}): frozen encoders joined by projections into one "
             "shared space, CLIP-style. `encode` returns L2-normalised shared-space embeddings; compare them "
             "with cosine similarity.", "", "```python"]
    if "image" in mods:
        lines.append("from PIL import Image")
    lines += ["from sentence_transformers import SentenceTransformer", "",
              f"model = SentenceTransformer(\"path/to/this/folder\"{flag})",
              f"emb = model.encode([{', '.join(examples[m] for m in mods)}])",
              "print(model.similarity(emb, emb))" if len(mods) > 1 else "print(emb.shape)", "```", ""]
    if len(mods) > 1:
        lines += ["One `encode` call may mix PIL images (or image file paths) and strings; each input is embedded "
                  "by its own modality's modules alone, so its embedding does not depend on the rest of the batch "
                  "(beyond float rounding).", ""]
    lines += ["Modules, per modality: " + "; ".join(f"{m}: {' -> '.join(r)}" for m, r in info["routes"].items()) + ".", ""]
    if remote:
        lines += ["**`trust_remote_code=True` is needed**: the folder runs its own code, `st_modules.py` and the "
                  "files it imports (`heads.py`, `maps.py`, `imaging.py`, `pooling.py`; unialign's own "
                  "implementation, copied verbatim), for what sentence-transformers has no module for: "
                  + ", ".join(reasons(info)) + ". It needs torch, numpy, Pillow, sentence-transformers >= 6 "
                  "(+ transformers)" + (", efficientnet-lite-pytorch" if any(
                      e["spec"].startswith("effnet-") for e in info["encoders"].values()) else "")
                  + "; not unialign.", ""]
    else:
        lines += ["No custom code: every module is sentence-transformers' own, so `trust_remote_code` is not "
                  "needed and only sentence-transformers is required.", ""]
    if info["not_exported"]:
        lines += [f"Not exported: the {', '.join(info['not_exported'])} side.", ""]
    lines += ["`unialign_export.json` records the source encoders, layers, projections and the logit scale "
              f"({info['logit_scale']:.4g}).", ""]
    return "\n".join(lines)


def reasons(info: dict[str, Any]) -> list[str]:
    """Why each custom module is there, in words."""
    out = []
    for m in info["modalities"]:
        spec = info["encoders"][m]["spec"]
        if m == "image":
            out.append(f"the image encoder `{spec}` (unialign's transform, backbone and pooling)")
        if "Projection" in info["routes"][m]:
            kind = info["projections"][m]["type"]
            what = {"anchors": "ASIF anchor map", "linear_map": "linear map", "head": "trained head",
                    "layer_scale": "layer scales", "chain": "a chain of maps", "concat": "fused maps"}.get(kind, kind)
            n_layers = len(info["layers"][m])
            out.append(f"the {m} projection ({what}" + (f", {n_layers} layers joined" if n_layers > 1 else "") + ")")
    if len(info["modalities"]) > 1:
        out.append("the router that also takes batches mixing images and strings")
    return out


__all__ = ["check_exportable", "export_sentence_transformers", "folded_dense", "map_dense"]
