"""The fault suite (docs/reliability.md lists every fault and the test here that proves it):
kill-and-resume, a generated corpus of bad inputs, integrity of everything unialign writes and loads,
invalid options and exit codes, and a schema-driven fuzz of the HTTP API.

Everything runs on tiny deterministic encoders (tests/tiny.py); no real model is loaded.
"""
from __future__ import annotations

import ast
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import (SRC, assert_one_line_error, expected_rgb, image_corpus, run_child, run_cli, tree)
from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset, register_tiny, tiny_model
from unialign_train.align.pairs import Pairs
from unialign_train.features import Features
from unialign_train.align.loop import TrainConfig, train
from unialign_train.data import load_dataset
from unialign.media import load_image
from unialign_train.data.records import Dataset
from unialign.errors import DataError, StoreError, UnialignError
from unialign_train.features import extract
from unialign_train.features import FeatureStore, ModalityFeatures
from unialign.io import sha256_file
from unialign.model import AlignedModel

register_tiny()
KILLS = 10
QUIET = dict(num_workers=0, show_progress=False)



# == kill and resume ==================================================================================
EXTRACT_CHILD = """
from unialign_train.data.records import Dataset
from unialign_train.features import extract
from tiny import TinyImageEncoder
extract(Dataset.load({ds!r}), TinyImageEncoder(), {out!r}, layers=["hidden"], shard_size=2, batch_size=2,
        num_workers=0, show_progress=False)
"""


def test_extraction_killed_10_times_resumes_byte_identical(tmp_path, one_thread):
    ds = make_image_dataset(tmp_path / "imgs", n=24)
    ds.save(tmp_path / "ds")
    ref = extract(ds, TinyImageEncoder(), tmp_path / "ref", layers=["hidden"], shard_size=2, batch_size=2, **QUIET)
    out = tmp_path / "killed"
    rng = np.random.default_rng(9)
    codes = [run_child(EXTRACT_CHILD.format(ds=str(tmp_path / "ds"), out=str(out)), kill_at=int(rng.integers(1, 10)))
             for _ in range(KILLS)]
    assert codes == [-9] * KILLS  # every run was killed before it finished (12 shards x 9 ticks)
    assert not (out / "manifest.json").exists()
    resumed = extract(ds, TinyImageEncoder(), out, layers=["hidden"], shard_size=2, batch_size=2, **QUIET)
    assert tree(out) == tree(tmp_path / "ref")  # every file, byte for byte; no temporary file left behind
    assert resumed.manifest == ref.manifest


TRAIN_CHILD = """
import numpy as np
from unialign_train.align.pairs import Pairs
from unialign_train.features import Features
from unialign_train.align.loop import TrainConfig, train
tick_steps()
z = np.load({data!r})
img, txt = Features([z["img"]], ["final"]), Features([z["txt"]], ["final"])
pairs = Pairs.from_lists(list(range(len(z["img"]))), [[i, (i + 1) % len(z["txt"])] for i in range(len(z["img"]))],
                         z["groups"].tolist())
x = torch.from_numpy(z["img"][:16])
validate = lambda m: {{"score": float(m["image"](x).detach().float().std())}}
train(img, txt, pairs, TrainConfig(**{cfg!r}), validate, {ck!r}, log=None)
"""
TRAIN_CFG = dict(head="mlp", head_options={"all": {"hidden": 16, "dropout": 0.2}}, dim=8, batch_size=16, epochs=10,
                 eval_every=5, patience=3, checkpoint_every=3, warmup_steps=4, device="cpu")


