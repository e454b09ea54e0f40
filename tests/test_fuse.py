"""The fuse stage: each fusion module's shapes and one behaviour that can be checked by hand, the
missing-modality paths, the training loop, the metrics it reports, and fusion beating chance on held-out
concepts of real emoji features."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from unialign.projections import LayerMixHead
from unialign_train.data import Dataset
from unialign_train.evaluate import (binary_auc, expected_calibration_error, logit_scores, precision_recall_f1,
                                     regression_scores)
from unialign_train.fuse.data import FuseData, Target, leak_free_caption, prepare
from unialign_train.fuse.modules import (Batch, Bridge, BridgeFusion, ConcatMLP, LateFusion, LegoBlock, LegoFuse,
                                         LegoMerge, ManagerFusion, merge_latents, merged_head, presence_weights, with_null)
from unialign_train.fuse.tokens import TokenBatch, TokenStore
from unialign_train.fuse.train import FuseConfig, drop_modalities, evaluate, train_fusion

B, N_OUT = 5, 3
IMAGE_DIMS, TEXT_DIMS = [6, 8, 10], [7, 7, 7]


def token_batch(b: int, t: int, dims: list[int], lengths: list[int], seed: int) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    layers = [torch.randn(b, t, d, generator=g) * mask[..., None] for d in dims]
    words = torch.where(mask, torch.arange(t)[None, :].expand(b, t), torch.full((b, t), -1))
    return TokenBatch(layers, mask, words)


@pytest.fixture
def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    tokens = {"image": token_batch(B, 4, IMAGE_DIMS, [4] * B, 1), "text": token_batch(B, 6, TEXT_DIMS, [6, 3, 2, 5, 1], 2)}
    pooled = {"image": torch.randn(B, 12, generator=g), "text": torch.randn(B, 9, generator=g)}
    present = {"image": torch.ones(B, dtype=torch.bool), "text": torch.tensor([True, True, False, True, False])}
    return Batch(pooled, tokens, present)


def all_present(batch: Batch) -> Batch:
    return Batch(batch.pooled, batch.tokens, {m: torch.ones_like(p) for m, p in batch.present.items()})


def modules() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dims = {"image": IMAGE_DIMS, "text": TEXT_DIMS}
    blocks = [LegoBlock("image", IMAGE_DIMS[-1], N_OUT, latents=4, width=8, heads=2),
              LegoBlock("text", TEXT_DIMS[-1], N_OUT, latents=4, width=8, heads=2)]
    return {"late": LateFusion({"image": 12, "text": 9}, N_OUT, hidden=16),
            "concat": ConcatMLP({"image": 12, "text": 9}, N_OUT, hidden=16),
            "manager": ManagerFusion(dims, N_OUT, width=8, depth=2, heads=2, hidden=16),
            "bridge": BridgeFusion(dims, N_OUT, width=8, depth=2, heads=2, hidden=16),
            "lego-block": blocks[0], "lego-merge": LegoMerge(blocks), "lego-fuse": LegoFuse(blocks)}


@pytest.mark.parametrize("name", ["late", "concat", "manager", "bridge", "lego-block", "lego-merge", "lego-fuse"])
def test_every_module_gives_one_output_row_per_record_with_and_without_a_modality(name: str, batch: Batch) -> None:
    model = modules()[name].eval()
    with torch.no_grad():
        full, missing = model(all_present(batch)), model(batch)
    assert full.shape == missing.shape == (B, N_OUT)
    assert torch.isfinite(full).all() and torch.isfinite(missing).all()
    if len(model.modalities) > 1:  # records 2 and 4 lack text: their outputs change, the others' do not
        assert not torch.allclose(full[[2, 4]], missing[[2, 4]])
        torch.testing.assert_close(full[[0, 1, 3]], missing[[0, 1, 3]])


def test_a_manager_with_one_hot_weights_is_that_layer() -> None:
    """ManagerTower's manager (a LayerMixHead applied per token): weights one-hot on layer j give
    layer j's LayerNorm + map, then the inner map."""
    torch.manual_seed(0)
    mgr = LayerMixHead(sum(IMAGE_DIMS), 8, IMAGE_DIMS, width=8)
    x = torch.randn(5, sum(IMAGE_DIMS))
    with torch.no_grad():
        mgr.weights.copy_(torch.tensor([[-1e4], [0.0], [-1e4]]))
        want = mgr.inner(mgr.maps[1](mgr.norms[1](x[:, 6:14])))
    torch.testing.assert_close(mgr(x), want)
    with torch.no_grad():
        mgr.weights.zero_()  # equal weights: the mean of the three, not layer 1
    assert not torch.allclose(mgr(x), want)


