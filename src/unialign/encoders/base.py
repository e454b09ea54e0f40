"""One small interface for every frozen encoder, of any modality.

An encoder is an ``nn.Module`` whose ``forward(batch, layers)`` returns a dict of pooled feature
tensors: ``"final"`` is the embedding the encoder is known for; other keys (``"layer3"``, ``"block7"``)
are per-layer pooled outputs, returned only when asked for, so that layer selection and layer mixing
can read them from the store. Being a module, it moves with ``.to(device)`` and shows its weights in
``.parameters()`` like any other part of an aligned model; it is built frozen (eval mode, no grads).

What a batch is depends on the modality, and the split of work is the same for all:
:meth:`Encoder.loader` returns a plain picklable callable ``item -> tensor`` (an image path or PIL
image -> a normalised CHW tensor) that runs in DataLoader worker processes, and ``forward`` runs the
model on the stacked tensors in the main process, so decoding never stalls the model. Text encoders
have no loader: their batches are lists of strings, tokenised inside ``forward``.

Backends: an encoder whose tensor computation is a :class:`~unialign.encoders.runtime.Graph`
(``graph(layers)``; every packaged encoder) runs it in PyTorch eager or, exported once to ONNX, in
ONNX Runtime or OpenVINO (``backend=auto|torch|onnx|openvino``, see :mod:`.runtime`). ``forward``
turns a batch into model inputs (``model_inputs``: pixels, or token ids and masks) and hands them to
:meth:`Encoder.run_graph`, so every backend computes the same layers from the same inputs. The
backend that runs is recorded in ``config()`` (hence in feature stores' keys and manifests).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..device import autocast, pick_device
from ..errors import ConfigError, DataError
from ..progress import progress
from ..standalone.imaging import ImageTransform, center_crop  # standalone: shipped with exports
from ..standalone.pooling import masked_mean
from .runtime import Graph, Runtime, resolve_backend

FINAL = "final"
MODALITIES = ("image", "text", "audio", "video", "vector")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Encoder(torch.nn.Module):
    """Frozen encoder. Subclasses set ``spec``, ``modality``, ``dim``, ``layer_dims`` and ``version``
    and implement ``forward``; those taking tensors (images, audio, video) also implement ``loader``."""

    spec: str  # the string that names it, e.g. "effnet-lite0", "st:all-MiniLM-L6-v2", "hf:/path"
    modality: str  # one of MODALITIES
    dim: int  # size of the "final" output
    version: str  # weights identity (fingerprint or package version); recorded in stores and models
    layer_dims: dict[str, int]  # every key forward() can return, including "final"
    backend: str = "torch"  # what runs forward: torch | onnx | openvino (resolved, never "auto")
    quantize: str = "none"  # none | int8 (onnx / openvino graphs only)
    runtime: Runtime | None = None  # the exported graphs' sessions, for backends other than torch
    graph_name: str  # names the cache folder of its exported graphs: the spec without backend options
    channels_last: bool = False  # convolutional nets on CUDA: NHWC activations (tensor-core friendly)
    steps: int = 1  # time steps each layer's output holds side by side (a pool=concat video encoder: its frames)

    def __init__(self) -> None:
        super().__init__()
        self._device = torch.device("cpu")

    # -- to implement -------------------------------------------------------------------------
    def forward(self, batch: Any, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """Pooled features for a batch: stacked tensors, or a list of strings (text).
        Returns float tensors of shape (batch, layer_dims[k]) for each requested key."""
        raise NotImplementedError

    def loader(self) -> Callable[[Any], torch.Tensor] | None:
        """Picklable callable ``item -> tensor`` (a path or an in-memory object), or None when batches
        are passed to ``forward`` as they are (text)."""
        return None

    def graph_module(self, layers: Sequence[str]) -> torch.nn.Module:
        """The tensor computation of ``layers``: a module mapping the model inputs (in the order
        ``model_inputs`` gives them) to a tuple of pooled outputs. What the torch backend runs and
        what the other backends export, so they compute the same thing."""
        raise NotImplementedError(f"{type(self).__name__} has no exportable graph")

    def graph(self, layers: Sequence[str]) -> Graph:
        """:meth:`graph_module` with example inputs and the axes that vary: what an export needs."""
        raise NotImplementedError(f"{type(self).__name__} has no exportable graph")

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this encoder with :func:`unialign.encoders.load_encoder`, and
        the backend that computes its features (part of a feature store's key)."""
        return {"spec": self.spec, "modality": self.modality, "dim": self.dim, "version": self.version,
                "backend": self.backend}

    # -- shared -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are (CPU for weightless encoders)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return self._device

    def freeze(self, device: str | torch.device | None = None) -> "Encoder":
        """Eval mode, no gradients, moved to ``device`` (default: CUDA, MPS, else CPU)."""
        self._device = pick_device(device)
        self.eval().to(self._device)
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def use_backend(self, backend: str = "auto", quantize: str = "none") -> "Encoder":
        """Choose what runs ``forward`` (call after :meth:`freeze`, once ``version`` is set): ``auto`` is
        OpenVINO or ONNX Runtime on CPU when installed, else PyTorch. Exported graphs are cached under
        ``graph_name`` (the spec without backend options, so ``backend=onnx`` and ``auto`` share them)."""
        self.backend = resolve_backend(str(backend), self.device, str(quantize))
        self.quantize = str(quantize)
        self.runtime = None if self.backend == "torch" else Runtime(
            self.backend, self.quantize, getattr(self, "graph_name", None) or self.spec, {"version": self.version},
            cuda=self.device.type == "cuda")
        return self

    def backend_info(self) -> str:
        """One line saying what computes the features: the backend, its version, device and threads."""
        if self.runtime is not None:
            return f"{self.backend}: {self.runtime.describe()}"
        dev = self.device
        extra = ", bf16 autocast" if dev.type == "cuda" else ""
        extra += ", channels_last" if self.channels_last else ""
        threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
        return f"torch: torch {torch.__version__} ({dev.type}{extra}{threads})"

    def run_graph(self, inputs: dict[str, torch.Tensor], layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """``graph(layers)`` on model inputs, on this encoder's backend: eager on its device, or the
        exported graph (its outputs moved to the encoder's device, as eager's would be)."""
        layers = list(layers)
        if self.runtime is not None:
            out = self.runtime.run(self.graph, inputs, layers)
            return {k: v.to(self.device) for k, v in out.items()} if self.device.type != "cpu" else out
        args = [t.to(self.device, non_blocking=True) for t in inputs.values()]
        return dict(zip(layers, self.graph_module(layers)(*args)))

    def train(self, mode: bool = True) -> "Encoder":
        """Frozen encoders stay in eval mode (dropout off, norm statistics fixed) whatever their parent does."""
        return super().train(False)

    @property
    def layers(self) -> list[str]:
        return list(self.layer_dims)

    def check_layers(self, layers: Sequence[str]) -> None:
        unknown = [l for l in layers if l not in self.layer_dims]
        if unknown:
            raise ConfigError(f"encoder {self.spec}: unknown layer(s) {unknown}; available: {self.layers}")

    def width(self, layers: Sequence[str]) -> int:
        """Size of the concatenation of ``layers`` (what a projection of those layers takes)."""
        self.check_layers(layers)
        return sum(self.layer_dims[l] for l in layers)

    def collate(self, items: Sequence[Any]) -> Any:
        """Raw inputs -> one batch for ``forward`` (loads and stacks what needs loading)."""
        load = self.loader()
        if load is None:
            return [str(x) for x in items]
        return torch.stack([x if isinstance(x, torch.Tensor) else load(x) for x in items])

    @torch.inference_mode()
    def features(self, batch: Any, layers: Sequence[str] = (FINAL,)) -> torch.Tensor:
        """``forward`` on one collated batch, its ``layers`` concatenated in order as float32: the row
        format of the feature store and of every projection."""
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device, non_blocking=True)
        with autocast(self.device):
            out = self.forward(batch, list(layers))
        return torch.cat([out[l].float() for l in layers], dim=1)

    def encode(
        self,
        inputs: Sequence[Any],
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        convert_to_numpy: bool = True,
        normalize_embeddings: bool = False,
        layers: Sequence[str] = (FINAL,),
    ) -> np.ndarray | torch.Tensor:
        """Raw encoder features of raw inputs (strings, image paths or PIL images, ...), batched:
        sentence-transformers' ``encode`` for one frozen encoder. Several ``layers`` are concatenated."""
        layers = [layers] if isinstance(layers, str) else list(layers)
        self.check_layers(layers)
        items = list(inputs)
        show = show_progress_bar if show_progress_bar is not None else len(items) > 4 * batch_size
        order = length_order(items)  # texts of similar length batched together: less padding to compute
        chunks = [self.features(self.collate([items[i] for i in order[s : s + batch_size]]), layers).cpu()
                  for s in progress(range(0, len(items), batch_size), desc=f"encode {self.modality}", disable=not show)]
        emb = torch.cat(chunks) if chunks else torch.zeros(0, self.width(layers))
        emb = emb[torch.from_numpy(np.argsort(order))] if chunks else emb
        if normalize_embeddings:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.numpy() if convert_to_numpy else emb

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}, modality={self.modality}, dim={self.dim}"


