"""Encoder/layer selection (unialign select) and the SAIL-style alignment probe, on tiny encoders and data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset
from unialign.encoders import load_encoder, register_encoder
from unialign.errors import ConfigError
from unialign_train.align.probe import alignment_probe, probe, split_rows
from unialign_train.select.selection import (
    Selection,
    auto_layers,
    rank_rows,
    ranked_table,
    resolve_layers,
    run_command,
    score_grid,
    select,
    select_metrics,
)


def _tiny_image(name, device=None, **options):
    enc = TinyImageEncoder(dim=int(name or 12))
    enc.spec = f"tinyimg{int(name or 12)}"
    return enc


def _tiny_text(name, device=None, **options):
    enc = TinyTextEncoder(dim=int(name or 16))
    enc.spec = f"tinytxt{int(name or 16)}"
    return enc


register_encoder("tinyimg", _tiny_image, "tinyimg<dim>")
register_encoder("tinytxt", _tiny_text, "tinytxt<dim>")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one torch thread is fastest


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture()
def tiny_ds(home):
    return make_image_dataset(home / "imgs", n=48)


def _aligned(n=240, d_img=24, d_txt=16, noise=0.3, seed=0):
    """Image features of 60 concepts and text features that are a noisy linear map of them."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) % 60
    centres = rng.normal(size=(60, d_img))
    X = centres[groups] + 0.3 * rng.normal(size=(n, d_img))
    W = rng.normal(size=(d_img, d_txt))
    Y = centres[groups] @ W + noise * rng.normal(size=(n, d_txt))
    return X.astype(np.float32), Y.astype(np.float32), groups


# ------------------------------------------------------------------------------------------ probe


def test_probe_is_higher_for_aligned_than_shuffled_pairs():
    X, Y, g = _aligned()
    aligned = alignment_probe(X, Y, g, steps=60, seed=0)
    perm = np.random.default_rng(1).permutation(len(Y))
    shuffled = alignment_probe(X, Y[perm], g, steps=60, seed=0)
    assert aligned.score > shuffled.score + 0.3
    assert aligned.score > 2 * aligned.chance
    assert set(aligned.recalls) == {"i2t@1", "i2t@5", "t2i@1", "t2i@5"}
    assert aligned.n_train + aligned.n_val == len(X) and aligned.steps == 60


def test_probe_is_deterministic_and_a_metric():
    X, Y, g = _aligned(n=120)
    a = probe(X, Y, g, steps=30, seed=3)
    b = probe(X, Y, g, steps=30, seed=3)
    assert a == b  # the same seed, the same run: bit-identical
    assert a == alignment_probe(X, Y, g, steps=30, seed=3).score  # the metric is the probe's score
    assert "probe" in select_metrics()  # importing the probe registered it with the selection stage


def test_split_rows_keeps_groups_whole():
    g = np.repeat(np.arange(20), 3)
    tr, va = split_rows(len(g), g, 0.25, seed=0)
    assert set(g[tr]).isdisjoint(g[va]) and len(tr) + len(va) == len(g)
    tr2, va2 = split_rows(len(g), g, 0.25, seed=0)
    assert (tr == tr2).all() and (va == va2).all()


def test_probe_rejects_bad_input():
    X, Y, g = _aligned(n=40)
    with pytest.raises(ValueError):
        alignment_probe(X, Y[:-1], g)
    with pytest.raises(ValueError):
        alignment_probe(X, Y, g, steps=0)


# ----------------------------------------------------------------------------------------- layers


def test_layer_resolution():
    img = load_encoder("tinyimg12")
    assert img.spec == "tinyimg12"
    assert resolve_layers(img, "all") == ["hidden", "final"]
    assert auto_layers(img) == ["hidden", "final"]
    # names of several encoders at once: each encoder keeps its own, in depth order
    assert resolve_layers(img, "final,layer3,hidden") == ["hidden", "final"]
    with pytest.raises(ConfigError, match="none of"):
        resolve_layers(img, "block99")


def test_score_grid_ranks_the_aligned_layer_first():
    X, Y, g = _aligned(n=200)
    noise = np.random.default_rng(5).normal(size=X.shape).astype(np.float32)
    rows = score_grid({"img": {"noise": noise, "good": X}}, {"txt": {"final": Y}}, ["mutual_knn", "linear_cka"], k="rice")
    ranked = rank_rows(rows, "mutual_knn")
    assert ranked[0]["image_layer"] == "good" and ranked[0]["rank"] == 1
    assert ranked[0]["scores"]["mutual_knn"] > ranked[1]["scores"]["mutual_knn"]
    cal = score_grid({"img": {"good": X}}, {"txt": {"final": Y}}, ["linear_cka"], calibrate=True, n_perm=3)
    assert cal[0]["scores"]["linear_cka"] == pytest.approx(cal[0]["raw"]["linear_cka"] - cal[0]["null_mean"]["linear_cka"])