def test_manager_fusion_starts_from_equal_weights_and_reports_them() -> None:
    model = modules()["manager"]
    weights = model.mix_weights()
    assert weights["image"][0] == pytest.approx([1 / 3] * 3) and weights["text"][1] == pytest.approx([1 / 4] * 4)


def test_a_bridge_is_layernorm_of_the_stream_plus_the_mapped_layer() -> None:
    torch.manual_seed(0)
    bridge = Bridge(6, 8)
    z, x = torch.randn(3, 4, 8), torch.randn(3, 4, 6)
    torch.testing.assert_close(bridge(z, x), torch.nn.functional.layer_norm(z + x @ bridge.proj.weight.T + bridge.proj.bias, (8,)))
    with torch.no_grad():
        bridge.proj.weight.zero_()
        bridge.proj.bias.zero_()
    assert torch.equal(bridge(z, x), bridge.norm(z))  # nothing bridged: the stream, normalised


def test_bridges_need_one_more_unimodal_layer_than_cross_layers() -> None:
    with pytest.raises(ValueError, match="need 3 unimodal layers"):
        BridgeFusion({"image": [4, 4], "text": [4, 4, 4]}, 2, width=8, depth=2, heads=2)


def test_harmonic_merge_by_hand() -> None:
    """Magnitudes 1 and 3 at equal weights: harmonic mean 2*1*3/(1+3) = 1.5; phases 0 and pi/2: pi/4."""
    a = torch.polar(torch.tensor([1.0]), torch.tensor([0.0]))
    b = torch.polar(torch.tensor([3.0]), torch.tensor([math.pi / 2]))
    merged = merge_latents(torch.stack([a, b])[:, None], torch.full((2, 1), 0.5))
    assert merged.abs().item() == pytest.approx(1.5, rel=1e-6)
    assert torch.angle(merged).item() == pytest.approx(math.pi / 4, rel=1e-6)
    # phases either side of -pi/+pi average to pi, not to 0 (the reference code's arithmetic mean)
    c = torch.polar(torch.ones(2), torch.tensor([math.pi - 0.1, -math.pi + 0.1]))
    assert abs(torch.angle(merge_latents(c[:, None], torch.full((2, 1), 0.5))).item()) == pytest.approx(math.pi, rel=1e-6)
    assert merge_latents(torch.stack([a, b])[:, None], torch.full((2, 1), 0.5), "mean").item() == pytest.approx(0.5 + 1.5j)


@pytest.mark.parametrize("rule", ["harmonic", "mean"])
def test_legomerge_of_two_identical_blocks_is_the_block(rule: str, batch: Batch) -> None:
    torch.manual_seed(0)
    block = LegoBlock("text", TEXT_DIMS[-1], N_OUT, latents=4, width=8, heads=2).eval()
    twin = copy.deepcopy(block)
    twin.modality = "text2"
    merged = LegoMerge([block, twin], rule).eval()
    both = Batch(batch.pooled, {"text": batch.tokens["text"], "text2": batch.tokens["text"]},
                 {"text": torch.ones(B, dtype=torch.bool), "text2": torch.ones(B, dtype=torch.bool)})
    with torch.no_grad():
        torch.testing.assert_close(merged(both), block(both), atol=1e-5, rtol=1e-5)


def test_legomerge_of_a_record_with_one_modality_is_that_block(batch: Batch) -> None:
    merged = modules()["lego-merge"].eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch)[[2, 4]], merged.blocks["image"](batch)[[2, 4]], atol=1e-5, rtol=1e-5)


def test_lego_blocks_of_different_encoders_share_one_latent_shape(batch: Batch) -> None:
    """What makes blocks mergeable: (B, latents, width) complex latents whatever the token width/length."""
    blocks = modules()["lego-merge"].blocks
    with torch.no_grad():
        shapes = {m: b.encode(batch.tokens[m]) for m, b in blocks.items()}
    assert {tuple(z.shape) for z in shapes.values()} == {(B, 4, 8)} and all(z.is_complex() for z in shapes.values())


