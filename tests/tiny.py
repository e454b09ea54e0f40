"""Tiny deterministic encoders and datasets that tests build on the fly (no downloads, milliseconds)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from unialign.encoders.base import FINAL, Encoder, ImageLoader
from unialign_train.data import Dataset


class _Prep:
    """Picklable preprocessing: resize to 8x8, to a CHW float tensor."""

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32).transpose(2, 0, 1) / 255.0)


class TinyImageEncoder(Encoder):
    """A fixed random linear map of 8x8 RGB pixels, with one intermediate "layer"."""

    modality = "image"

    def __init__(self, dim: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w1", torch.randn(192, 24, generator=g))
        self.register_buffer("w2", torch.randn(24, dim, generator=g))
        self.spec, self.dim, self.version = "tiny-image", dim, "1"
        self.layer_dims = {FINAL: dim, "hidden": 24}

    def loader(self) -> Any:
        return ImageLoader(_Prep())

    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        h = torch.tanh(batch.flatten(1) @ self.w1)
        out = {"hidden": h, FINAL: h @ self.w2}
        return {k: out[k] for k in layers}


class TinyTextEncoder(Encoder):
    """Bag of character trigrams hashed into ``dim`` buckets."""

    modality = "text"

    def __init__(self, dim: int = 16):
        super().__init__()
        self.spec, self.dim, self.version = "tiny-text", dim, "1"
        self.layer_dims = {FINAL: dim}

    def forward(self, batch: Sequence[str], layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        out = torch.zeros(len(batch), self.dim)
        for i, t in enumerate(batch):
            for j in range(max(1, len(t) - 2)):
                out[i, sum(map(ord, t[j : j + 3])) % self.dim] += 1.0
        return {FINAL: out}


def make_image_dataset(folder: Path, n: int = 40, bad: dict[int, str] | None = None) -> Dataset:
    """``n`` small coloured PNGs with two captions each; ``bad`` maps index -> kind of corruption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        p = folder / f"img_{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(p)
        kind = (bad or {}).get(i)
        if kind == "empty":
            p.write_bytes(b"")
        elif kind == "truncated":
            p.write_bytes(p.read_bytes()[:30])
        elif kind == "text":
            p.write_text("not an image")
        elif kind == "missing":
            p.unlink()
        recs.append({"id": str(i), "image": p.name, "text": [f"thing {i % 7}", f"caption number {i}"],
                     "concept": f"c{i % 7}", "label": f"thing {i % 7}", "style": "s" + str(i % 2)})
    return Dataset("tiny", recs, folder)


def register_tiny() -> None:
    """Make the tiny encoders loadable by spec ("tiny-image", "tiny-text"), e.g. by AlignedModel.from_pretrained."""
    from unialign.encoders import register_encoder

    register_encoder("tiny-image", lambda name, device=None, **o: TinyImageEncoder(), "tiny-image")
    register_encoder("tiny-text", lambda name, device=None, **o: TinyTextEncoder(), "tiny-text")


def tiny_bert(folder: Path, words: Sequence[str] = ()) -> Path:
    """A saved 2-layer BERT (random weights, word-level vocabulary of ``words`` plus a few common ones)
    with its tokenizer: a real ``hf:`` text encoder, tokenizer included, built in milliseconds."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    common = ["a", "an", "of", "the", "emoji", "icon", "square", "photo", "cat", "dog", "face", "red", "blue", "green"]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *common, *(w.lower() for w in words)]))
    folder.mkdir(parents=True, exist_ok=True)
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=32).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def tiny_model(folder: Path, out_dim: int = 8, seed: int = 0) -> Path:
    """A saved AlignedModel of the tiny encoders with linear towers (random, standardised as fitted
    heads are), for tests of what uses a model: index, server, export, faults."""
    from unialign.model import AlignedModel
    from unialign.projections import Tower

    register_tiny()
    torch.manual_seed(seed)
    img, txt = TinyImageEncoder(), TinyTextEncoder()
    towers = {"image": Tower("linear", img.dim, out_dim), "text": Tower("linear", txt.dim, out_dim)}
    towers["image"].standardize.fit(torch.randn(50, img.dim) * 3)
    towers["text"].standardize.fit(torch.rand(50, txt.dim) * 2)
    return AlignedModel({"image": img, "text": txt}, towers).save_pretrained(folder)
