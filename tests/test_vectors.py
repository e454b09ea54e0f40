"""Bring your own embeddings: the ``vectors:`` encoder and a whole `unialign run` on a vectors dataset."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tiny import register_tiny
from unialign.encoders import load_encoder
from unialign.errors import ConfigError, DataError
from unialign.model import AlignedModel


@pytest.fixture()
def table(tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, 6)).astype(np.float32)
    ids = [f"r{i}" for i in range(5)]
    np.save(tmp_path / "v.npy", vecs)
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    np.savez(tmp_path / "v.npz", embeddings=vecs, ids=np.asarray(ids))
    pq.write_table(pa.table({"id": ids, "embedding": vecs.tolist()}), tmp_path / "v.parquet")
    return tmp_path, vecs, ids


def test_vectors_encoder_reads_every_format_by_key(table):
    tmp, vecs, ids = table
    for spec in (f"vectors:{tmp / 'v.npy'}?ids={tmp / 'ids.txt'}", f"vectors:{tmp / 'v.npz'}", f"vectors:{tmp / 'v.parquet'}"):
        enc = load_encoder(spec)
        assert enc.modality == "vector" and enc.dim == 6 and enc.layers == ["final"]
        out = enc.encode(["r3", "r0"])
        assert np.array_equal(out, vecs[[3, 0]])  # the stored vectors as they are
        assert np.array_equal(enc.encode([vecs[1]]), vecs[[1]])  # or vectors given directly
        assert load_encoder(enc.spec).version == enc.version
    by_row = load_encoder(f"vectors:{tmp / 'v.npy'}")  # no ids: keys are row numbers
    assert np.array_equal(by_row.encode(["4"]), vecs[[4]])


def test_vectors_encoder_errors_name_the_problem(table):
    tmp, vecs, _ = table
    enc = load_encoder(f"vectors:{tmp / 'v.npz'}")
    with pytest.raises(DataError, match="key 'nope' is not in"):
        enc.encode(["nope"])
    with pytest.raises(DataError, match=r"takes \(6,\) vectors"):
        enc.encode([np.zeros(4)])
    with pytest.raises(DataError, match="NaN"):
        enc.encode([np.full(6, np.nan)])
    with pytest.raises(ConfigError, match="no such file"):
        load_encoder(f"vectors:{tmp / 'missing.npy'}")
    np.save(tmp / "bad.npy", np.zeros(3))
    with pytest.raises(DataError, match="rows, dim"):
        load_encoder(f"vectors:{tmp / 'bad.npy'}")
    (tmp / "short.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="5 vectors but 2 keys"):
        load_encoder(f"vectors:{tmp / 'v.npy'}?ids={tmp / 'short.txt'}")
    pq.write_table(pa.table({"key": ["a"], "embedding": [[1.0]]}), tmp / "k.parquet")
    with pytest.raises(DataError, match="no column 'id'"):
        load_encoder(f"vectors:{tmp / 'k.parquet'}")
    assert load_encoder(f"vectors:{tmp / 'k.parquet'}?key=key").encode(["a"]).shape == (1, 1)


def _concept_vectors(tmp, n_concepts=40, styles=("a", "b", "c"), dim=24, seed=0):
    """Records of concepts in styles with captions; each record's vector is its concept's latent through a
    fixed map plus a style offset and noise, as an image encoder's embedding of a drawing would be."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_concepts, 8))
    mix, offsets = rng.standard_normal((8, dim)), 2.0 * rng.standard_normal((len(styles), dim))
    rows, keys, vecs = [], [], []
    words = ["red", "blue", "green", "round", "square", "big", "small", "bright"]
    for c in range(n_concepts):
        name = " ".join(words[j] for j in np.argsort(-latent[c])[:2]) + f" thing {c}"
        for s, style in enumerate(styles):
            rid = f"{c}/{style}"
            keys.append(rid)
            vecs.append(latent[c] @ mix + offsets[s] + 0.3 * rng.standard_normal(dim))
            rows.append({"id": rid, "caption": json.dumps([name, f"a {name}"]), "concept": f"c{c}", "label": name, "style": style})
    np.save(tmp / "vectors.npy", np.asarray(vecs, dtype=np.float32))
    (tmp / "ids.txt").write_text("\n".join(keys) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp / "pairs.parquet")
    return tmp / "pairs.parquet"


def test_run_on_your_own_vectors(tmp_path, monkeypatch):
    """`unialign run` aligns a vector table with a text encoder: no encoder written, held-out concepts in a
    held-out style classified well above chance; the saved model embeds new vectors and texts."""
    from unialign_train.config import load_config
    from unialign_train.pipeline import run

    register_tiny()
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    pairs = _concept_vectors(tmp_path)
    cfg = load_config(overrides={
        "align": ["vector", "text"], "data.dataset": str(pairs), "data.train_styles": ["a", "b"],
        "data.test_styles": ["c"], "data.split": [0.6, 0.1, 0.3],
        "encoders.vector": f"vectors:{tmp_path / 'vectors.npy'}?ids={tmp_path / 'ids.txt'}",
        "encoders.text": "st:all-MiniLM-L6-v2", "eval.zero_shot_sets": {}, "extract.num_workers": 0,
        "recipe": "procrustes", "output": str(tmp_path / "run"), "device": "cpu"})
    out = run(cfg, log=lambda s: None)
    recs = {r["task"]: r for r in out["records"]}
    zs = recs["zeroshot_classification"]
    assert zs["dataset"] == "pairs-test-c" and zs["modality"] == "vector" and zs["n_classes"] == 12
    assert zs["metrics"]["acc1"] >= 3 * zs["chance"]["acc1"]
    ret = recs["zeroshot_retrieval"]["metrics"]
    assert set(ret) >= {"vector_retrieval_recall@1", "text_retrieval_recall@10"}
    model = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert model.modalities == ["vector", "text"]
    v = model.encode(np.zeros(24, dtype=np.float32) + 0.1, "vector")
    assert v.shape == (model.embedding_dim,) and np.isfinite(v).all()
    assert torch.equal(model.encode(["0/a"], "vector", convert_to_tensor=True),
                       model.encode([np.load(tmp_path / "vectors.npy")[0]], "vector", convert_to_tensor=True))
