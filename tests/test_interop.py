"""open_clip contract: an open_clip-style evaluation loop (CLIP_benchmark's zero-shot code, copied
faithfully below) run on a unialign model gives the same accuracy as unialign's own evaluation."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import unialign
from unialign.media import load_image
from unialign_train.data.records import Dataset

from tiny import register_tiny

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
    """A whole `unialign run` on tiny encoders (milliseconds of compute) into ``tmp / 'run'``."""
    from unialign_train.config import load_config
    from unialign_train.pipeline import run

    register_tiny()
    if monkeypatch is not None:
        monkeypatch.setenv("UNIALIGN_HOME", str(tmp / "home"))
    ds_dir = tmp / "colours-ds"
    make_colour_dataset(tmp / "colours-img").save(ds_dir)
    over = {"data.dataset": str(ds_dir), "data.split": [0.4, 0.2, 0.4], "encoders.image": "tiny-image",
            "encoders.text": "tiny-text", "extract.dtype": "float32", "extract.num_workers": 0,
            "eval.zero_shot_sets": {}, "eval.templates": "emoji", "recipe": recipe, "output": str(tmp / "run"),
            "name": "tiny"}
    if recipe in ("linear", "mlp"):
        over.update({"train.max_steps": 40, "train.eval_every": 10, "train.batch_size": 8, "train.dim": 8})
    return run(load_config(None, over), log=lambda *_: None)


# --- a faithful copy of CLIP_benchmark 1.6.2 clip_benchmark/metrics/zeroshot_classification.py ----------
# (zero_shot_classifier, accuracy, run_classification; tqdm dropped; `amp` kept: False here, as on CPU
# CLIP_benchmark's autocast would run in bf16. Its templates use "{c}"; ours use "{}", so the format
# call is `template.format(classname)`.)
def cb_zero_shot_classifier(model, tokenizer, classnames, templates, device, amp=False):
    with torch.no_grad(), torch.autocast(device, enabled=amp):
        zeroshot_weights = []
        for classname in classnames:
            texts = [template.format(classname) for template in templates]
            texts = tokenizer(texts).to(device)  # tokenize
            class_embeddings = model.encode_text(texts)
            class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        zeroshot_weights = torch.stack(zeroshot_weights, dim=1).to(device)
    return zeroshot_weights


def cb_accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    # upstream: float(....sum(0, keepdim=True).cpu().numpy()); NumPy >= 2.? refuses float() of a 1-d array
    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy()[0]) / n for k in topk]


def cb_run_classification(model, classifier, dataloader, device, amp=False):
    pred, true = [], []
    with torch.no_grad():
        for images, target in dataloader:
            images = images.to(device)
            target = target.to(device)
            with torch.autocast(device, enabled=amp):
                image_features = model.encode_image(images)
                image_features = F.normalize(image_features, dim=-1)
                logits = 100. * image_features @ classifier
            true.append(target.cpu())
            pred.append(logits.float().cpu())
    return torch.cat(pred), torch.cat(true)
# ---------------------------------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """(preprocessed image, label) pairs, as torchvision datasets give CLIP_benchmark."""

    def __init__(self, ds: Dataset, indices, labels, transform):
        self.ds, self.indices, self.labels, self.transform = ds, list(indices), list(labels), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        return self.transform(load_image(self.ds.path(self.indices[j]))), self.labels[j]


def test_open_clip_loop_matches_unialign_evaluation(tmp_path, monkeypatch):
    from unialign_train.config import load_config
    from unialign_train.data import load_dataset
    from unialign.zeroshot import get_templates
    from unialign_train.pipeline import make_splits

    out = tiny_run(tmp_path, monkeypatch=monkeypatch)
    ours = next(r for r in out["records"] if r["task"] == "zeroshot_classification")

    model, preprocess, tokenizer = unialign.create_model_and_transforms(out["model_dir"], device="cpu")
    assert not model.training and isinstance(model, torch.nn.Module)
    pickle.loads(pickle.dumps(preprocess))  # DataLoader workers need it picklable

    # the test split, as the pipeline made it: concepts in first-appearance order, labels by concept
    cfg = load_config(None, {"data.dataset": str(tmp_path / "colours-ds"), "data.split": [0.4, 0.2, 0.4]})
    ds = load_dataset(cfg.data.dataset)
    test = make_splits(ds, cfg.data).test
    concepts = list(dict.fromkeys(ds.records[i]["concept"] for i in test))
    classnames = [ds.concept_labels()[c] for c in concepts]
    labels = [concepts.index(ds.records[i]["concept"]) for i in test]
    loader = torch.utils.data.DataLoader(ImageDataset(ds, test, labels, preprocess), batch_size=5, num_workers=0)

    classifier = cb_zero_shot_classifier(model, tokenizer, classnames, get_templates("emoji"), "cpu")
    logits, target = cb_run_classification(model, classifier, loader, "cpu")
    acc1, acc5 = cb_accuracy(logits, target, topk=(1, 5))
    assert len(classnames) > 5 and ours["metrics"]["acc5"] < 1 and 0 < ours["metrics"]["acc1"] < 1  # a real, non-trivial comparison
    assert acc1 == pytest.approx(ours["metrics"]["acc1"], abs=1e-6)  # float32 mean vs exact count: same hits
    assert acc5 == pytest.approx(ours["metrics"]["acc5"], abs=1e-6)  # float32 mean vs exact count: same hits

    # the same numbers through AlignedModel.classify on the raw PIL images
    ranked = model.classify([load_image(ds.path(i)) for i in test], classnames, templates="emoji")
    hits = [r[0][0] == classnames[y] for r, y in zip(ranked, labels)]
    assert np.mean(hits) == pytest.approx(acc1, abs=1e-6)  # float32 mean vs exact count: same hits


def test_open_clip_contract_shapes_and_scale(tmp_path, monkeypatch):
    out = tiny_run(tmp_path, monkeypatch=monkeypatch)
    model, preprocess, tokenizer = unialign.create_model_and_transforms(out["model_dir"])
    ims = [Image.new("RGBA", (12, 12), (255, 0, 0, 128)), Image.new("L", (9, 9), 40)]  # non-RGB inputs too
    pixels = torch.stack([preprocess(im) for im in ims])
    tokens = tokenizer(["red", "a blue square", "x"])
    assert tokenizer("one") == ["one"] and tokens.to("cpu") is tokens
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
        img_n = model.encode_image(pixels, normalize=True)
        a, b, scale = model(pixels, tokens)
    assert img.shape == (2, 8) and txt.shape == (3, 8)
    assert not torch.allclose(img.norm(dim=-1), torch.ones(2))  # unnormalised by default, as open_clip
    assert torch.allclose(img_n, F.normalize(img, dim=-1)) and torch.allclose(a, img_n)
    assert torch.allclose(b, F.normalize(txt, dim=-1), atol=1e-6)
    assert scale.item() == pytest.approx(float(model.logit_scale.exp()), rel=1e-6)
    assert not model.logit_scale.requires_grad
    # the sentence-transformers front end gives the same (normalised) embeddings
    ref = model.encode(["red", "a blue square", "x"], convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(b, ref, rtol=1e-5, atol=1e-6)
    assert model.to("cpu") is model and model.eval() is model


def test_closed_form_model_through_open_clip_interface(tmp_path, monkeypatch):
    out = tiny_run(tmp_path, recipe="procrustes", monkeypatch=monkeypatch)
    model, preprocess, tokenizer = unialign.create_model_and_transforms(out["model_dir"], device="cpu")
    with torch.no_grad():
        txt = model.encode_text(tokenizer(["red", "green"]), normalize=True)
    ref = model.encode(["red", "green"], convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(txt, ref, rtol=1e-5, atol=1e-5)


def test_real_clip_benchmark_if_installed(tmp_path, monkeypatch):
    """When the real package is importable, its functions give the copy's numbers."""
    zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    out = tiny_run(tmp_path, monkeypatch=monkeypatch)
    model, preprocess, tokenizer = unialign.create_model_and_transforms(out["model_dir"], device="cpu")
    names, temps = ["red", "green", "blue"], ["a {c} square", "{c}"]
    w = zs.zero_shot_classifier(model, tokenizer, names, temps, "cpu", amp=False)
    ours = cb_zero_shot_classifier(model, tokenizer, names, ["a {} square", "{}"], "cpu")
    assert torch.allclose(w, ours)


