"""Token-level features of frozen encoders: what cross-modal fusion layers attend over.

The feature store (:mod:`unialign_train.features`) keeps one pooled vector per item and layer, which is
all alignment needs. Cross-modal layers (BridgeTower, ManagerTower), MM-Lego's latent cross-attention
and HAMMER's token grounding need the encoders' *tokens*: word pieces of a caption, positions of an
image's feature map. They are extracted once, through the encoders' own forward pass, into a token store:

- text (``st:`` encoders): the hidden state of every word piece at the requested layers (``layer0`` is
  the embedding output, ``layerN`` the last; what sentence-transformers pools into its embedding), with
  the whitespace-separated word each piece belongs to (``-1`` for [CLS]/[SEP]), so manipulated *words*
  can be graded from per-piece predictions;
- images (``effnet-*``): each requested block's feature map (``final``: after the head conv, what the
  pooled "final" averages), average-pooled to a ``grid`` x ``grid`` map: 16 tokens at 128 px, the native
  size of EfficientNet's last stage there. Forward hooks read the maps from the encoder's own pass;
- any other encoder: its pooled per-layer features as a one-token sequence (fusion still runs; token
  grounding then has nothing to ground).

A store is keyed by its *items* (the fingerprint of the image files or captions it holds), the encoder
(spec and weights version) and the layers, under ``$UNIALIGN_HOME/features/tokens/``, so every dataset
drawing on the same images (the emoji records and the manipulated pairs built from them) reuses it.
Layout: ``manifest.json`` (written last: a store with a manifest is complete), ``items.json``,
``offsets.npy`` (item i's tokens are rows ``offsets[i]:offsets[i+1]``), ``words.npy`` and one
``layers/<layer>.npy`` (tokens, dim) per layer, float16. Extraction is one pass (minutes for the emoji
images on two cores); an interrupted one starts again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unialign import paths
from unialign.encoders.base import FINAL, Encoder
from unialign.errors import StoreError
from unialign.io import atomic_path, read_json, write_json
from unialign.progress import progress

from ..data.records import Dataset

FORMAT = "unialign-tokens/1"
Log = Callable[[str], None]


@dataclass
class TokenBatch:
    """Tokens of a batch of items: one (B, T, dim) tensor per layer, the (B, T) mask of real tokens and
    the (B, T) word index of each token (-1: special token or padding)."""

    layers: list[torch.Tensor]
    mask: torch.Tensor
    words: torch.Tensor


class TokenStore:
    """A complete token store (float16 arrays, memory-mapped when opened from disk): open with :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], items: list[str], offsets: np.ndarray,
                 words: np.ndarray, arrays: dict[str, np.ndarray]):
        self.root, self.manifest, self.items = root, manifest, items
        self.offsets, self.words, self.arrays = offsets, words, arrays
        self._row: dict[str, int] | None = None

    @classmethod
    def open(cls, root: str | Path) -> "TokenStore":
        root = Path(root)
        if not (root / "manifest.json").exists():
            raise StoreError(f"{root} is not a complete token store (no manifest.json); extract it again")
        manifest = read_json(root / "manifest.json")
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{root}: unsupported token store format {manifest.get('format')!r}")
        items = read_json(root / "items.json")
        offsets, words = np.load(root / "offsets.npy"), np.load(root / "words.npy")
        # memory-mapped: batches read only their rows, and processes reading one store share its pages
        arrays = {l: np.load(root / "layers" / f"{l}.npy", mmap_mode="r") for l in manifest["layers"]}
        if len(offsets) != len(items) + 1 or any(len(a) != offsets[-1] for a in arrays.values()):
            raise StoreError(f"{root}: offsets, items and token arrays disagree; delete the folder and extract again")
        return cls(root, manifest, items, offsets, words, arrays)

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def dims(self) -> list[int]:
        return [int(self.manifest["layer_dims"][l]) for l in self.layers]

    @property
    def max_tokens(self) -> int:
        """The longest token sequence of any item (what a fixed-length consumer pads to)."""
        return int(np.diff(self.offsets).max()) if len(self.items) else 0

    def row_of(self) -> dict[str, int]:
        """Item -> its row in this store."""
        if self._row is None:
            self._row = {it: i for i, it in enumerate(self.items)}
        return self._row

    def rows(self, items: Sequence[str]) -> np.ndarray:
        """Store rows of ``items``; an item the store lacks is an error naming it."""
        row_of = self.row_of()
        missing = [it for it in items if it not in row_of]
        if missing:
            raise StoreError(f"{self.root}: {len(missing)} item(s) have no tokens, e.g. {missing[0]!r}")
        return np.asarray([row_of[it] for it in items], dtype=np.int64)

    def gather(self, rows: Sequence[int], layers: Sequence[str] | None = None, pad_to: int | None = None,
               max_tokens: int | None = None) -> TokenBatch:
        """Tokens of store ``rows``, right-padded to the longest of them (or to ``pad_to``), and cut after
        ``max_tokens`` (or ``pad_to``) tokens; a row of -1 gives an all-padding sequence (a missing item)."""
        layers = list(layers or self.layers)
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.where(rows >= 0, self.offsets[np.maximum(rows, 0)], 0)
        lengths = np.where(rows >= 0, self.offsets[np.maximum(rows, 0) + 1] - starts, 0)
        t = int(pad_to) if pad_to is not None else max(1, int(lengths.max(initial=0)))
        if max_tokens is not None:
            t = min(t, int(max_tokens))
        lengths = np.minimum(lengths, t)
        pos = np.arange(t)
        mask = pos[None, :] < lengths[:, None]
        src = (starts[:, None] + pos[None, :])[mask]
        out = []
        for l in layers:
            a = self.arrays[l]
            x = np.zeros((len(rows), t, a.shape[1]), dtype=np.float32)
            x[mask] = a[src]
            out.append(torch.from_numpy(x))
        words = np.full((len(rows), t), -1, dtype=np.int64)
        words[mask] = self.words[src]
        return TokenBatch(out, torch.from_numpy(mask), torch.from_numpy(words))