def test_legofuse_without_the_second_modality_reads_the_first_blocks_latent(batch: Batch) -> None:
    """Records 2 and 4 lack text: the text block is skipped, the image block's latent goes to the averaged heads."""
    fuse = modules()["lego-fuse"].eval()
    blocks = list(fuse.blocks.values())
    with torch.no_grad():
        want = merged_head(blocks, blocks[0].encode(batch.tokens["image"]), torch.full((2, B), 0.5))
        out = fuse(batch)
    torch.testing.assert_close(out[[2, 4]], want[[2, 4]])
    assert not torch.allclose(out[[0, 1, 3]], want[[0, 1, 3]])  # with text, the stacked text block changes it
    assert presence_weights(batch, ["image", "text"])[:, 2].tolist() == [1.0, 0.0]


def test_concat_mlp_sees_zeros_and_a_zero_flag_for_a_missing_modality(batch: Batch) -> None:
    concat = modules()["concat"].eval()
    with torch.no_grad():
        x = torch.cat([concat.norms["image"](batch.pooled["image"]), torch.zeros(B, 9), torch.ones(B, 1),
                       batch.present["text"].float()[:, None]], 1)
        torch.testing.assert_close(concat(batch)[[2, 4]], concat.mlp(x)[[2, 4]])


def test_late_fusion_averages_the_heads_a_record_has(batch: Batch) -> None:
    late = modules()["late"].eval()
    with torch.no_grad():
        heads = late.per_modality(batch)
        out = late(batch)
    torch.testing.assert_close(out[0], (heads["image"][0] + heads["text"][0]) / 2)
    torch.testing.assert_close(out[2], heads["image"][2])


def test_gather_pads_to_the_longest_and_cuts_after_max_tokens() -> None:
    """Items of 3, 1 and 5 tokens (rows 0..8 of a store whose token k has the value k)."""
    store = TokenStore(None, {"layers": ["final"], "layer_dims": {"final": 1}}, ["a", "b", "c"], np.array([0, 3, 4, 9]),
                       np.arange(9), {"final": np.arange(9, dtype=np.float16)[:, None]})
    whole = store.gather([0, 1, 2, -1])
    assert whole.mask.sum(1).tolist() == [3, 1, 5, 0] and whole.layers[0][2, :, 0].tolist() == [4, 5, 6, 7, 8]
    cut = store.gather([0, 1, 2], max_tokens=2)
    assert cut.mask.shape == (3, 2) and cut.layers[0][:, :, 0].tolist() == [[0, 1], [3, 0], [4, 5]]
    assert cut.words[2].tolist() == [4, 5]
    fixed = store.gather([1], pad_to=store.max_tokens, max_tokens=4)  # a fixed length, capped too
    assert fixed.mask.tolist() == [[True, False, False, False]]


def test_with_null_gives_a_missing_record_one_learned_token() -> None:
    x, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, True, True]])
    null = torch.arange(4.0)
    y, m = with_null(x, mask, torch.tensor([True, False]), null)
    assert torch.equal(y[0], x[0]) and torch.equal(m[0], mask[0])
    assert torch.equal(y[1, 0], null) and not y[1, 1:].any() and m[1].tolist() == [True, False, False]


def test_modality_dropout_hides_one_of_several_never_a_lone_one() -> None:
    present = {"image": np.ones(4000, bool), "text": np.r_[np.ones(2000, bool), np.zeros(2000, bool)]}
    drop = drop_modalities(present, 0.3, np.random.default_rng(0))
    assert not (drop["image"] & drop["text"]).any()
    assert not drop["image"][2000:].any() and not drop["text"][2000:].any()  # image is all they have
    rate = (drop["image"][:2000] | drop["text"][:2000]).mean()
    assert 0.26 < rate < 0.34 and 0.3 < drop["image"][:2000].sum() / (rate * 2000) < 0.7


