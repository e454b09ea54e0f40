"""`unialign report` on a tiny synthetic run: every PNG and both pages are written and agree with the run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unialign_train.data.records import Dataset

from tiny import register_tiny

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "cyan": (30, 220, 220), "magenta": (220, 30, 220), "white": (245, 245, 245), "black": (10, 10, 10),
           "orange": (240, 140, 20), "purple": (120, 30, 160), "grey": (128, 128, 128), "brown": (120, 70, 20)}


def tiny_run_folder(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`unialign run` on tiny encoders and a 12-colour, 3-style dataset (a few seconds)."""
    from unialign_train.config import load_config
    from unialign_train.pipeline import run

    register_tiny()
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp / "home"))
    img_dir = tmp / "img"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    recs = []
    for ci, (name, rgb) in enumerate(COLOURS.items()):
        for s in range(3):
            arr = np.clip(np.asarray(rgb)[None, None] + rng.normal(0, 25, (10, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(img_dir / f"{name}_{s}.png")
            recs.append({"id": f"{name}/{s}", "image": f"{name}_{s}.png", "text": [name, f"a {name} square"],
                         "concept": f"c{ci}", "label": name, "style": f"s{s}", "category": "warm" if ci % 2 else "cool"})
    Dataset("colours", recs, img_dir).save(tmp / "ds")
    cfg = load_config(None, {"data.dataset": str(tmp / "ds"), "data.split": [0.4, 0.2, 0.4],
                             "encoders.image": "tiny-image", "encoders.text": "tiny-text", "extract.dtype": "float32",
                             "extract.num_workers": 0, "eval.zero_shot_sets": {}, "eval.templates": "emoji",
                             "recipe": "linear", "output": str(tmp / "run"), "name": "tiny",
                             "train.max_steps": 40, "train.eval_every": 10, "train.batch_size": 8, "train.dim": 8})
    run(cfg, log=lambda *_: None)
    return tmp / "run"


@pytest.mark.numerics
def test_report_command_writes_plots_and_pages(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from unialign_cli.main import app

    run_dir = tiny_run_folder(tmp_path, monkeypatch)
    res = CliRunner().invoke(app, ["report", str(run_dir), "--queries", "3", "--k", "4"])
    assert res.exit_code == 0, res.output
    out = run_dir / "report"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["report_curves.png", "report_per_class_colours-test.png", "report_retrieval.png"]
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
            assert np.asarray(im.convert("L")).std() > 5  # something was drawn
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for name in pngs:
        assert f"]({name})" in md and f'src="{name}"' in page
    assert "## Retrieval examples" in md and "<table>" in page and "zeroshot_classification" in md

    # the saved and the recomputed accuracies both equal an independent computation: raw images through
    # the saved model (not the cached features), class vectors averaged by hand, argmax in numpy
    saved = json.loads(next((run_dir / "results").glob("colours-test_*zeroshot_classification.json")).read_text())
    row = next(l for l in md.splitlines() if l.startswith("| colours-test | ") and l.count("|") == 6)
    cells = [c.strip() for c in row.strip("|").split("|")]
    truth, n = _independent_acc1(run_dir)
    one_item = 100 / n  # float32 features here vs the store's: a near-tie may flip one item, no more
    assert float(cells[1]) == pytest.approx(100 * saved["metrics"]["acc1"], abs=0.01)
    assert float(cells[2]) == pytest.approx(100 * truth, abs=one_item + 0.01)
    assert float(cells[1]) == pytest.approx(100 * truth, abs=one_item + 0.01)


def _independent_acc1(run_dir: Path) -> tuple[float, int]:
    from unialign.model import AlignedModel
    from unialign.zeroshot import get_templates
    from unialign_train.data import DataConfig, load_dataset, make_splits

    cfg = json.loads((run_dir / "run.json").read_text())["config"]
    model = AlignedModel.from_pretrained(run_dir / "model")
    ds = load_dataset(cfg["data"]["dataset"])
    test = make_splits(ds, DataConfig(**cfg["data"])).test
    concepts = list(dict.fromkeys(ds.records[i]["concept"] for i in test))
    labels = np.asarray([concepts.index(ds.records[i]["concept"]) for i in test])
    label_of = ds.concept_labels()
    emb = np.stack([model.encode(ds.path(int(i)), "image", normalize_embeddings=True) for i in test])
    weights = []
    for c in concepts:
        t = np.stack([model.encode(tpl.format(label_of[c]), "text", normalize_embeddings=True)
                      for tpl in get_templates(cfg["eval"]["templates"])])
        w = t.mean(0)
        weights.append(w / np.linalg.norm(w))
    return float(np.mean(np.argmax(emb @ np.stack(weights).T, axis=1) == labels)), len(test)


def test_report_pieces(tmp_path):
    from unialign_train.report import ZeroShot, plot_curves, plot_per_class

    hist = [{"step": s, "loss": 3 / s, "temperature": 0.07, "lr": 1e-3, "val_acc1": 0.1 * s / 50, "val_acc5": 0.3}
            for s in (10, 20, 30)]
    assert plot_curves(hist, tmp_path / "c.png", best_step=20).exists()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 60, 300)
    top5 = np.stack([labels, *(rng.integers(0, 60, 300) for _ in range(4))], 1)
    top5[::3, 0], top5[::3, 1] = (labels[::3] + 1) % 60, labels[::3]  # a third right only at rank 2
    zs = ZeroShot("many", [f"c{i}" for i in range(60)], labels, top5, np.arange(300))
    assert zs.acc1 == pytest.approx(2 / 3, abs=0.01) and zs.acc5 == 1.0
    _, kind = plot_per_class(zs, tmp_path / "h.png")
    assert kind == "histogram"  # 60 classes and no categories
    zs.groups = ["a" if i % 2 else "b" for i in range(300)]
    _, kind = plot_per_class(zs, tmp_path / "g.png")
    assert kind == "category" and (tmp_path / "g.png").exists()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    from unialign.errors import UnialignError
    from unialign_train.report import report

    with pytest.raises(UnialignError, match="not a finished run"):
        report(tmp_path, show_progress=False)