def test_training_killed_10_times_resumes_to_identical_weights(tmp_path, one_thread):
    rng = np.random.default_rng(0)
    n = 64
    data = {"img": rng.standard_normal((n, 12)).astype(np.float32), "txt": rng.standard_normal((n, 16)).astype(np.float32),
            "groups": np.arange(n) % 10}
    np.savez(tmp_path / "data.npz", **data)
    img, txt = Features([data["img"]], ["final"]), Features([data["txt"]], ["final"])
    pairs = Pairs.from_lists(list(range(n)), [[i, (i + 1) % n] for i in range(n)], data["groups"].tolist())
    x = torch.from_numpy(data["img"][:16])
    validate = lambda m: {"score": float(m["image"](x).detach().float().std())}  # noqa: E731
    cfg = TrainConfig(**TRAIN_CFG)
    ref = train(img, txt, pairs, cfg, validate, tmp_path / "ref.pt", log=None)
    ck = tmp_path / "ck.pt"
    script = TRAIN_CHILD.format(data=str(tmp_path / "data.npz"), cfg=TRAIN_CFG, ck=str(ck))
    kill_rng = np.random.default_rng(1)
    codes = [run_child(script, kill_at=int(kill_rng.integers(1, 7))) for _ in range(KILLS)]
    assert codes == [-9] * KILLS  # ~40 steps + 3 ticks per checkpoint: never finished
    resumed = train(img, txt, pairs, cfg, validate, ck, log=None)
    assert resumed.steps == ref.steps and resumed.best_step == ref.best_step and resumed.history == ref.history
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a rerun after it finished (or stopped early) is a no-op with the same result, not more training
    again = train(img, txt, pairs, cfg, validate, ck, log=None)
    assert again.steps == ref.steps and all(torch.equal(a[k], again.model.state_dict()[k]) for k in a)


def test_early_stopped_training_does_not_resume_training(tmp_path):
    rng = np.random.default_rng(0)
    img = Features([rng.standard_normal((48, 12)).astype(np.float32)], ["final"])
    txt = Features([rng.standard_normal((48, 16)).astype(np.float32)], ["final"])
    pairs = Pairs.from_lists(list(range(48)), [[i] for i in range(48)], [i % 6 for i in range(48)])
    scores = iter([0.5, 0.4, 0.3] + [0.9] * 100)  # stops early at the third validation
    cfg = TrainConfig(dim=8, batch_size=16, epochs=30, eval_every=4, patience=2, checkpoint_every=4, warmup_steps=2)
    first = train(img, txt, pairs, cfg, lambda m: {"score": next(scores)}, tmp_path / "ck.pt", log=None)
    assert first.steps == 12
    rerun = train(img, txt, pairs, cfg, lambda m: {"score": next(scores)}, tmp_path / "ck.pt", log=None)
    assert rerun.steps == 12 and rerun.best_step == first.best_step


INDEX_CHILD = """
from unialign_serve.index import build_index
build_index({model!r}, {images!r}, {out!r}, store={store!r}, batch_size=2, num_workers=0, show_progress=False)
"""


def test_index_killed_resumes_through_the_store(tmp_path, one_thread):
    model_dir = tiny_model(tmp_path / "model")
    make_image_dataset(tmp_path / "images", n=20)
    from unialign_serve.index import build_index

    ref = build_index(model_dir, str(tmp_path / "images"), tmp_path / "ref", store=tmp_path / "ref_store",
                      batch_size=2, **QUIET)
    out, store = tmp_path / "idx", tmp_path / "store"
    script = INDEX_CHILD.format(model=str(model_dir), images=str(tmp_path / "images"), out=str(out), store=str(store))
    rng = np.random.default_rng(2)
    for _ in range(4):  # the store is one shard of 4096 items: kill before, mid- and after its files
        run_child(script, kill_at=int(rng.integers(1, 12)))
    idx = build_index(model_dir, str(tmp_path / "images"), out, store=store, batch_size=2, **QUIET)
    assert tree(store) == tree(tmp_path / "ref_store")
    for f in ("image.index", "metadata/metadata_0.parquet", "img_emb/img_emb_0.npy"):
        assert (out / f).read_bytes() == (ref.root / f).read_bytes()
    strip = lambda d: {k: v for k, v in d.items() if k not in ("created", "feature_store")}  # noqa: E731
    assert strip(idx.info) == strip(ref.info)


