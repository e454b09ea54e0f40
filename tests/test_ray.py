"""Ray executor: the same store, byte for byte, as the local executor; resume skips complete shards."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset  # noqa: E402
import importlib  # noqa: E402

from unialign_train.features import extract, shards  # noqa: E402

ex = importlib.import_module("unialign_train.features.extract")  # the module (the package exports the function)

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_local():
    # workers must import tests/tiny.py to unpickle the tiny encoders
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # starts a local Ray cluster (10-30 s on 2 cores); .ci/run runs it
def test_ray_store_is_byte_identical(tmp_path, ray_local):
    ds = make_image_dataset(tmp_path / "imgs", n=30, bad={4: "empty"})
    kw = dict(layers=["hidden"], shard_size=8, batch_size=3, show_progress=False)
    local = extract(ds, TinyImageEncoder(), tmp_path / "local", num_workers=0, **kw)
    remote = extract(ds, TinyImageEncoder(), tmp_path / "ray", executor="ray", **kw)
    assert _files(tmp_path / "local") == _files(tmp_path / "ray")  # arrays, metadata, records, manifest
    assert remote.manifest == local.manifest and len(remote) == 29
    # text stores too
    t1 = extract(ds, TinyTextEncoder(), tmp_path / "t_local", shard_size=16, show_progress=False)
    t2 = extract(ds, TinyTextEncoder(), tmp_path / "t_ray", shard_size=16, executor="ray", concurrency=1, show_progress=False)
    assert _files(t1.root) == _files(t2.root)


@pytest.mark.slow  # a local Ray cluster, as above
def test_ray_resume_skips_complete_shards(tmp_path, ray_local):
    ds = make_image_dataset(tmp_path / "imgs", n=20)
    kw = dict(shard_size=4, batch_size=2, show_progress=False)
    ref = extract(ds, TinyImageEncoder(), tmp_path / "ref", num_workers=0, **kw)
    out = tmp_path / "part"
    # a run "killed" after shards 0 and 2: their files and records exist, no manifest
    enc = TinyImageEncoder()
    key = ex.store_key(ds, enc, ["final"], "float16", 4)
    ex._claim(out, key, overwrite=False)
    shards.encode_shards(out, key, ex._items(ds, "image"), enc, [0, 2], 2, 0, False)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "img_emb").glob("*.npy")}
    assert sorted(before) == ["img_emb_00000.npy", "img_emb_00002.npy"]
    seen = []
    orig = ex.shard_done

    def spy(root, shard):
        done = orig(root, shard)
        seen.append((shard, done))
        return done

    ex.shard_done = spy
    try:
        store = extract(ds, TinyImageEncoder(), out, executor="ray", **kw)
    finally:
        ex.shard_done = orig
    assert [s for s, done in seen if not done] == [1, 3, 4]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "img_emb").glob("*.npy")}
    assert all(after[k] == v for k, v in before.items())  # complete shards were not rewritten
    assert _files(out) == _files(ref.root) and store.manifest == ref.manifest
    # a complete store is returned at once, without Ray
    assert extract(ds, TinyImageEncoder(), out, executor="ray", **kw).manifest == ref.manifest


def test_bad_executor_is_refused(tmp_path):
    from unialign.errors import StoreError

    ds = make_image_dataset(tmp_path / "imgs", n=4)
    with pytest.raises(StoreError, match="executor"):
        extract(ds, TinyImageEncoder(), tmp_path / "x", executor="dask", show_progress=False)
