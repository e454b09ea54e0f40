"""Offline tests of unialign_train.data: every builder runs on tiny inputs written here, never the network."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unialign import paths
from unialign.media import load_image
from unialign_train.data import (DataConfig, Dataset, build_emoji, build_fashion_mnist, from_image_folder, from_table,
                                 load_dataset, make_splits, split_concepts)
from unialign_train.data import emoji as emoji_mod
from unialign_train.data.fashion_mnist import CLASSES, read_idx
from unialign.errors import ConfigError, DataError, ImageLoadError

REAL_EMOJI = paths.datasets_dir() / "emoji"  # evaluated before any test changes UNIALIGN_HOME


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own cache, so the user's ~/.cache/unialign is never touched."""
    h = tmp_path / "home"
    monkeypatch.setenv("UNIALIGN_HOME", str(h))
    return h


def png_bytes(color=(255, 0, 0, 255), size=(64, 64), mode="RGBA") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


# -- emoji -----------------------------------------------------------------------------------------
SVG = b'<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><circle cx="36" cy="36" r="20" fill="#FCEA2B"/></svg>'

EMOJI_JSON = [
    {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion",
     "subcategory": "face-smiling", "sort_order": 1,
     "skin_variations": {"1F3FB": {"unified": "1F600-1F3FB", "image": "1f600-1f3fb.png"}}},
    {"name": "WHITE SMILING FACE", "unified": "263A-FE0F", "image": "263a-fe0f.png",
     "category": "Smileys & Emotion", "subcategory": "face-affection", "sort_order": 2},
    {"name": "GRINNING FACE WITH SMILING EYES", "unified": "1F601", "image": "1f601.png",
     "category": "Smileys & Emotion", "subcategory": "face-smiling", "sort_order": 3},  # no apple image
    {"name": "FACE WITH TEARS OF JOY", "unified": "1F602", "image": "1f602.png",
     "category": "Smileys & Emotion", "subcategory": "face-smiling", "sort_order": 4},  # not in OpenMoji
]
OPENMOJI_JSON = [
    {"hexcode": "1F600", "annotation": "grinning face", "tags": "cheerful, face"},
    {"hexcode": "263A", "annotation": "smiling face", "tags": "happy"},  # FE0F stripped, as in OpenMoji
    {"hexcode": "1F601", "annotation": "beaming face with smiling eyes", "tags": ""},
]


def _tgz(path: Path, files: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_npm(home, monkeypatch) -> Path:
    """Tiny stand-ins for the npm tarballs, already 'downloaded'; any npm call fails the test."""
    dl = paths.downloads_dir()
    ej = json.dumps(EMOJI_JSON).encode()
    for vendor in ("google", "twitter", "apple"):
        files = {"package/emoji.json": ej}
        for e in EMOJI_JSON:
            if not (vendor == "apple" and e["unified"] == "1F601"):
                files[f"package/img/{vendor}/64/{e['image']}"] = png_bytes()
        files[f"package/img/{vendor}/64/1f600-1f3fb.png"] = png_bytes()  # skin tone: must be ignored
        _tgz(dl / f"emoji-datasource-{vendor}-16.0.0.tgz", files)
    om = {"package/data/openmoji.json": json.dumps(OPENMOJI_JSON).encode()}
    om.update({f"package/color/svg/{r['hexcode']}.svg": SVG for r in OPENMOJI_JSON})
    _tgz(dl / "openmoji-17.0.0.tgz", om)

    def no_npm(*a, **k):
        raise AssertionError("npm must not be called when the tarball is present")

    monkeypatch.setattr(emoji_mod.subprocess, "run", no_npm)
    return dl


def test_emoji_intersection_and_captions(fake_npm):
    ds = build_emoji()
    # 1F601 lacks an apple image, 1F602 lacks an OpenMoji drawing: only two concepts have all four.
    assert ds.concepts() == ["1f600", "263a-fe0f"]
    assert len(ds) == 8
    assert {r["style"] for r in ds.records} == {"google", "twitter", "apple", "openmoji"}
    r = ds.records[ds.column("id").index("1f600/openmoji")]
    assert r["label"] == "grinning face"
    assert r["text"] == ["grinning face", "grinning face: cheerful, face", "face smiling"]
    assert (r["category"], r["subcategory"]) == ("Smileys & Emotion", "face-smiling")
    r2 = ds.records[ds.column("id").index("263a-fe0f/google")]
    assert r2["label"] == "smiling face"
    assert r2["text"] == ["white smiling face", "smiling face", "smiling face: happy", "face affection"]
    assert not any("1f3fb" in i for i in ds.column("id"))
    # OpenMoji is rasterised at the requested size with alpha kept; load_image puts it on white.
    i = ds.column("id").index("1f600/openmoji")
    with Image.open(ds.path(i)) as raw:
        assert raw.size == (64, 64) and raw.mode == "RGBA"
    im = _load(ds, i)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)
    assert im.getpixel((32, 32))[2] < 100  # the yellow disc


