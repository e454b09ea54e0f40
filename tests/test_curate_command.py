"""`unialign curate` / curate_dataset on a tiny dataset with tiny encoders (offline, a few seconds):
exact budget, rows are training-split dataset indices, planted duplicates removed, data.subset trains
on exactly those rows, the CLI writes the files and prints coverage."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset
from unialign.encoders import register_encoder
from unialign_train.align import make_pairs
from unialign_train.config import load_config
from unialign_train.curate import CurateOptionError, curate_dataset, report_path
from unialign_train.data import Dataset, load_dataset, make_splits
from unialign_train.data.subsets import load_subset
from unialign_train.features import cache_features

register_encoder("tiny-img", lambda name, device, **o: TinyImageEncoder(), "tiny-img")
register_encoder("tiny-txt", lambda name, device, **o: TinyTextEncoder(), "tiny-txt")

SETS = {"encoders.image": "tiny-img", "encoders.text": "tiny-txt", "extract.num_workers": 0, "device": "cpu",
        "data.split": [0.6, 0.2, 0.2]}
N_DUP = 3
QUIET = lambda s: None  # noqa: E731


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """A saved tiny dataset (80 records, 7 concepts, 2 styles) plus N_DUP exact copies of training
    records appended at the end, a config naming it, its cached features, and a concepts file."""
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    base = make_image_dataset(tmp_path / "imgs", n=80)
    cfg = load_config(overrides={**SETS, "data.dataset": str(tmp_path / "ds")})
    train = make_splits(base, cfg.data).train
    originals = train[[0, 5, 9]].tolist()
    recs = base.records + [{**base.records[i], "id": f"dup{i}"} for i in originals]
    Dataset("tiny", recs, base.root).save(tmp_path / "ds")
    names = tmp_path / "concepts.txt"
    names.write_text("# targets\nthing 1\nthing 2\n\nthing 5\nthing 6\n")
    ds = load_dataset(str(tmp_path / "ds"))
    encoders = {"image": TinyImageEncoder(), "text": TinyTextEncoder()}
    cached = cache_features(ds, encoders, {}, cfg.extract, QUIET, show_progress=False)
    return {"tmp": tmp_path, "cfg": cfg, "ds": ds, "names": names, "originals": originals, "cached": cached,
            "kw": dict(text_encoder=encoders["text"], media="image", media_encoder=encoders["image"], log=QUIET),
            "copies": list(range(len(base), len(ds)))}


def test_subset_has_budget_and_training_rows_only(env):
    cfg, ds, tmp = env["cfg"], env["ds"], env["tmp"]
    train = make_splits(ds, cfg.data).train
    assert len(train) < len(ds)  # val/test concepts exist and must stay out
    dc = curate_dataset(env["cached"], env["names"], 12, protocol=cfg.data, out=tmp / "sub.parquet", **env["kw"])
    rows = load_subset(tmp / "sub.parquet")
    assert len(rows) == 12 and len(set(rows.tolist())) == 12
    assert np.array_equal(rows, dc.rows)
    assert set(rows.tolist()) <= set(train.tolist())
    assert dc.pool_size == len(train) and set(dc.pool.tolist()) == set(train.tolist())
    table = pq.read_table(tmp / "sub.parquet").to_pydict()
    assert set(table) == {"row", "concept", "concept_index", "score", "source"}
    # concept rows really are captioned with their concept when it is a training concept
    matched = [(r, c) for r, c in zip(table["row"], table["concept"]) if c and ds.records[r]["label"] == c]
    assert matched and all(c in ds.items(r, "text") for r, c in matched)
    report = json.loads(report_path(tmp / "sub.parquet").read_text())
    assert report["n_rows"] == 12 and report["row_meaning"] == "dataset record index"
    assert report["dataset"] == "tiny" and report["pool_size"] == len(train)
    assert set(report["pairs_per_concept"]) == {"thing 1", "thing 2", "thing 5", "thing 6"}


def test_all_records_and_budget_over_pool(env):
    cfg, ds = env["cfg"], env["ds"]
    train = make_splits(ds, cfg.data).train
    dc = curate_dataset(env["cached"], ["thing 0"], len(ds), **env["kw"])  # no protocol: every record is a candidate
    assert sorted(dc.rows.tolist()) == list(range(len(ds)))
    dc = curate_dataset(env["cached"], ["thing 0"], 10_000, protocol=cfg.data, **env["kw"])
    assert sorted(dc.rows.tolist()) == sorted(train.tolist())  # whole pool, with a note
    assert any("exceeds the pool" in n for n in dc.result.notes)


def test_dedup_removes_planted_duplicates(env):
    cfg, ds = env["cfg"], env["ds"]
    train = make_splits(ds, cfg.data).train
    copies = env["copies"]
    assert set(copies) <= set(train.tolist())  # the copies are training pairs
    dc = curate_dataset(env["cached"], env["names"], 10_000, protocol=cfg.data, dedup=0.999, **env["kw"])
    assert dc.dedup_removed == N_DUP
    assert not set(copies) & set(dc.pool.tolist())
    assert set(env["originals"]) <= set(dc.pool.tolist())  # the first occurrence survives
    assert sorted(dc.rows.tolist()) == sorted(set(train.tolist()) - set(copies))
    # without dedup the copies are candidates
    assert set(copies) <= set(curate_dataset(env["cached"], env["names"], 10_000, protocol=cfg.data, **env["kw"]).pool.tolist())


def test_training_on_subset_uses_exactly_those_rows(env):
    cfg, ds, tmp = env["cfg"], env["ds"], env["tmp"]
    dc = curate_dataset(env["cached"], env["names"], 9, protocol=cfg.data, fill="kmeans", out=tmp / "s.parquet", **env["kw"])
    sub_cfg = load_config(overrides={**SETS, "data.dataset": str(tmp / "ds"), "data.subset": str(tmp / "s.parquet")})
    sp = make_splits(ds, sub_cfg.data)
    assert sp.train.tolist() == sorted(dc.rows.tolist())
    full = make_splits(ds, cfg.data)
    assert np.array_equal(sp.val, full.val) and np.array_equal(sp.test, full.test)  # eval protocol unchanged
    pairs = make_pairs(env["cached"], sp.train, "image", "text")
    assert len(pairs) == 9
    assert sorted(pairs.x_flat.tolist()) == sorted(env["cached"]["image"].first_rows(dc.rows)[0].tolist())


def test_media_prototypes_and_no_fill(env):
    cfg, ds = env["cfg"], env["ds"]
    train = set(make_splits(ds, cfg.data).train.tolist())
    dc = curate_dataset(env["cached"], ds, 8, protocol=cfg.data, prototype="media", n_examples=3, **env["kw"])
    assert len(dc.rows) == 8 and set(dc.rows.tolist()) <= train
    assert dc.result.n_fill == 0 and len(dc.result.counts) == 7  # one prototype per concept label
    dc = curate_dataset(env["cached"], env["names"], 12, protocol=cfg.data, fill="none", top_k=1, **env["kw"])
    assert len(dc.rows) <= 4 and dc.result.n_fill == 0 and set(dc.rows.tolist()) <= train


def test_option_errors(env):
    cached, names, kw = env["cached"], env["names"], env["kw"]
    with pytest.raises(CurateOptionError, match="concepts \\*dataset\\*"):
        curate_dataset(cached, names, 5, prototype="media", **kw)
    with pytest.raises(CurateOptionError, match="fill"):
        curate_dataset(cached, names, 5, fill="random", **kw)
    with pytest.raises(CurateOptionError, match="budget"):
        curate_dataset(cached, names, 0, **kw)


def test_cli_curate(env):
    from unialign_cli.main import app

    tmp = env["tmp"]
    args = ["curate", "--data", str(tmp / "ds"), "--concepts", str(env["names"]), "--budget", "10",
            "--dedup", "0.999", "--out", str(tmp / "cli.parquet")]
    for k, v in SETS.items():
        args += ["--set", f"{k}={v if not isinstance(v, list) else json.dumps(v)}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "concepts with no candidates: none" in res.output and "thing 5" in res.output
    assert "3 near-duplicates removed" in res.output
    rows = load_subset(tmp / "cli.parquet")
    assert len(rows) == 10 and not set(rows.tolist()) & set(env["copies"])
    res = CliRunner().invoke(app, ["curate", "--concepts", str(env["names"]), "--budget", "5", "--out",
                                   str(tmp / "x.parquet"), "--fill", "bogus", *args[args.index("--set"):]])
    assert res.exit_code != 0