# -- metrics -----------------------------------------------------------------------------------------------
def test_auc_counts_ties_as_one_half() -> None:
    # positives 0.8, 0.5; negatives 0.5, 0.2: pairs (0.8>0.5), (0.8>0.2), (0.5=0.5 -> 1/2), (0.5>0.2) -> 3.5 / 4
    assert binary_auc([0.8, 0.5, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert binary_auc([0.1, 0.9], [1, 0]) == 0.0 and math.isnan(binary_auc([0.3, 0.4], [1, 1]))


def test_ece_by_hand() -> None:
    # bin [0.2, 0.267): p 0.2, 0.2, outcomes 0, 1 -> |0.2 - 0.5| = 0.3; bin of 0.9: p 0.9, outcome 1 -> 0.1
    assert expected_calibration_error([0.2, 0.2, 0.9], [0, 1, 1]) == pytest.approx((2 * 0.3 + 0.1) / 3)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0


def test_precision_recall_f1_and_regression_by_hand() -> None:
    assert precision_recall_f1([1, 1, 0, 0], [1, 0, 1, 0]) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    assert math.isnan(precision_recall_f1([0, 0], [0, 0])["f1"])
    s = regression_scores([1.0, 2.0, 4.0], [1.0, 3.0, 5.0])
    assert s["mae"] == pytest.approx(2 / 3) and s["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert s["r2"] == pytest.approx(1 - 2 / 8)  # squared errors 0 + 1 + 1, squares around the mean 3: 4 + 0 + 4
    s = logit_scores(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2]]), [1, 2])
    assert s["acc1"] == 0.5 and s["acc5"] == 1.0 and s["mean_per_class_recall"] == 0.5


# -- data ----------------------------------------------------------------------------------------------
def test_the_caption_naming_the_target_is_dropped() -> None:
    rec = {"text": ["grinning face", "grinning face: cheerful, smile", "face smiling"], "subcategory": "face-smiling",
           "category": "Smileys & Emotion"}
    assert leak_free_caption(rec, "subcategory") == "grinning face: cheerful, smile"
    assert leak_free_caption({"text": ["face smiling"], "subcategory": "face-smiling"}, "subcategory") is None
    assert leak_free_caption(rec, "category") == "grinning face: cheerful, smile"