def test_emoji_idempotent_and_resumable(fake_npm):
    ds = build_emoji()
    for t in fake_npm.glob("*.tgz"):
        t.rename(t.with_suffix(".bak"))  # a built dataset needs no tarball
    t0 = time.perf_counter()
    again = build_emoji()
    assert time.perf_counter() - t0 < 1.0
    assert again.records == ds.records
    for t in fake_npm.glob("*.bak"):
        t.rename(t.with_suffix(".tgz"))
    # Simulate an interrupted build: no dataset.json, no completion marker, one image missing.
    out = paths.datasets_dir() / "emoji"
    (out / "dataset.json").unlink()
    (out / "img" / "google-64" / ".complete").unlink()
    (out / "img" / "google-64" / "1f600.png").unlink()
    rebuilt = build_emoji()
    assert rebuilt.records == ds.records and (out / "img" / "google-64" / "1f600.png").is_file()


def test_emoji_other_styles_and_size(fake_npm):
    ds = build_emoji(styles=("google", "twitter"), size=32)
    assert ds.concepts() == ["1f600", "263a-fe0f", "1f601", "1f602"]
    assert ds.records[-1]["label"] == "face with tears of joy"  # no OpenMoji annotation: Unicode name
    assert _load(ds, 0).size == (32, 32)
    with pytest.raises(ConfigError, match="styles"):
        build_emoji(styles=("google", "microsoft"))


def test_emoji_npm_missing(home, monkeypatch):
    monkeypatch.setattr(emoji_mod.shutil, "which", lambda _: None)
    with pytest.raises(DataError, match="npm"):
        build_emoji()


def test_strip_fe0f():
    assert emoji_mod.strip_fe0f("263a-fe0f") == "263A"
    assert emoji_mod.strip_fe0f("1F3F3-FE0F-200D-1F308") == "1F3F3-200D-1F308"


@pytest.mark.skipif(not (REAL_EMOJI / "dataset.json").exists(), reason="real emoji set not built (build_emoji())")
def test_real_emoji_dataset():
    t0 = time.perf_counter()
    ds = Dataset.load(REAL_EMOJI)
    assert time.perf_counter() - t0 < 5
    styles = ds.meta["styles"]
    assert {"google", "twitter", "apple", "openmoji"} <= set(styles)
    assert len(ds.concepts()) >= 1800
    assert len(ds) == len(ds.concepts()) * len(styles)
    r = ds.records[ds.column("id").index("1f600/google")]
    assert r["label"] == "grinning face" and ds.path(0).is_file()


# -- fashion-mnist ---------------------------------------------------------------------------------
def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_fashion_mnist_from_idx(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 1], dtype=np.uint8)
    write_idx(src / "t10k-images-idx3-ubyte.gz", images)
    write_idx(src / "t10k-labels-idx1-ubyte.gz", labels)
    write_idx(src / "train-images-idx3-ubyte", images[:2], gz=False)  # uncompressed copies work too
    write_idx(src / "train-labels-idx1-ubyte", labels[:2], gz=False)
    assert np.array_equal(read_idx(src / "t10k-images-idx3-ubyte.gz"), images)

    ds = build_fashion_mnist("test", source=src)
    assert len(ds) == 5 and ds.classes == CLASSES and len(CLASSES) == 10
    r = ds.records[0]
    assert (r["concept"], r["label"], r["style"], r["target"]) == ("ankle boot", "ankle boot", "photo", 9)
    assert r["text"] == ["a photo of a ankle boot"]
    with Image.open(ds.path(2)) as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), images[2])
    assert build_fashion_mnist("test", source=src).records == ds.records  # loads the saved one
    assert len(build_fashion_mnist("train", source=src)) == 2


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        build_fashion_mnist("test", source=tmp_path)
    with pytest.raises(ConfigError, match="split"):
        build_fashion_mnist("validation", source=tmp_path)
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x08\x03\x00\x00garbage"))
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)


# -- user tables and folders ---------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "data" / "imgs"
    d.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (d / name).write_bytes(png_bytes())
    return d


