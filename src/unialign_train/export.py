"""The sentence-transformers side of ``unialign export``: the text-head module and the folder writer.

``SentenceTransformer(out).encode(texts)`` then gives the same normalised embeddings as
``AlignedModel.from_pretrained(model).encode(texts, normalize_embeddings=True)`` (to float rounding), with the same tokenizer, pooling
and truncation as the encoder the model was trained on. The pipeline written is::

    <the text encoder's own modules, minus its trailing Normalize>
    -> text head     Dense (linear heads on the "final" embedding: Standardize folded into the weights;
                     loads with sentence-transformers alone)  or  unialign_train.export.UnialignTextHead
                     (any other head, or several text layers mixed; loading needs unialign installed
                     and ``trust_remote_code=True``, as sentence-transformers asks of any non-ST module)
    -> Normalize

What cannot be exported is refused with a one-line error: the image tower (its encoders are not
sentence-transformers modules), closed-form projections (ASIF, Procrustes, CCA, ... are numpy maps
over anchor sets, not torch modules), and text encoders other than ``st:`` ones. See docs/interop.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unialign.errors import UnialignError
from unialign.io import write_text

try:  # sentence-transformers v6 layout; v3-v5 export these from sentence_transformers.models
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.base.modules.module import Module
    from sentence_transformers.base.modules.normalize import Normalize
except ImportError:  # pragma: no cover
    from sentence_transformers.models import Dense, Module, Normalize


class UnialignTextHead(Module):
    """A unialign text tower (Standardize + head) as a sentence-transformers module.

    Its input is the concatenation of ``layers`` in order: ``"final"`` is the upstream
    ``sentence_embedding``; ``"layerK"`` the masked mean of hidden state K (``all_layer_embeddings``,
    which the Transformer module emits when its config has ``output_hidden_states``)."""

    config_keys = ["tower", "layers"]

    def __init__(self, tower: dict[str, Any], layers: list[str] | None = None):
        super().__init__()
        from unialign.projections import Tower

        self.tower, self.layers = dict(tower), list(layers or ["final"])
        self.net = Tower(**self.tower)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        from unialign.encoders.st import layer_features

        parts = layer_features(features, self.layers)
        features["sentence_embedding"] = self.net(torch.cat([parts[k] for k in self.layers], dim=1))
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return int(self.tower["out_dim"])

    get_embedding_dimension = get_sentence_embedding_dimension

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        self.save_config(output_path)
        self.save_torch_weights(output_path, safe_serialization=safe_serialization)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any) -> "UnialignTextHead":
        hub = {k: kwargs[k] for k in ("token", "cache_folder", "revision", "local_files_only") if k in kwargs}
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        module = cls(**config)
        cls.load_torch_weights(model_name_or_path, subfolder=subfolder, model=module, **hub)
        return module


def folded_dense(tower: Any) -> Dense:
    """A linear Tower on one input, ``W (x - m) / s + b``, as one ST Dense: ``(W / s) x + (b - W m / s)``."""
    lin = tower.head.proj
    w = lin.weight.detach().double()
    mean, std = tower.standardize.mean.detach().double(), tower.standardize.std.detach().double()
    wf = w / std[None, :]
    bf = -(wf @ mean) + (lin.bias.detach().double() if lin.bias is not None else 0.0)
    dense = Dense(w.shape[1], w.shape[0], bias=True, activation_function=torch.nn.Identity())
    with torch.no_grad():
        dense.linear.weight.copy_(wf.float())
        dense.linear.bias.copy_(bf.float())
    return dense


def export_sentence_transformers(model: Any, out: str | Path, fold_linear: bool = True) -> Path:
    """Write ``model``'s text tower (an :class:`~unialign.model.AlignedModel`) as a SentenceTransformer folder."""
    from sentence_transformers import SentenceTransformer

    from unialign.encoders.st import SentenceTransformerEncoder
    from unialign.projections import Tower
    from unialign.projections.heads import LinearHead

    enc = model.text_encoder
    if not isinstance(enc, SentenceTransformerEncoder):
        raise UnialignError(f"export: the text encoder {enc.spec} is not a sentence-transformers (st:) model; "
                            "only st: text towers can be exported")
    if not isinstance(model.projections["text"], Tower):
        raise UnialignError("export: only trained text heads can be exported to sentence-transformers; this model's "
                            f"text projection is a {type(model.projections['text']).__name__}")
    tower = model.projections["text"].cpu().eval()
    layers = list(model.layers["text"])
    if fold_linear and layers == ["final"] and isinstance(tower.head, LinearHead):
        head: torch.nn.Module = folded_dense(tower)
    else:
        head = UnialignTextHead(tower.config(), layers)
        head.net.load_state_dict(tower.state_dict())
    upstream = [m.cpu() for m in enc.pipeline]  # the encoder's modules, minus a trailing Normalize
    st = SentenceTransformer(modules=[*upstream, head, Normalize()], device="cpu")
    st.max_seq_length = enc.max_length
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st.save(str(out))
    info = {"exported_from": "unialign", "text_encoder": model.text_encoder.config(), "text_layers": layers,
            "head": tower.config(), "head_module": type(head).__name__, "logit_scale": float(model.logit_scale.exp()),
            "other_encoders": {m: e.spec for m, e in model.encoders.items() if m != "text"}}
    write_text(out / "unialign_export.json", json.dumps(info, indent=2, default=str) + "\n")
    enc.model.to(enc.device)  # put the shared upstream modules back where the encoder runs
    return out


__all__ = ["UnialignTextHead", "export_sentence_transformers", "folded_dense"]