# == bad inputs =======================================================================================
def test_image_corpus_skipped_and_reported_or_decoded_right(tmp_path):
    corpus = image_corpus(tmp_path / "imgs")
    recs = [{"id": name, "image": rel, "text": [name], "concept": name, "label": name, "style": ""}
            for name, (rel, _) in corpus.items()]
    ds = Dataset("corpus", recs, tmp_path / "imgs")
    store = extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=5, batch_size=3, num_workers=1, show_progress=False)
    skipped = {s["id"]: s for s in store.skipped}
    for name, (rel, expect) in corpus.items():
        if expect == "ok":
            assert name not in skipped, skipped.get(name)
            got = np.asarray(load_image(tmp_path / "imgs" / rel), dtype=np.float32)
            want = np.asarray(expected_rgb(name), dtype=np.float32)
            assert got.shape == want.shape and np.abs(got - want).mean() < 8, name  # decoded as what it shows
        else:
            assert expect in skipped[name]["reason"], (name, skipped[name])
            assert skipped[name]["path"].endswith(rel)  # the report names the file
    assert len(store) + len(skipped) == len(corpus)
    assert sorted(store.metadata(["id"])["id"]) == sorted(n for n, (_, e) in corpus.items() if e == "ok")
    # a row's features are the image's, not a neighbour's: the unicode path row equals the plain one
    rows = dict(zip(store.metadata(["id"])["id"], store.array().numpy()))
    assert np.array_equal(rows["unicode-and-space-path"], rows["plain"])
    # strict: the first bad item stops the run, named
    with pytest.raises(DataError, match="zero.png: file is empty"):
        extract(ds, TinyImageEncoder(), tmp_path / "strict", strict=True, **QUIET)


def _write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_caption_corpus(tmp_path):
    image_corpus(tmp_path / "imgs")
    long = "word " * 2000  # 10k characters
    rows = [["plain.png", "a red square"], ["gray.png", ""], ["palette.png", "   \t "], ["cmyk.jpg", long],
            ["ünï cødé 日本/a b.png", "unicode path ✓"], ["plain.png", "a red square"]]  # last: a duplicate row
    path = _write_csv(tmp_path / "imgs" / "pairs.csv", ["image", "caption"], rows)
    raw = path.read_bytes().replace("unicode path ✓".encode(), b"caf\xe9 latin-1")  # one non-UTF-8 caption
    path.write_bytes(raw)
    ds = load_dataset(str(path))
    assert ds.meta["dropped_captions"] == 2 and ds.meta["replaced_bytes"] == 1  # counted, not silent
    assert ds.records[1]["text"] == [] and ds.records[3]["text"] == [long.strip()]
    assert ds.records[4]["text"] == ["caf\ufffd latin-1"]
    assert len(ds) == 6 and ds.records[0]["text"] == ds.records[5]["text"]  # duplicates kept as given
    assert ds.unique_items("text") == ["a red square", long.strip(), "caf\ufffd latin-1"]  # the store encodes each once
    tstore = extract(ds, TinyTextEncoder(), tmp_path / "txt", **QUIET)
    assert tstore.items() == ds.unique_items("text") and np.isfinite(tstore.array().numpy().astype(np.float32)).all()
    istore = extract(ds, TinyImageEncoder(), tmp_path / "img", **QUIET)
    assert len(istore) == 5 and not istore.skipped  # the duplicated row's image is encoded once
    rows = ModalityFeatures.build(ds, "image", istore, ["final"])
    assert np.array_equal(rows.rows(0), rows.rows(5))  # ... and both records point at that one row