def test_csv_relative_paths_empty_captions_and_bad_bytes(images):
    table = images.parent / "pairs.csv"
    table.write_bytes(
        b"image,caption,concept\n"
        b"imgs/a.png,a red square,square\n"
        b"imgs/b.png,   ,square\n"
        b"imgs/c.png,caf\xe9 au lait,coffee\n"  # Latin-1 byte: must not crash
    )
    ds = from_table(table)
    assert len(ds) == 3 and ds.path(0).is_file()
    assert ds.records[1]["text"] == [] and ds.meta["dropped_captions"] == 1
    assert ds.meta["replaced_bytes"] == 1 and ds.records[2]["text"] == ["caf\ufffd au lait"]
    assert ds.concepts() == ["square", "coffee"] and ds.records[0]["label"] == "square"
    assert _load(ds, 2).mode == "RGB"


def test_csv_missing_column_and_missing_image(images):
    table = images.parent / "bad.csv"
    table.write_text("foo,bar\nx,y\n")
    with pytest.raises(DataError) as e:
        from_table(table)
    msg = str(e.value)
    assert "bad.csv" in msg and "image" in msg and "foo" in msg and "bar" in msg
    with pytest.raises(DataError, match="'photo' not found"):
        from_table(table, image_col="photo")
    table.write_text("image,caption\nimgs/a.png,ok\n,no image here\n")
    with pytest.raises(DataError, match="row 2"):
        from_table(table)
    table.write_text("image,caption\nimgs/nope.png,x\n")
    with pytest.raises(DataError, match="not found"):
        from_table(table)


def test_jsonl_list_captions_and_root(images, tmp_path):
    table = tmp_path / "elsewhere" / "pairs.jsonl"
    table.parent.mkdir()
    rows = [{"path": "a.png", "text": ["a red square", "", "red"], "label": "red square", "style": "flat"},
            {"path": "b.png", "text": ["another"], "label": "red square", "score": 0.5}]
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = from_table(table, root=images)
    assert ds.records[0]["text"] == ["a red square", "red"] and ds.meta["dropped_captions"] == 1
    assert ds.records[0]["concept"] == "red square" and ds.records[0]["style"] == "flat"
    assert ds.records[1]["score"] == "0.5"  # extra columns kept (as text)
    assert _load(ds, 1).size == (64, 64)
    ds.save(tmp_path / "saved")
    assert load_dataset(str(tmp_path / "saved")).records == ds.records


def test_parquet_and_caption_columns(images):
    table = images.parent / "pairs.parquet"
    pq.write_table(pa.table({"filepath": [str(images / "a.png"), "imgs/b.png"],
                             "title": ["a title", "t2"], "alt": ["alt text", " "],
                             "raw": pa.array([b"ok", b"bad \xff"], pa.binary())}), table)
    ds = from_table(table, caption_cols=["title", "alt"])
    assert ds.records[0]["text"] == ["a title", "alt text"] and ds.records[1]["text"] == ["t2"]
    assert ds.records[0]["concept"] == "a title" and ds.meta["dropped_captions"] == 1
    assert ds.meta["replaced_bytes"] == 1
    assert load_dataset(str(table)).records[0]["text"] == ["a title"]  # auto: the "title" column