# --- sentence-transformers export of the text tower ------------------------------------------------------
def _st_model(tmp: Path, head: str, text_layers: list[str]):
    """A saved model: tiny image tower + the packaged MiniLM with a random (but fitted-looking) head."""
    from unialign.encoders import load_encoder
    from unialign.model import AlignedModel
    from unialign.projections import Tower

    from tiny import TinyImageEncoder

    register_tiny()
    txt = load_encoder("st:all-MiniLM-L6-v2", device="cpu")
    in_dim = sum(txt.layer_dims[l] for l in text_layers)
    opts = {"layer_dims": [txt.layer_dims[l] for l in text_layers], "width": 32} if head == "layermix" else {}
    torch.manual_seed(0)
    towers = {"image": Tower("linear", 12, 16), "text": Tower(head, in_dim, 16, opts)}
    with torch.no_grad():  # non-trivial standardisation, as fitted heads have
        towers["text"].standardize.mean.normal_(0, 0.05)
        towers["text"].standardize.std.uniform_(0.02, 0.2)
    m = AlignedModel({"image": TinyImageEncoder(), "text": txt}, towers, {"text": text_layers}, logit_scale=20.0)
    return m.save_pretrained(tmp / f"model-{head}")


TEXTS = ["grinning face", "a rocket", "an emoji of a red apple.", "x", "a much longer caption " * 12]


