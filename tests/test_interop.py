"""open_clip's contract, as CLIP_benchmark and clip-retrieval use it: ``create_model_and_transforms``
returns an ``nn.Module`` with ``encode_image`` / ``encode_text(normalize=)``, ``forward``, a log
``logit_scale``, ``visual`` and ``context_length``; a picklable ``preprocess``; and a tokenizer that
returns the text encoder's own token ids, which ``encode_text`` reads back exactly as it reads strings
and refuses when they come from another tokenizer. The real CLIP_benchmark runs in
tests/test_clip_benchmark.py."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import unialign
from unialign.errors import DataError, UnialignError
from unialign_train.data.records import Dataset

from tiny import register_tiny, tiny_bert

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "cyan": (30, 220, 220), "magenta": (220, 30, 220), "white": (245, 245, 245), "black": (10, 10, 10),
           "orange": (240, 140, 20), "purple": (120, 30, 160), "grey": (128, 128, 128), "brown": (120, 70, 20),
           "pink": (250, 160, 190), "navy": (10, 20, 100), "olive": (110, 120, 20), "teal": (20, 120, 120)}


def make_colour_dataset(folder: Path, styles: int = 3) -> Dataset:
    """One concept per colour, one noisy 10x10 image per (concept, style), two captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for ci, (name, rgb) in enumerate(COLOURS.items()):
        for s in range(styles):
            arr = np.clip(np.asarray(rgb)[None, None] + rng.normal(0, 25, (10, 10, 3)), 0, 255).astype(np.uint8)
            p = folder / f"{name}_{s}.png"
            Image.fromarray(arr).save(p)
            recs.append({"id": f"{name}/{s}", "image": p.name, "text": [f"{name}", f"a {name} square"],
                         "concept": f"c{ci}", "label": name, "style": f"s{s}", "category": "warm" if ci % 2 else "cool"})
    return Dataset("colours", recs, folder)


def tiny_run(tmp: Path, recipe: str = "linear", monkeypatch: pytest.MonkeyPatch | None = None) -> dict:
    """A whole `unialign run` on a tiny image encoder and a tiny real BERT (with its tokenizer)."""
    from unialign_train.config import load_config
    from unialign_train.pipeline import run

    register_tiny()
    if monkeypatch is not None:
        monkeypatch.setenv("UNIALIGN_HOME", str(tmp / "home"))
    ds_dir = tmp / "colours-ds"
    make_colour_dataset(tmp / "colours-img").save(ds_dir)
    bert = tiny_bert(tmp / "bert", COLOURS)
    over = {"data.dataset": str(ds_dir), "data.split": [0.4, 0.2, 0.4], "encoders.image": "tiny-image",
            "encoders.text": f"hf:{bert}", "extract.dtype": "float32", "extract.num_workers": 0,
            "eval.zero_shot_sets": {}, "eval.templates": "emoji", "recipe": recipe, "output": str(tmp / "run"),
            "name": "tiny"}
    if recipe in ("linear", "mlp"):
        over.update({"train.max_steps": 40, "train.eval_every": 10, "train.batch_size": 8, "train.dim": 8})
    return run(load_config(None, over), log=lambda *_: None)


TEXTS = ["red", "a blue square", "an emoji of a teal square with a very long caption of many words", "x"]


def test_open_clip_contract_shapes_and_scale(tmp_path, monkeypatch):
    out = tiny_run(tmp_path, monkeypatch=monkeypatch)
    model, preprocess, tokenizer = unialign.create_model_and_transforms(out["model_dir"])
    assert not model.training and isinstance(model, torch.nn.Module)
    pickle.loads(pickle.dumps(preprocess))  # DataLoader workers need it picklable
    ims = [Image.new("RGBA", (12, 12), (255, 0, 0, 128)), Image.new("L", (9, 9), 40)]  # non-RGB inputs too
    pixels = torch.stack([preprocess(im) for im in ims])
    tokens = tokenizer(TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (4, tokenizer.context_length) == (4, model.context_length)
    assert tokenizer("one").shape == (1, model.context_length) and tokens.to("cpu") is tokens
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
        img_n = model.encode_image(pixels, normalize=True)
        a, b, scale = model(pixels, tokens)
    assert img.shape == (2, 8) and txt.shape == (4, 8)
    assert not torch.allclose(img.norm(dim=-1), torch.ones(2))  # unnormalised by default, as open_clip
    assert torch.allclose(img_n, F.normalize(img, dim=-1)) and torch.allclose(a, img_n)
    assert torch.allclose(b, F.normalize(txt, dim=-1), atol=1e-6)
    torch.testing.assert_close(model.visual(pixels), img)  # open_clip's model.visual
    assert scale.item() == pytest.approx(float(model.logit_scale.exp()), rel=1e-6)
    assert not model.logit_scale.requires_grad and "visual" not in dict(model.named_children())
    # token ids and strings give the same embeddings: the mask is read back from the padding
    ref = model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-6)
    assert model.to("cpu") is model and model.eval() is model


def test_encode_text_refuses_what_its_tokenizer_did_not_make(tmp_path, monkeypatch):
    """Another tokenizer's ids (open_clip pads to 77 with a 49408-word vocabulary), ids outside the
    vocabulary and non-strings are errors, not silently embedded text."""
    out = tiny_run(tmp_path, monkeypatch=monkeypatch)
    model, _, tokenizer = unialign.create_model_and_transforms(out["model_dir"])
    open_clip_like = torch.randint(0, 49408, (2, 77))
    with pytest.raises(DataError, match=r"shape \(N, 32\).*\(2, 77\)"):
        model.encode_text(open_clip_like)
    wide = tokenizer(["red"])
    wide[0, 1] = 10_000
    with pytest.raises(DataError, match="vocabulary"):
        model.encode_text(wide)
    with pytest.raises(DataError, match="strings"):
        model.encode_text([torch.tensor([1, 2, 3])])
    with pytest.raises(DataError, match="strings"):
        model.encode([1.5, "a"], modality="text")
    with pytest.raises(UnialignError, match="context_length"):
        tokenizer(["red"], context_length=77)


def test_closed_form_model_through_open_clip_interface(tmp_path, monkeypatch):
    out = tiny_run(tmp_path, recipe="procrustes", monkeypatch=monkeypatch)
    model, preprocess, tokenizer = unialign.create_model_and_transforms(out["model_dir"], device="cpu")
    with torch.no_grad():
        txt = model.encode_text(tokenizer(["red", "green"]), normalize=True)
    ref = model.encode(["red", "green"], convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(txt, ref, rtol=1e-5, atol=1e-5)


def test_open_clip_interface_needs_a_tokenizer(tmp_path):
    """A text encoder without a tokenizer (a user's own) cannot offer open_clip's token contract: one
    clear error instead of a tokenizer that returns something else."""
    from tiny import tiny_model

    with pytest.raises(UnialignError, match="no tokenizer"):
        unialign.create_model_and_transforms(tiny_model(tmp_path / "m"))
