"""Feature store: layout, memory-mapped reads, resume after a kill, bad inputs, integrity checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset
from unialign.errors import DataError, StoreError
from unialign_train.features.extract import extract
from unialign_train.features.store import FeatureStore

HERE = Path(__file__).parent


def _arrays(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_store_layout_and_reads(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=30)
    store = extract(ds, TinyImageEncoder(), tmp_path / "st", layers=["hidden"], shard_size=8, batch_size=3,
                    num_workers=0, show_progress=False)
    assert (tmp_path / "st/img_emb/img_emb_00000.npy").exists()
    assert (tmp_path / "st/img_emb/layers/hidden/img_emb_00003.npy").exists()
    assert (tmp_path / "st/metadata/metadata_00000.parquet").exists()
    assert len(store) == 30 and store.dim == 12 and store.layers == ["final", "hidden"]
    arr = store.array()
    assert arr.shape == (30, 12) and arr.dtype == np.float16
    full = arr.numpy()
    idx = np.array([29, 0, 7, 8, 15, 16])
    assert np.array_equal(arr[idx], full[idx])  # gathers across shards
    assert store.index.tolist() == list(range(30))
    direct = TinyImageEncoder().encode([ds.path(i) for i in range(30)], batch_size=30)
    # float16 storage of float32 features: relative error at most 2**-11 per value
    np.testing.assert_allclose(full.astype(np.float32), direct, rtol=2**-10, atol=1e-6)
    # rerun: a no-op returning the same store
    t = time.perf_counter()
    again = extract(ds, TinyImageEncoder(), tmp_path / "st", layers=["hidden"], shard_size=8, batch_size=3,
                    num_workers=0, show_progress=False)
    assert again.manifest == store.manifest and time.perf_counter() - t < 2


def test_text_store_holds_unique_captions(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=20)
    store = extract(ds, TinyTextEncoder(), tmp_path / "txt", shard_size=16, dtype="float32", show_progress=False)
    assert store.modality == "text" and store.items() == ds.unique_items("text")
    assert len(store) == len(set(c for r in ds.records for c in r["text"]))
    assert (tmp_path / "txt/text_emb/text_emb_00001.npy").exists()


def test_bad_images_are_skipped_and_listed(tmp_path):
    bad = {3: "empty", 5: "truncated", 8: "text", 11: "missing"}
    ds = make_image_dataset(tmp_path / "imgs", n=16, bad=bad)
    store = extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=5, batch_size=4, num_workers=1, show_progress=False)
    assert len(store) == 12
    assert sorted(s["index"] for s in store.skipped) == sorted(bad)
    reasons = {s["index"]: s["reason"] for s in store.skipped}
    assert "empty" in reasons[3] and "does not exist" in reasons[11] and "not a readable image" in reasons[8]
    assert 3 not in store.index and store.index.tolist() == [i for i in range(16) if i not in bad]
    with pytest.raises(DataError, match="img_003.png"):
        extract(ds, TinyImageEncoder(), tmp_path / "strict", shard_size=5, num_workers=0, strict=True, show_progress=False)
    # shards finished before the error are kept
    assert (tmp_path / "strict/shards/shard_00000.json").exists() is False  # bad item 3 is in shard 0
    ok = make_image_dataset(tmp_path / "imgs2", n=16, bad={12: "empty"})
    with pytest.raises(DataError):
        extract(ok, TinyImageEncoder(), tmp_path / "strict2", shard_size=5, num_workers=0, strict=True, show_progress=False)
    assert (tmp_path / "strict2/shards/shard_00001.json").exists()


def test_store_of_other_inputs_is_refused(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=10)
    extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=4, num_workers=0, show_progress=False)
    with pytest.raises(StoreError, match="other inputs"):
        extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=4, dtype="float32", num_workers=0, show_progress=False)
    s = extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=4, dtype="float32", num_workers=0,
                overwrite=True, show_progress=False)
    assert s.array().dtype == np.float32


def test_corrupt_shard_is_detected(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=10)
    extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=4, num_workers=0, show_progress=False)
    f = tmp_path / "st/img_emb/img_emb_00001.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum mismatch in img_emb/img_emb_00001.npy"):
        FeatureStore.open(tmp_path / "st")
    with pytest.raises(StoreError, match="no manifest.json"):
        FeatureStore.open(tmp_path / "nothing")


def test_nan_rows_are_reported(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=6)
    store = extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=6, num_workers=0, dtype="float32", show_progress=False)
    store.check_finite()
    f = tmp_path / "st/img_emb/img_emb_00000.npy"
    a = np.load(f)
    a[2, 0] = np.nan
    np.save(f, a)
    with pytest.raises(StoreError, match="1 row"):
        FeatureStore.open(tmp_path / "st", verify=False).check_finite()


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from tiny import TinyImageEncoder, make_image_dataset
from unialign_train.data.records import Dataset
from unialign_train.features import extract, shards
from pathlib import Path
ds = Dataset.load({ds!r})
slow = shards._ShardWriter._write
def _write(self, items):  # slow down so the kill lands mid-run
    time.sleep(0.15)
    slow(self, items)
shards._ShardWriter._write = _write
extract(ds, TinyImageEncoder(), {out!r}, shard_size=4, batch_size=2, num_workers=0, show_progress=False)
"""