def test_run_command_is_shell_quoted():
    cmd = run_command({"image": "effnet-lite0?image_size=128", "image_layer": "block14",
                       "text": "st:all-MiniLM-L6-v2", "text_layer": "final"})
    assert cmd == ("unialign run --set 'encoders.image=effnet-lite0?image_size=128' --set 'layers.image=[block14]' "
                   "--set encoders.text=st:all-MiniLM-L6-v2 --set 'layers.text=[final]'")
    audio = run_command({"audio": "x", "audio_layer": "final", "text": "y", "text_layer": "final"}, "speech.csv",
                        ("audio", "text"))
    assert audio.startswith("unialign run --set data.dataset=speech.csv --set 'align=[audio,text]' --set encoders.audio=x")


# -------------------------------------------------------------------------------------- selection


def _png_is_nontrivial(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 5_000
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert arr.shape[0] > 200 and arr.shape[1] > 200
    assert arr.std() > 10  # not a blank canvas
    assert len(np.unique(arr.reshape(-1, 3)[::7], axis=0)) > 50  # a colour map, text, a colour bar


def test_select_end_to_end_on_tiny_encoders(tiny_ds, home):
    out = home / "sel"
    sel = select(["tinyimg12", "tinyimg20"], "tinytxt16", dataset=tiny_ds, layers="all", sample=40, split="all",
                 metrics="mutual_knn,linear_cka,probe", probe_options={"steps": 10}, out=out, num_workers=0, log=None)
    assert isinstance(sel, Selection)
    assert len(sel.rows) == 2 * 2 * 1  # (2 encoders x 2 layers) x (1 encoder x 1 layer)
    primary = [r["scores"]["mutual_knn"] for r in sel.rows]
    assert primary == sorted(primary, reverse=True) and [r["rank"] for r in sel.rows] == [1, 2, 3, 4]
    assert sel.n == 40 and sel.k == 7  # Rice rule: ceil(2 * 40^(1/3)) = 7

    # the rich table lists every combination, best first
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(ranked_table(sel))
    text = console.export_text()
    assert "mutual_knn" in text and "probe" in text and text.count("tinyimg") == 4

    # one heatmap per encoder pair, really drawn
    assert len(sel.heatmaps) == 2
    for p in sel.heatmaps:
        _png_is_nontrivial(Path(p))

    # the JSON report names the best pair and the command that trains it
    rep = json.loads((out / "selection.json").read_text())
    b = sel.best
    assert rep["best"]["image"] == b["image"] and rep["best"]["image_layer"] == b["image_layer"]
    assert rep["best"]["text"] == "tinytxt16" and rep["primary"] == "mutual_knn"
    assert rep["command"].startswith("unialign run --set ") and f"layers.image=[{b['image_layer']}]" in rep["command"]
    assert len(rep["rows"]) == 4 and rep["layers"]["image"]["tinyimg20"] == ["hidden", "final"]

    # a rerun reuses the feature stores and gives the same ranking
    again = select(["tinyimg12", "tinyimg20"], "tinytxt16", dataset=tiny_ds, layers="all", sample=40, split="all",
                   metrics="mutual_knn,linear_cka,probe", probe_options={"steps": 10}, num_workers=0, log=None)
    assert again.stores == sel.stores
    assert [r["scores"] for r in again.rows] == [r["scores"] for r in sel.rows]


def test_select_mean_captions_and_errors(tiny_ds):
    sel = select("tinyimg12", "tinytxt16", dataset=tiny_ds, layers="final", sample=30, split="all", caption="mean",
                 metrics=["linear_cka"], calibrate=True, n_perm=2, num_workers=0, log=None)
    assert len(sel.rows) == 1 and sel.calibrated and "null_mean" in sel.rows[0]
    with pytest.raises(ConfigError, match="unknown metric"):
        select("tinyimg12", "tinytxt16", dataset=tiny_ds, metrics="nope", log=None)
    with pytest.raises(ConfigError, match="text encoder"):
        select("tinytxt16", "tinytxt16", dataset=tiny_ds, sample=20, split="all", num_workers=0, log=None)


def test_cli_help_and_run(tiny_ds, home):
    from typer.testing import CliRunner

    from unialign_cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["select", "--help"])
    assert res.exit_code == 0
    for opt in ("--images", "--texts", "--layers", "--sample", "--metrics", "--calibrate", "--out"):
        assert opt in res.output
    data = home / "tiny_ds"
    tiny_ds.save(data)
    out = home / "cli_sel"
    res = runner.invoke(app, ["select", "--images", "tinyimg12", "--texts", "tinytxt16", "--data", str(data),
                              "--sample", "30", "--split", "all", "--layers", "all", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "train it with: unialign run --set" in res.output
    assert (out / "selection.json").exists()