class TextEncoder(Encoder):
    """A frozen text encoder with a Hugging Face tokenizer (``self.tokenizer``, ``self.max_length``).

    A batch is a list of strings, or the token ids :meth:`tokenize` made from them: open_clip's
    tokenizer contract (``tokenizer(texts) -> LongTensor (N, context_length)``, padded with the pad
    id, the attention mask implied by ``ids != pad``, as open_clip's own HF text towers do), which
    CLIP_benchmark and clip-retrieval feed to ``encode_text``. Both give the same features: trailing
    all-padding columns are trimmed, so the model sees what string batches give it. Anything else
    (another tokenizer's ids, other objects) is refused instead of being embedded as text.
    """

    modality = "text"
    tokenizer: Any
    max_length: int

    @property
    def context_length(self) -> int:
        """Width of :meth:`tokenize`'s output: the encoder's maximum sequence length."""
        return int(self.max_length)

    def tokenize(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids (N, context_length), truncated and padded as the encoder itself would."""
        if context_length is not None and int(context_length) != self.context_length:
            raise ConfigError(f"{self.spec}: its tokens are {self.context_length} wide (the encoder's maximum "
                              f"length); context_length={context_length} cannot be honoured")
        texts = [texts] if isinstance(texts, str) else list(texts)
        check_texts(texts)
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]

    def inputs_from_ids(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs (input_ids, attention_mask, token_type_ids where the model takes them) of a
        :meth:`tokenize` batch, all-padding columns dropped; a tensor it could not have made is an error."""
        vocab = len(self.tokenizer)
        if ids.dtype not in (torch.int64, torch.int32) or ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise DataError(f"{self.spec}: encode_text takes strings or this model's tokenizer output, token ids of "
                            f"shape (N, {self.context_length}); got a {str(ids.dtype).replace('torch.', '')} tensor "
                            f"of shape {tuple(ids.shape)} (another tokenizer's ids, e.g. open_clip's 77-wide ones?)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise DataError(f"{self.spec}: token ids outside its vocabulary [0, {vocab}): not this model's tokens")
        mask = (ids != self.tokenizer.pad_token_id).long()
        keep = mask.any(0)
        inputs = {"input_ids": ids[:, keep].long(), "attention_mask": mask[:, keep]}
        if "token_type_ids" in self.tokenizer.model_input_names:
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        return inputs

    def collate(self, items: Sequence[Any]) -> list[str]:
        texts = list(items)
        check_texts(texts)
        return texts


def length_order(items: Sequence[Any]) -> np.ndarray:
    """Positions of ``items`` with strings sorted longest first (a stable order; sentence-transformers'
    ``encode`` does the same): a text batch is padded to its longest member, so batching texts of
    similar length computes far fewer padding tokens. Anything but a list of strings keeps its order."""
    if not items or not all(isinstance(t, str) for t in items):
        return np.arange(len(items))
    return np.argsort([-len(t) for t in items], kind="stable")


def check_texts(texts: Sequence[Any]) -> None:
    """Text inputs are strings: anything else would be embedded as its repr, silently."""
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"text inputs are strings (or a tokenizer's token ids, as one tensor); got a "
                        f"{type(bad).__name__}")


@dataclass(frozen=True)
class ImageLoader:
    """Picklable ``path | PIL image -> tensor``: :func:`unialign.media.load_image`, then ``transform``."""

    transform: Callable[[Image.Image], torch.Tensor]

    def __call__(self, item: Any) -> torch.Tensor:
        from ..errors import DataError
        from ..media import load_image, to_rgb

        if isinstance(item, (str, bytes, os.PathLike)):
            img = load_image(item)
        elif isinstance(item, Image.Image):
            img = item if item.mode == "RGB" else to_rgb(item)
        else:
            raise DataError(f"an image input is a file path, bytes, a PIL image or a batch of preprocessed pixels; "
                            f"got a {type(item).__name__}")
        return self.transform(img)


def config_identity(config: Any) -> str:
    """A transformers config as JSON for a fingerprint, without where it was loaded from
    (``_name_or_path``): the same weights installed in another folder or virtualenv are the same model."""
    d = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "name_or_path")}
    return json.dumps(d, sort_keys=True, default=str)


def weights_fingerprint(model: torch.nn.Module, extra: str = "", sample: int = 4096) -> str:
    """Cheap stable weights identity: sha256 (12 hex) over every parameter and buffer's name, shape,
    dtype and a strided sample of up to ``sample`` values (plus ``extra``, e.g. the config).

    Hashing whole weight files costs seconds for large models and depends on where and in which format
    they are stored; this costs milliseconds and is the same on any device and across runs, while any
    retrained or fine-tuned weights change (nearly) every value and hence the sample."""
    h = hashlib.sha256(extra.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        vals = flat[::step][:sample].to("cpu", torch.float64).numpy()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(vals.tobytes())
    return h.hexdigest()[:12]


__all__ = [
    "Encoder",
    "Graph",
    "TextEncoder",
    "check_texts",
    "FINAL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLoader",
    "ImageTransform",
    "MODALITIES",
    "length_order",
    "center_crop",
    "masked_mean",
    "config_identity",
    "weights_fingerprint",
]