@pytest.mark.parametrize("head,layers,plain", [("linear", ["final"], True), ("mlp", ["final"], False),
                                               ("layermix", ["final", "layer3"], False)])
def test_export_sentence_transformers_reproduces_text_embeddings(tmp_path, head, layers, plain):
    from typer.testing import CliRunner
    from sentence_transformers import SentenceTransformer

    from unialign_cli.main import app
    from unialign.model import AlignedModel

    model_dir = _st_model(tmp_path, head, layers)
    out = tmp_path / "st"
    res = CliRunner().invoke(app, ["export", "--model", str(model_dir), "--format", "sentence-transformers",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "modules.json").exists() and (out / "unialign_export.json").exists()
    ref = AlignedModel.from_pretrained(model_dir, device="cpu").encode(TEXTS, normalize_embeddings=True)
    # a linear head on the final embedding becomes a plain Dense: no unialign code needed to load it
    st = SentenceTransformer(str(out), device="cpu", trust_remote_code=not plain)
    emb = st.encode(TEXTS, batch_size=2)
    assert emb.shape == ref.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert ("Dense" in [type(m).__name__ for m in st]) == plain
    if not plain:
        with pytest.raises(ValueError, match="trust_remote_code"):
            SentenceTransformer(str(out), device="cpu")


def test_export_refuses_what_it_cannot_reproduce(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from unialign_cli.main import app

    out = tiny_run(tmp_path, recipe="procrustes", monkeypatch=monkeypatch)
    res = CliRunner().invoke(app, ["export", "--model", out["model_dir"], "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "st:" in str(res.exception)  # tiny-text is not a sentence-transformers model
    res = CliRunner().invoke(app, ["export", "--model", out["model_dir"], "--format", "onnx", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "unknown format" in str(res.exception)