def test_table_errors_name_the_problem(tmp_path):
    image_corpus(tmp_path)
    cases = [
        (_write_csv(tmp_path / "nocol.csv", ["caption"], [["a"]]), "no media column"),
        (_write_csv(tmp_path / "nocap.csv", ["image"], [["plain.png"]]), "no caption column"),
        (_write_csv(tmp_path / "missing.csv", ["image", "caption"], [["plain.png", "a"], ["nope.png", "b"]]),
         "1 of 2 media file(s) not found"),
        (_write_csv(tmp_path / "dupid.csv", ["id", "image", "caption"], [["1", "plain.png", "a"], ["1", "gray.png", "b"]]),
         "id '1' appears more than once"),
        (_write_csv(tmp_path / "empty.csv", ["image", "caption"], []), "no rows"),
        (_write_csv(tmp_path / "noimg.csv", ["image", "caption"], [["", "a"]]), "row 1 has no image path"),
    ]
    for path, needle in cases:
        with pytest.raises(DataError) as e:
            load_dataset(str(path))
        assert needle in str(e.value) and path.name in str(e.value)
    with pytest.raises(DataError, match=r"media file\(s\) not found.*dir.jpg"):  # a folder is not an image file
        load_dataset(str(_write_csv(tmp_path / "dir.csv", ["image", "caption"], [["dir.jpg", "a"]])))
    proc = run_cli("data", str(tmp_path / "nocol.csv"))
    assert_one_line_error(proc, "nocol.csv", "no media column", "columns are ['caption']")


def test_cli_extract_skips_and_reports_or_stops_strictly(tmp_path):
    corpus = image_corpus(tmp_path / "imgs")
    rows = [[rel, name] for name, (rel, expect) in corpus.items() if name not in ("missing", "directory-as-jpg")]
    _write_csv(tmp_path / "imgs" / "pairs.csv", ["image", "caption"], rows)
    ok = run_cli("extract", "--encoder", "tiny-image", "--data", str(tmp_path / "imgs" / "pairs.csv"),
                 "--out", str(tmp_path / "st"), "--workers", "0", tiny=True)
    n_bad = sum(e != "ok" for n, (_, e) in corpus.items() if n not in ("missing", "directory-as-jpg"))
    assert ok.returncode == 0 and f"{n_bad} skipped" in ok.stdout, ok.stderr
    manifest = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert manifest["n_skipped"] == n_bad and all(s["reason"] for s in manifest["skipped"])
    strict = run_cli("extract", "--encoder", "tiny-image", "--data", str(tmp_path / "imgs" / "pairs.csv"),
                     "--out", str(tmp_path / "st2"), "--workers", "0", "--strict", tiny=True)
    assert_one_line_error(strict, "zero.png", "file is empty", "--strict")


# == integrity ========================================================================================
def _store(tmp_path: Path, **kw) -> FeatureStore:
    ds = make_image_dataset(tmp_path / "imgs", n=10)
    ds.save(tmp_path / "ds")  # the same files (re-creating them would change their mtimes: other inputs)
    return extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=4, **QUIET, **kw)


def _rewrite_shard(root: Path, rel: str, arr: np.ndarray) -> None:
    """Replace a shard file *and* its recorded checksum: what another tool could leave."""
    f = root / rel
    np.save(f, arr)
    m = json.loads((root / "manifest.json").read_text())
    for s in m["shards"]:
        if rel in s["files"]:
            s["files"][rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (root / "manifest.json").write_text(json.dumps(m))


def test_store_faults_are_named_on_load(tmp_path):
    store = _store(tmp_path, dtype="float32")
    root = store.root
    a = np.load(root / "img_emb/img_emb_00001.npy")
    bad = a.copy()
    bad[1, 3] = np.inf
    _rewrite_shard(root, "img_emb/img_emb_00001.npy", bad)
    with pytest.raises(StoreError, match=r"1 row\(s\) of layer 'final' hold NaN/Inf, first: \[5\]"):
        FeatureStore.open(root)
    _rewrite_shard(root, "img_emb/img_emb_00001.npy", np.zeros((4, 7), np.float32))  # another dim
    with pytest.raises(StoreError, match=r"shape \(4, 7\) does not match the manifest's dim 12"):
        FeatureStore.open(root).array()
    _rewrite_shard(root, "img_emb/img_emb_00001.npy", a)
    FeatureStore.open(root)
    f = root / "img_emb/img_emb_00001.npy"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))  # one bit flipped, same size
    with pytest.raises(StoreError, match="checksum mismatch in img_emb/img_emb_00001.npy"):
        FeatureStore.open(root)
    # through the CLI: a rerun of the same extraction opens the store and names the corrupt file
    proc = run_cli("extract", "--encoder", "tiny-image", "--data", str(tmp_path / "ds"), "--out", str(root),
                   "--shard-size", "4", "--dtype", "float32", "--workers", "0", tiny=True)
    assert_one_line_error(proc, "checksum mismatch in img_emb/img_emb_00001.npy")