def synthetic_data(n_per: int = 30, seed: int = 0) -> FuseData:
    """Three classes; the image features say the class half the time, the text features the rest of
    the time (each modality alone is about 2/3 right, both together nearly always)."""
    rng = np.random.default_rng(seed)
    n = 3 * n_per * 3
    y = np.repeat(np.arange(3), n // 3)
    informative = rng.random(n) < 0.5
    img = rng.normal(size=(n, 6)).astype(np.float32)
    txt = rng.normal(size=(n, 5)).astype(np.float32)
    img[informative, y[informative]] += 4.0
    txt[~informative, y[~informative]] += 4.0
    recs = [{"id": str(i), "concept": f"c{i}", "label": "", "style": "", "t": str(y[i])} for i in range(n)]
    ds = Dataset("synthetic", recs)
    order = rng.permutation(n)
    parts = {"train": order[: n // 3 * 2], "val": order[n // 3 * 2 : n // 6 * 5], "test": order[n // 6 * 5 :]}
    tokens = {m: TokenStore(None, {"layers": ["final"], "layer_dims": {"final": x.shape[1]}}, [str(i) for i in range(n)],
                            np.arange(n + 1), np.full(n, -1), {"final": x.astype(np.float16)})
              for m, x in (("image", img), ("text", txt))}
    has = {m: np.ones(n, bool) for m in ("image", "text")}
    return FuseData(ds, "t", Target("classification", ["0", "1", "2"]), y.astype(np.int64), parts,
                    {m: [str(i) for i in range(n)] for m in has}, {"image": img, "text": txt}, has, tokens,
                    {m: np.arange(n) for m in has})


def test_training_is_seeded_and_fusion_uses_both_modalities(one_thread) -> None:
    data = synthetic_data()
    cfg = FuseConfig(epochs=40, batch_size=32, hidden=32, patience=0, lr=3e-3)
    runs = [train_fusion(ConcatMLP(data.dims(), 3, hidden=32), data, cfg) for _ in range(2)]
    a, b = (evaluate(t.model, data, "test") for t in runs)
    assert a == b  # same seed, same data, same code path: bit-identical
    alone = {m: evaluate(runs[0].model, data, "test", without=[m])["acc1"] for m in ("image", "text")}
    assert a["acc1"] > 0.9 and max(alone.values()) < 0.85, (a, alone)
    lego = train_fusion(LegoBlock("text", 5, 3, latents=4, width=16, heads=2), data, cfg.model_copy(update={"epochs": 15}))
    assert evaluate(lego.model, data, "test")["acc1"] > 0.5  # text alone: about 2/3 of records are learnable


def test_regression_target_is_standardised_for_training_and_scored_in_its_units(one_thread) -> None:
    rng = np.random.default_rng(0)
    n = 240
    x = rng.normal(size=(n, 16)).astype(np.float32)  # MLP heads LayerNorm their input: give it some width
    value = 50 + 10 * x[:, 0]
    recs = [{"id": str(i), "concept": f"c{i}", "label": "", "style": "", "year": float(value[i])} for i in range(n)]
    ds = Dataset("numbers", recs)

    class _Cached:  # what prepare reads from cache_features: per modality its store's items and features
        def __getitem__(self, m):
            store = type("S", (), {"items": lambda self: [str(i) for i in range(n)]})()
            feats = type("F", (), {"dim": 16, "__getitem__": lambda self, rows: x[rows]})()
            return type("M", (), {"store": store, "features": feats})()

        modalities = {"vector": None}

    ds.records = [{**r, "vector": r["id"]} for r in recs]
    data = prepare(ds, {"train": range(160), "val": range(160, 200), "test": range(200, n)}, "year", "regression", _Cached())
    assert data.target.mean == pytest.approx(value[:160].mean(), rel=1e-5) and data.target.n_out == 1
    t = train_fusion(LateFusion(data.dims(), 1, hidden=32), data, FuseConfig(epochs=60, batch_size=32, patience=0, lr=3e-3))
    s = evaluate(t.model, data, "test")
    chance = data.target.chance(data.y[data.parts["test"]])
    assert s["r2"] > 0.75 and s["mae"] < chance["mae"] / 2, (s, chance)  # chance: R^2 0, the training mean


# -- the command -----------------------------------------------------------------------------------------
def tiny_categories(tmp_path) -> str:
    """A saved tiny dataset (60 records, 7 concepts in 2 styles) whose records carry a category."""
    from tiny import make_image_dataset

    base = make_image_dataset(tmp_path / "imgs", n=60)
    recs = [{**r, "category": "even" if int(r["concept"][1:]) % 2 == 0 else "odd"} for r in base.records]
    Dataset("tiny-cat", recs, base.root).save(tmp_path / "ds")
    return str(tmp_path / "ds")


def test_fuse_train_command_writes_every_method_row(tmp_path, monkeypatch, one_thread) -> None:
    import json

    from typer.testing import CliRunner

    from tiny import register_tiny
    from unialign_cli.main import app

    register_tiny()
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    sets = ["--set", f"data.dataset={tiny_categories(tmp_path)}", "--set", "encoders.image=tiny-image", "--set",
            "encoders.text=tiny-text", "--set", "extract.num_workers=0", "--set", "device=cpu"]
    res = CliRunner().invoke(app, ["fuse", "train", "--target", "category", "--methods", "late,concat,manager,lego",
                                   "--param", "epochs=2", "--param", "batch_size=8", "--out", str(tmp_path / "out"), *sets])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "fusion-category.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["image alone", "text alone", "late fusion", "concat-MLP", "Manager",
                                                    "LegoBlock image", "LegoBlock text", "LegoMerge", "LegoFuse"]
    assert all(set(r["without"]) == {"image", "text"} for r in saved["rows"] if "alone" not in r["method"]
               and "Block" not in r["method"])
    table = (tmp_path / "out" / "fusion-category.md").read_text()
    assert "| LegoMerge |" in table and "without text" in table and "vs best single" in table
    res = CliRunner().invoke(app, ["fuse", "train", "--methods", "late,tower", *sets])  # `main` prints it in one line
    assert res.exit_code == 1 and "--methods: choose from" in str(res.exception)
    res = CliRunner().invoke(app, ["fuse", "train", "--param", "width=-1", *sets])
    assert res.exit_code == 1 and "--param.width" in str(res.exception)


def test_the_best_single_modality_is_the_lowest_mae_for_regression() -> None:
    from unialign_train.fuse.tables import fusion_table, summarize

    def row(method: str, family: str, seed: int, mae: float) -> dict:
        return {"method": method, "family": family, "seed": seed, "test": {"mae": mae, "r2": 0.5}, "without": {},
                "parameters": 10, "seconds": 1.0}

    rows = [row("a alone", "unimodal", s, 2.0) for s in (0, 1)] + [row("b alone", "unimodal", s, 3.0) for s in (0, 1)]
    rows += [row("late fusion", "baseline", 0, 1.5), row("late fusion", "baseline", 1, 2.5)]
    assert summarize(rows, "mae", lower_is_better=True)[0]["best_single"] == "a alone"
    assert summarize(rows, "mae")[0]["best_single"] == "b alone"  # read as higher-is-better, as accuracy is
    table = fusion_table(rows, "regression")
    assert "vs best single (a alone)" in table and "(1/2 seeds below)" in table