# -- extraction ----------------------------------------------------------------------------------------
def default_token_layers(encoder: Encoder, n: int = 4) -> list[str]:
    """The top ``n`` layers an encoder has tokens of: the last blocks (``final`` included) of a CNN, the
    last hidden states of a transformer; one layer (``final``, pooled) for any other encoder."""
    kind = token_kind(encoder)
    if kind == "pooled":
        return [FINAL]
    names = [l for l in encoder.layer_dims if l != FINAL and (l.startswith("block") if kind == "grid" else l.startswith("layer"))]
    names.sort(key=lambda l: int(l[5:]))
    return names[-(n - 1):] + [FINAL] if kind == "grid" else names[-n:]


def token_kind(encoder: Encoder) -> str:
    """How an encoder's tokens are read: ``words`` (sentence-transformers hidden states), ``grid``
    (EfficientNet feature maps) or ``pooled`` (its pooled layers as a one-token sequence)."""
    from unialign.encoders.effnet import EfficientNetLiteEncoder
    from unialign.encoders.st import SentenceTransformerEncoder

    if isinstance(encoder, SentenceTransformerEncoder):
        return "words"
    if isinstance(encoder, EfficientNetLiteEncoder):
        return "grid"
    return "pooled"


def token_store_path(items: Sequence[str], encoder: Encoder, modality: str, layers: Sequence[str], grid: int) -> Path:
    """``$UNIALIGN_HOME/features/tokens/<encoder>-<digest>``: the digest covers the items (the fingerprint
    of a dataset holding just them: file sizes and times for media), the encoder and the layers."""
    holder = Dataset("tokens", [{"id": str(i), "concept": "", "label": "", "style": "",
                                 modality: [it] if modality == "text" else it} for i, it in enumerate(items)])
    enc = {k: v for k, v in encoder.config().items() if k != "backend"}  # token reads run eagerly in torch
    key = {"format": FORMAT, "encoder": enc, "modality": modality, "layers": list(layers), "grid": grid,
           "items": holder.fingerprint(modality), "n_items": len(items)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return paths.features_dir() / "tokens" / f"{paths.slug(encoder.spec)}-{modality}-{digest}"


def extract_tokens(items: Sequence[str], encoder: Encoder, modality: str, layers: Sequence[str] | None = None,
                   grid: int = 4, batch_size: int = 64, out: str | Path | None = None, log: Log = print,
                   show_progress: bool = True) -> TokenStore:
    """Tokens of the distinct ``items`` (image paths or captions; stored sorted) at ``layers`` (default:
    the encoder's top four), into a store; an existing complete store of the same key is opened instead."""
    items = sorted(set(items))  # one key per set of items, whatever order a dataset lists them in
    layers = list(layers or default_token_layers(encoder))
    encoder.check_layers(layers)
    root = Path(out) if out is not None else token_store_path(items, encoder, modality, layers, grid)
    if (root / "manifest.json").exists():
        return TokenStore.open(root)
    kind = token_kind(encoder)
    read = {"words": _word_tokens, "grid": _grid_tokens, "pooled": _pooled_tokens}[kind]
    t0 = time.perf_counter()
    chunks: dict[str, list[np.ndarray]] = {l: [] for l in layers}
    words, lengths = [], []
    for s in progress(range(0, len(items), batch_size), desc=f"tokens {encoder.spec}", disable=not show_progress):
        per_layer, batch_words, batch_lengths = read(encoder, items[s : s + batch_size], layers, grid)
        for l in layers:
            chunks[l].append(per_layer[l])
        words.append(batch_words)
        lengths.extend(batch_lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dims = {l: int(chunks[l][0].shape[1]) for l in layers} if items else {l: int(encoder.layer_dims[l]) for l in layers}
    for l in layers:
        _save(root / "layers" / f"{l}.npy", np.concatenate(chunks[l]) if items else np.zeros((0, dims[l]), np.float16))
    _save(root / "offsets.npy", offsets)
    _save(root / "words.npy", np.concatenate(words).astype(np.int32) if items else np.zeros(0, np.int32))
    write_json(root / "items.json", items)
    write_json(root / "manifest.json", {"format": FORMAT, "encoder": encoder.config(), "modality": modality,
                                        "kind": kind, "layers": layers, "layer_dims": dims, "grid": grid,
                                        "n_items": len(items), "n_tokens": int(offsets[-1]), "dtype": "float16",
                                        "seconds": round(time.perf_counter() - t0, 1)})
    log(f"{len(items)} {modality} items -> {int(offsets[-1])} tokens of {encoder.spec} in {time.perf_counter() - t0:.0f}s "
        f"({root})")
    return TokenStore.open(root)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


Read = tuple[dict[str, np.ndarray], np.ndarray, list[int]]


@torch.inference_mode()
def _word_tokens(encoder: Any, texts: list[str], layers: Sequence[str], grid: int) -> Read:
    """Word-piece hidden states from the encoder's own transformer module (the first module of its
    sentence-transformers pipeline), and the whitespace word of each piece from the tokenizer's offsets."""
    inputs = {k: v.to(encoder.device) for k, v in encoder.model_inputs(texts).items()}
    hidden = encoder.pipeline[0](dict(inputs))["all_layer_embeddings"]
    mask = inputs["attention_mask"].bool().cpu()
    enc = encoder.tokenizer(texts, padding=True, truncation=True, max_length=int(encoder.max_length),
                            return_offsets_mapping=True, return_tensors="pt")
    if not torch.equal(enc["input_ids"], inputs["input_ids"].cpu()):  # the word map must describe these pieces
        raise StoreError(f"{encoder.spec}: its tokenizer's pieces differ from the model inputs; cannot map words")
    out = {l: hidden[int(l[5:])].float().cpu()[mask].numpy().astype(np.float16) for l in layers}
    words = [_piece_words(t, offs, m) for t, offs, m in zip(texts, enc["offset_mapping"].tolist(), mask.tolist())]
    return out, np.concatenate(words), [int(m.sum()) for m in mask]


def _piece_words(text: str, offsets: list[list[int]], mask: list[bool]) -> np.ndarray:
    """The index of the whitespace-separated word holding each real piece (-1 for special pieces)."""
    word_at = np.full(len(text) + 1, -1, dtype=np.int64)
    for w, (a, b) in enumerate(_word_spans(text)):
        word_at[a:b] = w
    return np.asarray([word_at[a] if b > a else -1 for (a, b), m in zip(offsets, mask) if m], dtype=np.int64)


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, ch in enumerate(text + " "):
        if ch.isspace() and start is not None:
            spans.append((start, i))
            start = None
        elif not ch.isspace() and start is None:
            start = i
    return spans


@torch.inference_mode()
def _grid_tokens(encoder: Any, paths_: list[str], layers: Sequence[str], grid: int) -> Read:
    """EfficientNet feature maps caught by forward hooks during the encoder's own pass (torch backend),
    each average-pooled to ``grid`` x ``grid`` positions."""
    if encoder.runtime is not None:
        raise StoreError(f"{encoder.spec}: token maps are read from the torch backend; load it with backend=torch")
    net = encoder.model
    maps: dict[str, torch.Tensor] = {}
    hooked = {FINAL: net._bn1, "stem": net._bn0, **{f"block{i}": b for i, b in enumerate(net._blocks)}}
    handles = [hooked[l].register_forward_hook(lambda m, i, o, l=l: maps.__setitem__(l, o)) for l in layers]
    try:
        encoder.forward(encoder.collate(paths_), [FINAL])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for l in layers:
        x = net._swish(maps[l]) if l in (FINAL, "stem") else maps[l]  # the activation that follows those BNs
        x = F.adaptive_avg_pool2d(x.float(), grid).flatten(2).transpose(1, 2)  # (B, grid*grid, C)
        out[l] = x.reshape(-1, x.shape[-1]).cpu().numpy().astype(np.float16)
    n = grid * grid
    return out, np.full(len(paths_) * n, -1, dtype=np.int64), [n] * len(paths_)


@torch.inference_mode()
def _pooled_tokens(encoder: Encoder, items: list[str], layers: Sequence[str], grid: int) -> Read:
    feats = encoder.features(encoder.collate(items), list(layers)).cpu()
    parts = torch.split(feats, [encoder.layer_dims[l] for l in layers], dim=1)
    out = {l: p.numpy().astype(np.float16) for l, p in zip(layers, parts)}
    return out, np.full(len(items), -1, dtype=np.int64), [1] * len(items)


__all__ = ["TokenBatch", "TokenStore", "default_token_layers", "extract_tokens", "token_kind", "token_store_path"]