def test_store_of_another_encoder_or_dtype_is_refused(tmp_path):
    _store(tmp_path)
    ds = Dataset.load(tmp_path / "ds")
    with pytest.raises(StoreError, match=r"other inputs \(differs in: encoder, layer_dims"):
        extract(ds, TinyImageEncoder(dim=16), tmp_path / "st", shard_size=4, **QUIET)
    with pytest.raises(StoreError, match="differs in: encoder, modality"):
        extract(ds, TinyTextEncoder(), tmp_path / "st", shard_size=4, **QUIET)
    with pytest.raises(StoreError, match="differs in: dtype"):
        extract(ds, TinyImageEncoder(), tmp_path / "st", shard_size=4, dtype="float32", **QUIET)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a unialign store"):
        extract(ds, TinyImageEncoder(), tmp_path / "other", **QUIET)


def test_fp16_overflow_is_skipped_not_stored_as_inf(tmp_path):
    class Loud(TinyImageEncoder):
        def forward(self, batch, layers=("final",)):
            out = super().forward(batch, layers)
            out["final"] = out["final"] * torch.where(torch.arange(len(batch)) % 2 == 0, 1.0, 1e6)[:, None]
            return out

    ds = make_image_dataset(tmp_path / "imgs", n=6)
    store = extract(ds, Loud(), tmp_path / "st", **QUIET)  # float16: 1e6 overflows to Inf
    assert store.index.tolist() == [0, 2, 4]
    assert {s["index"] for s in store.skipped} == {1, 3, 5} and "NaN/Inf (in float16)" in store.skipped[0]["reason"]


def _model(tmp_path: Path, name: str = "model", out_dim: int = 8) -> Path:
    return tiny_model(tmp_path / name, out_dim)