def test_image_folder(tmp_path):
    root = tmp_path / "photos"
    for rel in ("cats/1.png", "cats/sub/2.JPG", "hot_dog/3.webp", "empty/.keep", "dogs/notes.txt"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png_bytes(mode="RGB", color=(0, 0, 255)) if rel.lower().endswith((".png", ".jpg", ".webp")) else b"x")
    ds = from_image_folder(root)
    assert ds.classes == ["cats", "hot_dog"] and len(ds) == 3
    r = ds.records[-1]
    assert (r["concept"], r["label"], r["target"]) == ("hot_dog", "hot dog", 1)
    assert r["text"] == ["a photo of a hot dog"]
    assert load_dataset(str(root)).records == ds.records
    (tmp_path / "nothing" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no class subfolders"):
        from_image_folder(tmp_path / "nothing")


def test_load_dataset_unknown(tmp_path):
    with pytest.raises(DataError, match="emoji"):
        load_dataset(str(tmp_path / "missing.csv"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="accepted"):
        load_dataset(str(tmp_path / "x.txt"))


# -- splits ------------------------------------------------------------------------------------------
def test_split_concepts():
    concepts = [f"c{i}" for i in range(100)] * 3  # duplicates are collapsed
    a = split_concepts(concepts, seed=1)
    assert a == split_concepts(reversed(concepts), seed=1)  # order of input does not matter
    assert [len(a[k]) for k in ("train", "val", "test")] == [70, 10, 20]
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(concepts)
    assert not (set(a["train"]) & set(a["test"]) or set(a["train"]) & set(a["val"]) or set(a["val"]) & set(a["test"]))
    assert split_concepts(concepts, seed=2) != a
    small = split_concepts(["x", "y", "z", "w"], (0.8, 0.1, 0.1))
    assert all(len(v) >= 1 for v in small.values())
    for bad in [(0.5, 0.5), (0.7, 0.0, 0.3), (0.7, 0.2, 0.2), (-0.1, 0.6, 0.5), "abc"]:
        with pytest.raises(ConfigError):
            split_concepts(concepts, bad)
    with pytest.raises(DataError):
        split_concepts(["x", "y"])


def _protocol(**kw) -> DataConfig:
    base = dict(dataset="emoji", train_styles=None, test_styles=None, split=(0.7, 0.1, 0.2), split_seed=0,
                max_train_concepts=None, subset=None)
    return DataConfig(**{**base, **kw})


def test_splits_follow_the_datasets_own_protocol(fake_npm):
    """The held-out style comes from the dataset's metadata (emoji: apple), not from its name; the
    configuration overrides it; concepts never cross parts."""
    ds = build_emoji(styles=("google", "twitter", "apple"))  # three concepts have all three
    assert ds.meta["protocol"] == {"train_styles": ["google", "twitter"], "test_styles": ["apple"]}
    sp = make_splits(ds, _protocol())
    assert {ds.records[i]["style"] for i in sp.test} == {"apple"}
    assert {ds.records[i]["style"] for i in sp.train} == {"google", "twitter"}
    concepts = {part: {ds.records[i]["concept"] for i in getattr(sp, part)} for part in ("train", "val", "test")}
    assert not (concepts["train"] & concepts["test"] or concepts["train"] & concepts["val"])
    renamed = ds.subset(range(len(ds)), name="my-emoji")  # another name, the same protocol
    assert np.array_equal(make_splits(renamed, _protocol()).test, sp.test)
    other = make_splits(ds, _protocol(test_styles=["google"], train_styles=["twitter"]))
    assert {ds.records[i]["style"] for i in other.test} == {"google"}
    with pytest.raises(ConfigError, match="data.test_styles.*facebook"):
        make_splits(ds, _protocol(test_styles=["facebook"]))
    no_protocol = Dataset("plain", [dict(r) for r in ds.records], ds.root)
    assert len(make_splits(no_protocol, _protocol()).test) == 3 * len(make_splits(ds, _protocol()).concepts["test"])


# -- load_image on bad and odd files --------------------------------------------------------------------
def _load(ds: Dataset, i: int) -> Image.Image:
    return load_image(ds.path(i))


def test_load_image_bad_files(tmp_path):
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(png_bytes(color=(1, 2, 3, 255), size=(256, 256))[:120])
    text = tmp_path / "text.png"
    text.write_text("this is not an image")
    folder = tmp_path / "dir.jpg"
    folder.mkdir()
    for p in (zero, trunc, text, folder, tmp_path / "missing.png"):
        with pytest.raises(ImageLoadError) as e:
            load_image(p)
        assert str(p) in str(e.value) and e.value.path == str(p)


def test_load_image_odd_modes(tmp_path):
    def save(name: str, im: Image.Image, **kw) -> Path:
        p = tmp_path / name
        im.save(p, **kw)
        return p

    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    cases = {
        "rgba.png": (save("rgba.png", Image.new("RGBA", (4, 4), (255, 0, 0, 0))), (255, 255, 255)),
        "la.png": (save("la.png", Image.new("LA", (4, 4), (0, 0))), (255, 255, 255)),
        "pal.png": (save("pal.png", pal, transparency=1), (255, 255, 255)),
        "cmyk.jpg": (save("cmyk.jpg", Image.new("CMYK", (4, 4), (0, 0, 0, 0))), (255, 255, 255)),
        "gray16.png": (save("gray16.png", Image.fromarray(np.full((4, 4), 65535, np.uint16))), (255, 255, 255)),
        "bw.png": (save("bw.png", Image.new("1", (4, 4), 0)), (0, 0, 0)),
    }
    for name, (p, want) in cases.items():
        im = load_image(p)
        assert im.mode == "RGB", name
        assert all(abs(a - b) <= 2 for a, b in zip(im.getpixel((1, 1)), want)), (name, im.getpixel((1, 1)))
    dark16 = load_image(save("dark16.png", Image.fromarray(np.full((4, 4), 1000, np.uint16))))
    assert dark16.getpixel((0, 0))[0] < 10  # scaled by the 16-bit range, not stretched to white


def test_load_image_exif_rotation(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes())
    assert load_image(p).size == (20, 40)