def test_kill_and_resume_is_byte_identical(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=40)
    ds.save(tmp_path / "ds")
    ref = extract(ds, TinyImageEncoder(), tmp_path / "ref", shard_size=4, batch_size=2, num_workers=0, show_progress=False)
    out = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(HERE), ds=str(tmp_path / "ds"), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", script], env=env)
        deadline = time.time() + 60
        done_before = len(list((out / "shards").glob("shard_*.json"))) if out.exists() else 0
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and len(list((out / "shards").glob("shard_*.json"))) >= done_before + 2:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.02)
        proc.wait()
    assert kills >= 1
    assert not (out / "manifest.json").exists() or kills < 3
    resumed = extract(ds, TinyImageEncoder(), out, shard_size=4, batch_size=2, num_workers=0, show_progress=False)
    assert _arrays(out) == _arrays(tmp_path / "ref")
    assert resumed.manifest["shards"] == ref.manifest["shards"]


# -- text batching and backends -------------------------------------------------------------------------
class _RecordingText(TinyTextEncoder):
    """Records each batch it is given (the strings, in order)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def forward(self, batch, layers=("final",)):
        self.batches.append(list(batch))
        return super().forward(batch, layers)


def test_text_batched_longest_first_within_shards_rows_in_item_order(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=30)
    enc = _RecordingText()
    store = extract(ds, enc, tmp_path / "txt", shard_size=16, batch_size=5, dtype="float32", show_progress=False)
    items = ds.unique_items("text")
    shard_of = {t: i // 16 for i, t in enumerate(items)}
    for b in enc.batches:
        assert [len(t) for t in b] == sorted((len(t) for t in b), reverse=True)  # less padding per batch
        assert len({shard_of[t] for t in b}) == 1  # never across a shard: resume stays byte-identical
    assert max(len(t) for t in enc.batches[0]) == max(len(t) for t in items[:16])
    assert store.items() == items and store.index.tolist() == list(range(len(items)))
    # each row is its own text's features (TinyTextEncoder encodes each text on its own: same computation)
    assert np.array_equal(store.array().numpy(), TinyTextEncoder().encode(items, batch_size=1))


def test_store_records_its_backend_and_is_never_mixed_with_another(tmp_path, monkeypatch):
    """One spec, two machines' defaults: the backend separates the stores, names itself in the
    manifest, and a folder begun by one backend is neither reused nor resumed by the other."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from graph_encoders import TinyConvEncoder
    from unialign_train.features import default_store_path
    from unialign_train.features.cache import ExtractConfig, cache_features

    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    ds = make_image_dataset(tmp_path / "imgs", n=12)
    monkeypatch.setenv("UNIALIGN_BACKEND", "torch")
    eager = TinyConvEncoder()
    monkeypatch.setenv("UNIALIGN_BACKEND", "onnx")
    onnx = TinyConvEncoder()
    assert eager.spec == onnx.spec == "tiny-conv" and (eager.backend, onnx.backend) == ("torch", "onnx")
    assert default_store_path(ds, eager) != default_store_path(ds, onnx)

    kw = dict(layers=["conv"], shard_size=5, batch_size=4, dtype="float32", num_workers=0, show_progress=False)
    t = extract(ds, eager, tmp_path / "st", **kw)
    assert t.backend == "torch" and t.manifest["backend"] == "torch" and t.encoder["backend"] == "torch"
    with pytest.raises(StoreError, match="written by the torch backend, this encoder runs on onnx"):
        extract(ds, onnx, tmp_path / "st", **kw)
    (tmp_path / "st/manifest.json").unlink()  # an unfinished torch store: not resumed by onnx either
    (tmp_path / "st/shards/shard_00002.json").unlink()
    with pytest.raises(StoreError, match="backend"):
        extract(ds, onnx, tmp_path / "st", **kw)
    o = extract(ds, onnx, tmp_path / "onnx", **kw)
    assert o.backend == "onnx"
    for layer in ("final", "conv"):  # the same features to float32 rounding
        np.testing.assert_allclose(o.array(layer).numpy(), t.array(layer).numpy(), rtol=0, atol=1e-5)

    lines: list[str] = []
    cache_features(ds, {"image": onnx}, {"image": ["final"]}, ExtractConfig(batch_size=4, dtype="float16",
                   num_workers=0, strict=False), log=lines.append, show_progress=False)
    assert lines[0] == "image encoder tiny-conv runs on onnx: " + onnx.runtime.describe()


def test_stores_from_before_backends_read_as_torch(tmp_path):
    ds = make_image_dataset(tmp_path / "imgs", n=6)
    store = extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=6, num_workers=0, show_progress=False)
    manifest = store.manifest
    del manifest["backend"], manifest["encoder"]["backend"]
    (tmp_path / "st/manifest.json").write_text(json.dumps(manifest))
    assert FeatureStore.open(tmp_path / "st").backend == "torch"