def test_model_faults_are_named_on_load(tmp_path):
    from unialign.encoders import register_encoder

    def wide(name, device=None, **o):
        enc = TinyImageEncoder(dim=16)
        enc.spec = "tiny-wide"
        return enc

    register_encoder("tiny-wide", wide, "tiny-wide")
    good = _model(tmp_path)
    AlignedModel.from_pretrained(good)

    def variant(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    p = variant("flipped") / "model.safetensors"
    b = bytearray(p.read_bytes())
    b[-2] ^= 0xFF
    p.write_bytes(bytes(b))
    with pytest.raises(UnialignError, match="checksum mismatch in model.safetensors"):
        AlignedModel.from_pretrained(p.parent)
    p.write_bytes(bytes(b[:20]))  # truncated, and no checksum to go by: still one clear error
    cfg = json.loads((p.parent / "config.json").read_text())
    del cfg["weights_sha256"]
    (p.parent / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnialignError, match="model.safetensors is not readable"):
        AlignedModel.from_pretrained(p.parent)
    other = _model(tmp_path, "other", out_dim=4)  # heads of another model, checksum updated
    swapped = variant("swapped")
    shutil.copy(other / "model.safetensors", swapped / "model.safetensors")
    cfg = json.loads((swapped / "config.json").read_text())
    cfg["weights_sha256"] = sha256_file(swapped / "model.safetensors")
    (swapped / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnialignError, match="does not match config.json.*size mismatch"):
        AlignedModel.from_pretrained(swapped)
    wide = variant("wide")  # an image encoder of another dimension under the model
    cfg = json.loads((wide / "config.json").read_text())
    cfg["modalities"]["image"]["encoder"]["spec"] = "tiny-wide"
    (wide / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnialignError, match="tiny-wide gives 16-d features, the model was trained on 12-d"):
        AlignedModel.from_pretrained(wide)
    cfg["modalities"]["image"]["encoder"].pop("dim")  # no recorded dim: the projection's input size still catches it
    (wide / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnialignError, match="image projection takes 12-d features; tiny-wide"):
        AlignedModel.from_pretrained(wide)
    version = variant("version")
    cfg = json.loads((version / "config.json").read_text())
    cfg["modalities"]["text"]["encoder"]["version"] = "0"
    (version / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="text encoder tiny-text has version 1, the model was trained on 0"):
        AlignedModel.from_pretrained(version)
    (variant("nojson") / "config.json").write_text("{oops")
    with pytest.raises(UnialignError, match="config.json: not valid JSON"):
        AlignedModel.from_pretrained(tmp_path / "nojson")
    (variant("noweights") / "model.safetensors").unlink()
    with pytest.raises(UnialignError, match="model.safetensors is missing"):
        AlignedModel.from_pretrained(tmp_path / "noweights")
    proc = run_cli("index", "--model", str(tmp_path / "flipped"), "--images", str(tmp_path), "--out",
                   str(tmp_path / "idx"), tiny=True)
    assert_one_line_error(proc, "model.safetensors")


# Writers that create or overwrite files. A call must sit inside ``with atomic_path(...)`` (it writes the
# temporary file that is renamed into place), or be listed here with the reason.
WRITERS = {"open", "write_text", "write_bytes", "save", "savez", "savefig", "write_table", "write_index",
           "save_file", "to_csv", "to_parquet", "dump", "copyfile", "copy", "copy2"}
ALLOWED = {
    ("unialign/io.py", "write_bytes"): "io.write_bytes writes atomic_path's temporary file",
    ("unialign_train/export.py", "save"): "sentence-transformers writes its own folder; unialign_export.json, "
                                         "written atomically after it, marks a finished export",
    ("unialign/standalone/st_modules.py", "open"): "runs inside sentence-transformers' own (non-atomic) folder save, "
                                                    "without unialign; the export's unialign_export.json marks it done",
    ("unialign/standalone/st_modules.py", "dump"): "the json.dump into the file opened just above (same reason)",
    ("unialign_train/data/emoji.py", "save"): "PIL image into an in-memory buffer",
    ("unialign_train/data/fashion_mnist.py", "save"): "PIL image into an in-memory buffer",
    ("unialign_train/data/gm_notes.py", "write_bytes"): "the MIDI file in a TemporaryDirectory that fluidsynth reads",
    ("unialign_train/data/gm_notes.py", "save"): "Dataset.save (atomic itself)",
    ("unialign_train/data/spoken.py", "save"): "Dataset.save (atomic itself)",
    ("unialign/encoders/wheels.py", "open"): "the joined archive in the install's own TemporaryDirectory; the model "
                                             "folder appears in one rename once complete",
}


def _writes_outside_atomic(path: Path) -> list[tuple[int, str]]:
    tree_ = ast.parse(path.read_text(encoding="utf-8"))
    bad: list[tuple[int, str]] = []

    def visit(node: ast.AST, atomic: bool) -> None:
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id",
                                                                  getattr(i.context_expr.func, "attr", "")) == "atomic_path"
                for i in node.items):
            atomic = True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            value = getattr(node.func, "value", None)
            receiver = getattr(value, "id", None) or getattr(value, "attr", "")
            is_write = name in WRITERS
            if isinstance(node.func, ast.Name) and name in ("write_text", "write_bytes"):
                is_write = False  # unialign.io.write_text / write_bytes: atomic themselves
            if name in ("copy", "copy2", "copyfile") and receiver != "shutil":
                is_write = False  # array.copy(), np.copy(...)
            if name == "open":  # only opening for writing counts
                modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)] + \
                        [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
                is_write = any(isinstance(m, str) and set(m) & set("wax+") for m in modes)
            if name == "save" and receiver in ("model", "dc", "self", "result") or name == "dump" and receiver != "json" \
                    or name == "save" and isinstance(value, ast.Call):  # Dataset(...).save(out)
                is_write = False  # unialign objects' own save methods (checked where they are defined)
            if name in ("save", "savez") and receiver in ("np", "torch"):
                is_write = True
            if is_write and not atomic:
                bad.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, atomic)

    visit(tree_, False)
    return bad


