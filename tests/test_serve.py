"""The index builder and the HTTP app, on tiny registered encoders (offline, seconds)."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from unialign.encoders import register_encoder  # noqa: E402
from unialign.errors import UnialignError  # noqa: E402
from unialign.model import AlignedModel  # noqa: E402
from unialign_serve.app import Limits, create_app  # noqa: E402
from unialign.search import build_index as make_faiss_index  # noqa: E402
from unialign_serve.index import ImageIndex, build_index  # noqa: E402

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset, tiny_model  # noqa: E402

register_encoder("tiny-image", lambda name, device, **kw: TinyImageEncoder(), "tiny-image")
register_encoder("tiny-text", lambda name, device, **kw: TinyTextEncoder(), "tiny-text")

LIMITS = Limits(max_upload_bytes=200_000, max_image_pixels=300 * 300, max_batch=4, max_k=10, max_labels=5,
                max_text_chars=100)


def png_bytes(size: tuple[int, int] = (20, 20), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_model(root / "model")
    images = root / "images"
    make_image_dataset(images, n=30)
    index_dir = build_index(model_dir, str(images), root / "index", store=root / "store", num_workers=0,
                            show_progress=False).root
    return {"root": root, "model": model_dir, "images": images, "index": index_dir}


@pytest.fixture(scope="module")
def client(built: dict):
    with TestClient(create_app(built["model"], built["index"], LIMITS)) as c:
        yield c


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    return body["error"]


# -- index ------------------------------------------------------------------------------------------
def test_index_folder_explains_itself(built: dict) -> None:
    folder = built["index"]
    assert {p.name for p in folder.iterdir()} >= {"index.faiss", "metadata.parquet", "index.json", "README.md"}
    info = json.loads((folder / "index.json").read_text())
    assert info["counts"] == {"items": 30, "indexed": 30, "skipped": 0}
    assert info["model"]["dir"] == str(built["model"].resolve())
    assert info["index"]["kind"] == "flat" and info["dim"] == 8
    idx = ImageIndex.load(folder)
    assert len(idx) == 30 and idx.meta["path"][3].endswith("img_003.png")


def test_index_search_finds_an_indexed_image_first(built: dict) -> None:
    model, idx = AlignedModel.from_pretrained(built["model"]), ImageIndex.load(built["index"])
    q = model.encode_image([built["images"] / "img_007.png"])
    hits = idx.search(q, k=3)[0]
    assert hits[0].id == "img_007.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_index_rebuild_reuses_the_feature_store(built: dict, tmp_path) -> None:
    store = built["root"] / "store"
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*.npy")}
    build_index(built["model"], str(built["images"]), tmp_path / "again", store=store, num_workers=0, show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.npy")} == before


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_faiss_kinds_return_exact_self_match(kind: str) -> None:
    x = np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, info = make_faiss_index(x, kind)
    assert info["kind"] == kind and index.ntotal == 400
    _, rows = index.search(x[:20], 1)
    assert (rows[:, 0] == np.arange(20)).mean() >= 0.9


def test_auto_kind_switches_above_threshold() -> None:
    x = np.eye(8, dtype=np.float32)
    assert make_faiss_index(x, "auto", threshold=100)[1]["kind"] == "flat"
    assert make_faiss_index(x, "auto", threshold=4)[1]["kind"] == "hnsw"
    with pytest.raises(UnialignError, match="unknown index kind"):
        make_faiss_index(x, "lsh")


def test_index_command(built: dict, tmp_path) -> None:
    from typer.testing import CliRunner

    from unialign_cli.main import app

    r = CliRunner().invoke(app, ["index", "--model", str(built["model"]), "--images", str(built["images"]),
                                 "--out", str(tmp_path / "ix"), "--store", str(built["root"] / "store"), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "30 images" in r.output and (tmp_path / "ix" / "index.faiss").exists()


# -- startup errors ------------------------------------------------------------------------------
def test_unknown_model_dir_is_a_clear_startup_error(tmp_path) -> None:
    with pytest.raises(UnialignError, match="does not exist"):
        create_app(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnialignError, match="not a saved unialign model"):
        create_app(tmp_path / "empty")


def test_unknown_index_dir_is_a_clear_startup_error(built: dict, tmp_path) -> None:
    with pytest.raises(UnialignError, match="index folder .* does not exist"):
        create_app(built["model"], tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(UnialignError, match="not a unialign index"):
        create_app(built["model"], tmp_path / "x")


def test_serve_command_reports_unknown_model_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    from unialign_cli.main import main

    monkeypatch.setattr(sys, "argv", ["unialign", "serve", "--model", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 1
    assert "does not exist" in capsys.readouterr().err


# -- endpoints --------------------------------------------------------------------------------------
def test_health_and_page(client: TestClient) -> None:
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["index"]["size"] == 30 and h["model"]["dim"] == 8
    assert h["limits"]["max_k"] == 10
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_openapi_has_descriptions(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in [("/embed/text", "post"), ("/embed/image", "post"), ("/classify", "post"),
                         ("/search", "get"), ("/search/image", "post"), ("/health", "get")]:
        op = spec["paths"][path][method]
        assert op["summary"] and op["description"], path
    params = {p["name"]: p for p in spec["paths"]["/search"]["get"]["parameters"]}
    assert params["k"]["description"] and params["k"]["schema"]["maximum"] == 10


def test_embed_text(client: TestClient) -> None:
    r = client.post("/embed/text", json=["a red square", "a blue circle"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dim"] == 8 and body["count"] == 2
    assert np.allclose(np.linalg.norm(body["embeddings"], axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("payload,needle", [
    ([], "empty"),
    (["a"] * 5, "batch limit is 4"),
    (["ok", "  "], "text 1 is empty"),
    (["x" * 101], "limit is 100"),
    ({"texts": ["a"]}, "invalid request"),
    ([1, 2], "invalid request"),
])
def test_embed_text_bad_input(client: TestClient, payload, needle: str) -> None:
    assert needle in error_of(client.post("/embed/text", json=payload), 422)


def test_embed_text_malformed_json(client: TestClient) -> None:
    r = client.post("/embed/text", content=b"[not json", headers={"content-type": "application/json"})
    assert "invalid request" in error_of(r, 422)


def test_embed_image(client: TestClient) -> None:
    files = [("file", ("a.png", png_bytes(), "image/png")), ("file", ("b.png", png_bytes(color=(0, 0, 255)), "image/png"))]
    body = client.post("/embed/image", files=files).json()
    assert body["count"] == 2 and body["dim"] == 8
    assert np.allclose(np.linalg.norm(body["embeddings"], axis=1), 1.0, atol=1e-4)


def test_embed_image_bad_input(client: TestClient) -> None:
    msg = error_of(client.post("/embed/image", files={"file": ("notes.txt", b"hello, not an image", "text/plain")}), 415)
    assert "notes.txt" in msg and "not a readable image" in msg
    msg = error_of(client.post("/embed/image", files={"file": ("big.png", png_bytes((400, 400)), "image/png")}), 413)
    assert "400x400" in msg and "limit" in msg
    error_of(client.post("/embed/image", files={"file": ("empty.png", b"", "image/png")}), 422)
    trunc = png_bytes((50, 50))[:60]
    assert "truncated" in error_of(client.post("/embed/image", files={"file": ("t.png", trunc, "image/png")}), 415)
    many = [("file", (f"{i}.png", png_bytes(), "image/png")) for i in range(5)]
    assert "batch limit" in error_of(client.post("/embed/image", files=many), 422)
    assert "file" in error_of(client.post("/embed/image", data={"x": "1"}), 422)


def test_oversize_upload_is_413(client: TestClient) -> None:
    blob = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blob).save(buf, "BMP")  # 270 kB > 200 kB limit, pixels within limit
    msg = error_of(client.post("/embed/image", files={"file": ("big.bmp", buf.getvalue(), "image/bmp")}), 413)
    assert "upload limit" in msg


def test_oversize_streamed_body_is_413(client: TestClient) -> None:
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/embed/text", content=chunks(), headers={"content-type": "application/json"})
    assert "upload limit" in error_of(r, 413)


def test_classify(client: TestClient, built: dict) -> None:
    data = {"labels": "thing 1, thing 2 ,thing 3,, thing 1"}
    files = {"file": ("img.png", (built["images"] / "img_001.png").read_bytes(), "image/png")}
    body = client.post("/classify", data=data, files=files).json()
    assert [l["label"] for l in body["labels"]].count("thing 1") == 1 and len(body["labels"]) == 3
    assert sum(l["score"] for l in body["labels"]) == pytest.approx(1.0, abs=1e-4)
    scores = [l["score"] for l in body["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert body["templates"] and all("{}" in t for t in body["templates"])
    custom = client.post("/classify", data={**data, "templates": "a picture of {}|{}"}, files=files).json()
    assert custom["templates"] == ["a picture of {}", "{}"]


def test_classify_bad_input(client: TestClient) -> None:
    img = {"file": ("a.png", png_bytes(), "image/png")}
    assert "no labels" in error_of(client.post("/classify", data={"labels": " , ,"}, files=img), 422)
    assert "limit is 5" in error_of(client.post("/classify", data={"labels": "a,b,c,d,e,f"}, files=img), 422)
    assert "templates" in error_of(client.post("/classify", data={"labels": "a", "templates": "nonsense"}, files=img), 422)
    assert "labels" in error_of(client.post("/classify", files=img), 422)
    bad = {"file": ("x.pdf", b"%PDF-1.4 nope", "application/pdf")}
    assert "not a readable image" in error_of(client.post("/classify", data={"labels": "a,b"}, files=bad), 415)


def test_search_text_and_image_urls(client: TestClient) -> None:
    body = client.get("/search", params={"q": "thing 3", "k": 5}).json()
    assert body["k"] == 5 and len(body["results"]) == 5 and body["results"][0]["rank"] == 1
    scores = [h["score"] for h in body["results"]]
    assert scores == sorted(scores, reverse=True)
    img = client.get(body["results"][0]["url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(img.content)).verify()


@pytest.mark.parametrize("params,needle", [
    ({"q": ""}, "empty"),
    ({"q": "   "}, "empty"),
    ({}, "q: is required"),
    ({"q": "x", "k": 11}, "less than or equal to 10"),
    ({"q": "x", "k": 0}, "greater than or equal to 1"),
    ({"q": "x", "k": "many"}, "k"),
    ({"q": "x" * 101}, "q"),
])
def test_search_bad_input(client: TestClient, params: dict, needle: str) -> None:
    assert needle in error_of(client.get("/search", params=params), 422)


def test_search_by_image(client: TestClient, built: dict) -> None:
    files = {"file": ("q.png", (built["images"] / "img_012.png").read_bytes(), "image/png")}
    body = client.post("/search/image", params={"k": 3}, files=files).json()
    assert body["results"][0]["id"] == "img_012.png" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert "less than or equal" in error_of(client.post("/search/image", params={"k": 50}, files=files), 422)
    assert "not a readable image" in error_of(
        client.post("/search/image", files={"file": ("q.png", b"GIF89a-broken", "image/gif")}), 415)


def test_unknown_image_row_and_endpoint(client: TestClient) -> None:
    assert "no image at row 999" in error_of(client.get("/images/999"), 404)
    assert "path parameter row" in error_of(client.get("/images/abc"), 422)
    assert "no such endpoint" in error_of(client.get("/nope"), 404)
    assert "not allowed" in error_of(client.get("/classify"), 405)


def test_without_index_search_says_so(built: dict) -> None:
    with TestClient(create_app(built["model"], None, LIMITS)) as c:
        assert c.get("/health").json()["index"] is None
        assert "without an image index" in error_of(c.get("/search", params={"q": "x"}), 404)
        assert c.post("/embed/text", json=["still works"]).status_code == 200


def test_lru_peek_counts_as_a_use():
    """A class row read through ``peek`` on every request must not be evicted as if unused."""
    from unialign_serve.app import _LRU

    cache = _LRU(2)
    cache.get("hot", lambda: 1)
    cache.get("a", lambda: 2)
    assert cache.peek("hot") == 1 and cache.peek("missing") is None
    cache.get("b", lambda: 3)  # evicts the least recently used: "a", not "hot"
    assert cache.peek("hot") == 1 and cache.peek("a") is None