def test_every_file_is_written_through_atomic_path():
    found = []
    for path in sorted(p for pkg in ("unialign", "unialign_train", "unialign_serve", "unialign_cli")
                       for p in (SRC / pkg).rglob("*.py")):
        rel = str(path.relative_to(SRC))
        for line, name in _writes_outside_atomic(path):
            if (rel, name) not in ALLOWED:
                found.append(f"{rel}:{line}: {name}(...) outside `with atomic_path(...)`")
    assert not found, "\n".join(found)


# == options, commands and exit codes ================================================================
BAD_SETS = [  # (--set value, what the one line must name)
    ("train.lr=fast", "train.lr"), ("train.lr=0", "train.lr"), ("train.epochs=1.5", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"), ("train.nope=1", "train.nope"), ("train.head=nope", "train.head"),
    ("train.loss=nope", "train.loss"), ("train.sampling=random", "train.sampling"),
    ("train.distributed=maybe", "train.distributed"), ("train.betas=high", "train.betas"),
    ("data.split=[0.5,0.5]", "data.split"), ("data.split_seed=x", "data.split_seed"),
    ("data.train_styles=apple", "data.train_styles"), ("data.nope=1", "data.nope"),
    ("extract.dtype=float64", "extract.dtype"), ("extract.batch_size=0", "extract.batch_size"),
    ("extract.strict=maybe", "extract.strict"), ("layers.image=[auto,final]", "layers.image"), ("layers.image=[]", "layers.image"),
    ("encoders.image=3", "encoders.image"), ("align=[image,image]", "align"), ("align=[image,smell]", "align"),
    ("eval.templates=nope", "eval.templates"), ("eval.retrieval_ks=[0]", "eval.retrieval_ks"),
    ("eval.zero_shot_sets.fashion-mnist.limit=0", "eval.zero_shot_sets.fashion-mnist.limit"),
    ("eval.zero_shot_sets.fm={dataset: fashion-mnist}", "eval.zero_shot_sets.fm.templates"),
    ("device=tpu", "device"), ("recipe=nope", "recipe"), ("nope.x=1", "nope"), ("data=3", "data"),
]


def _main(args: list[str], capsys) -> tuple[int, str]:
    """``unialign_cli.main.main`` in this process (what ``python3 -m unialign`` runs); (exit code, stderr)."""
    import sys

    from unialign_cli.main import main

    old = sys.argv
    sys.argv = ["unialign", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "train"])
def test_every_bad_option_is_one_line_naming_it(command, capsys, tmp_path):
    closed_form = [("train.k=0", "train.k"), ("train.p=x", "train.p"), ("train.lr=0.1", "train.lr")]  # the default recipe
    cases = [("linear", v, n) for v, n in BAD_SETS] + [("unialign", v, n) for v, n in closed_form]
    for recipe, value, name in cases:
        code, err = _main([command, "--output", str(tmp_path), "--set", f"recipe={recipe}", "--set", value], capsys)
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 1 and len(lines) == 1 and "Traceback" not in err, (value, err)
        assert lines[0].startswith(f"error: {name}") or f" {name}" in lines[0], (value, lines[0])
        assert "got " in lines[0] or "accepted" in lines[0] or "required" in lines[0], (value, lines[0])


def test_bad_flags_and_exit_codes(tmp_path):
    usage = [["run", "--nope"], ["extract"], ["extract", "--encoder", "x", "--data", "y", "--batch-size", "0"],
             ["index", "--model", "m", "--images", "i", "--out", "o", "--kind", "nope"], ["nope"]]
    for args in usage:
        proc = run_cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "Usage" in proc.stderr or "Error" in proc.stderr
    assert_one_line_error(run_cli("train", "--recipe", "linear", "--set", "train.sampling=random"), "train.sampling",
                          "'global' or 'chunked'")
    make_image_dataset(tmp_path / "imgs", n=3).save(tmp_path / "ds")
    assert_one_line_error(run_cli("extract", "--encoder", "nope", "--data", str(tmp_path / "ds")),
                          "unknown encoder spec 'nope'", "accepted forms")
    assert_one_line_error(run_cli("eval", "--model", str(tmp_path / "none")), "no config.json")
    assert_one_line_error(run_cli("run", str(tmp_path / "missing.yaml")), "missing.yaml does not exist")
    ok = run_cli("recipes")
    assert ok.returncode == 0 and "unialign" in ok.stdout


def test_set_without_equals_and_bad_yaml_in_process(capsys, tmp_path):
    code, err = _main(["train", "--set", "train.lr"], capsys)
    assert code == 2 and "--set expects key=value" in err and "Traceback" not in err
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    code, err = _main(["train", str(bad_yaml)], capsys)
    assert code == 1 and "bad.yaml: not valid YAML" in err and len(err.strip().splitlines()) == 1


def test_help_works_for_every_registered_command(capsys):
    from typer.main import get_command

    from unialign_cli.main import app

    group = get_command(app)
    names = sorted(group.commands)
    assert {"run", "train", "eval", "extract", "data", "recipes", "index", "serve"} <= set(names)
    for name in names:
        code, _ = _main([name, "--help"], capsys)
        assert code == 0, name
    proc = run_cli("--help")
    assert proc.returncode == 0 and all(n in proc.stdout for n in names)


def test_train_divergence_is_one_line(tmp_path):
    """A training that blows up (non-finite loss) raises an ArithmeticError naming the cure; the command
    line reports it in one line with exit code 1, like every UnialignError, ValueError and OSError."""
    rng = np.random.default_rng(0)
    img = Features([rng.standard_normal((32, 12)).astype(np.float32) * 1e30], ["final"])
    txt = Features([rng.standard_normal((32, 16)).astype(np.float32)], ["final"])
    pairs = Pairs.from_lists(list(range(32)), [[i] for i in range(32)], list(range(32)))
    with pytest.raises(ArithmeticError, match="lower the learning rate"):
        train(img, txt, pairs, TrainConfig(dim=4, batch_size=8, epochs=2, lr=1e30, eval_every=0), log=None)
    make_image_dataset(tmp_path / "imgs", n=30).save(tmp_path / "ds")
    proc = run_cli("train", "--output", str(tmp_path / "run"), "--recipe", "linear",
                   *[a for kv in (f"data.dataset={tmp_path / 'ds'}", "data.split=[0.4,0.3,0.3]", "encoders.image=tiny-image",
                                  "encoders.text=tiny-text", "extract.num_workers=0", "train.lr=1e30", "train.eval_every=0",
                                  "train.batch_size=8") for a in ("--set", kv)], tiny=True)
    assert_one_line_error(proc, "training loss became", "lower the learning rate")


# == server ===========================================================================================
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    from unialign_serve.app import Limits, create_app
    from unialign_serve.index import build_index

    root = tmp_path_factory.mktemp("fault-serve")
    model_dir = _model(root)
    make_image_dataset(root / "images", n=12)
    index_dir = build_index(model_dir, str(root / "images"), root / "index", store=root / "store", **QUIET).root
    return create_app(model_dir, index_dir, Limits(max_upload_bytes=100_000, max_image_pixels=200 * 200, max_batch=4,
                                                    max_k=10, max_labels=5, max_text_chars=100))


def test_api_fuzz_never_answers_5xx(served):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_asgi("/openapi.json", served)
    checked = []

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        response = case.call()
        assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            body = response.json()
            assert body["status"] == response.status_code and body["error"]
        checked.append((case.method, case.path, response.status_code))

    operations = [op.ok() for op in schema.get_all_operations()]
    for op in operations:
        given(op.as_strategy())(fuzz)()
    assert {(m, p) for m, p, _ in checked} == {(op.method.upper(), op.path) for op in operations}
    assert any(c < 300 for *_, c in checked) and any(c >= 400 for *_, c in checked)  # both kinds were reached
