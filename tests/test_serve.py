"""The index builder and the HTTP app, on tiny registered encoders (offline, seconds)."""
from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from unialign.encoders import register_encoder  # noqa: E402
from unialign.errors import UnialignError  # noqa: E402
from unialign.zeroshot import TEMPLATES  # noqa: E402
from unialign.model import AlignedModel  # noqa: E402
from unialign_serve.app import (IMAGE_TYPES, NONBLANK, SPACE, Limits, create_app, labels_pattern,  # noqa: E402
                                 templates_pattern)
from unialign.search import build_index as make_faiss_index  # noqa: E402
from unialign_serve.index import EMBEDDINGS_FILE, INDEX_FILE, METADATA_FILE, ImageIndex, build_index  # noqa: E402

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
    calibrated = AlignedModel.from_pretrained(model_dir)  # so that /match answers (its own tests: test_consistency.py)
    calibrated.info["match"] = {"a": 8.0, "b": -2.0, "n_pairs": 0, "fitted_on": "set by hand for the server tests"}
    calibrated.save_pretrained(model_dir)
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
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {
        "image.index", "metadata/metadata_0.parquet", "img_emb/img_emb_0.npy", "index.json", "README.md"}
    info = json.loads((folder / "index.json").read_text())
    assert info["format"] == "unialign-index/2"
    assert info["counts"] == {"items": 30, "indexed": 30, "skipped": 0}
    assert info["model"]["dir"] == str(built["model"].resolve())
    assert info["index"]["kind"] == "flat" and info["dim"] == 8
    idx = ImageIndex.load(folder)
    assert len(idx) == 30 and idx.path(3).endswith("img_003.png")


def test_index_folder_has_clip_retrievals_layout(built: dict) -> None:
    """What clip-retrieval's readers expect (clip_back.load_index / ParquetMetadataProvider on the indice
    folder; embedding-reader / autofaiss on img_emb/ + metadata/): the names, a float32 (rows, dim) array in
    the same row order as the index and the metadata, absolute `image_path`s and a `caption` column."""
    import faiss
    import pyarrow.parquet as pq

    folder = built["index"]
    assert (INDEX_FILE, METADATA_FILE, EMBEDDINGS_FILE) == (
        "image.index", "metadata/metadata_0.parquet", "img_emb/img_emb_0.npy")
    index = faiss.read_index(str(folder / INDEX_FILE))
    vectors = np.load(folder / EMBEDDINGS_FILE)
    assert vectors.dtype == np.float32 and vectors.shape == (index.ntotal, index.d) == (30, 8)
    # the array is what was added to the flat index: the same floats, along one code path
    assert np.array_equal(vectors, index.reconstruct_n(0, index.ntotal))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    meta = pq.read_table(folder / METADATA_FILE)
    assert meta.num_rows == 30 and meta.column_names[:2] == ["image_path", "caption"]
    assert meta.schema.field("image_path").type == meta.schema.field("caption").type == "string"
    paths = meta.column("image_path").to_pylist()
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert [Path(p).name for p in paths] == [f"img_{i:03d}.png" for i in range(30)]
    # row i of the metadata is row i of the index: the image's own vector is its nearest neighbour
    model = AlignedModel.from_pretrained(built["model"])
    q = np.asarray(model.encode([paths[11]], "image", normalize_embeddings=True), dtype=np.float32)
    assert index.search(q, 1)[1][0, 0] == 11


def test_index_without_embeddings_and_rebuild_in_place(built: dict, tmp_path) -> None:
    out = tmp_path / "ix"
    build_index(built["model"], str(built["images"]), out, store=built["root"] / "store", num_workers=0,
                show_progress=False)
    (out / "metadata" / "metadata_9.parquet").write_bytes((out / METADATA_FILE).read_bytes())  # a stale part
    idx = build_index(built["model"], str(built["images"]), out, store=built["root"] / "store", num_workers=0,
                      embeddings=False, show_progress=False)
    assert not (out / "img_emb" / "img_emb_0.npy").exists() and idx.info["files"]["embeddings"] is None
    assert sorted(p.name for p in (out / "metadata").iterdir()) == ["metadata_0.parquet"]
    assert len(ImageIndex.load(out)) == 30


def test_old_index_layout_asks_for_a_rebuild(built: dict, tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": "unialign-index/1"}))
    for name in ("index.faiss", "metadata.parquet"):
        (old / name).write_bytes(b"")
    with pytest.raises(UnialignError, match=r"old layout .* rebuild it with `unialign index`"):
        ImageIndex.load(old)


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


def test_hnsw_builds_are_byte_identical_and_leave_the_thread_count() -> None:
    """HNSW insertion runs on one thread, so a rebuild of one set is the same graph, byte for byte."""
    import faiss

    x = np.random.default_rng(1).normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    threads = faiss.omp_get_max_threads()
    a, b = (faiss.serialize_index(make_faiss_index(x, "hnsw")[0]) for _ in range(2))
    assert np.array_equal(a, b) and faiss.omp_get_max_threads() == threads


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
    assert "30 images" in r.output and (tmp_path / "ix" / "image.index").exists()


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
    ([], "body: List should have at least 1 item"),
    (["a"] * 5, "body: List should have at most 4 items"),
    (["ok", "  "], "body 1: is blank"),
    (["ok", "\u3000\u2003\n"], "body 1: is blank"),  # Unicode white space is blank too
    (["x" * 101], "body 0: String should have at most 100 characters"),
    ({"texts": ["a"]}, "invalid request"),
    ([1, 2], "invalid request"),
])
def test_embed_text_bad_input(client: TestClient, payload, needle: str) -> None:
    assert needle in error_of(client.post("/embed/text", json=payload), 422)


def test_embed_text_malformed_json(client: TestClient) -> None:
    r = client.post("/embed/text", content=b"[not json", headers={"content-type": "application/json"})
    assert "invalid request" in error_of(r, 422)


def test_unparsable_bodies_are_400(client: TestClient) -> None:
    not_utf8 = client.post("/embed/text", content=b'["caf\xe9"]', headers={"content-type": "application/json"})
    assert "parsing the body" in error_of(not_utf8, 400)
    for body, ctype in [(b"garbage", "multipart/form-data; boundary=xyz"), (b"x", "multipart/form-data")]:
        assert "multipart" in error_of(client.post("/embed/image", content=body, headers={"content-type": ctype}), 400)


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
    empty = client.post("/embed/image", files={"file": ("empty.png", b"", "image/png")})
    assert "empty.png: file is empty" in error_of(empty, 415)
    trunc = png_bytes((50, 50))[:60]
    assert "truncated" in error_of(client.post("/embed/image", files={"file": ("t.png", trunc, "image/png")}), 415)
    many = [("file", (f"{i}.png", png_bytes(), "image/png")) for i in range(5)]
    assert "body file: List should have at most 4 items" in error_of(client.post("/embed/image", files=many), 422)
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
    data = {"labels": "thing 1, thing 2 ,thing 3\n thing 1"}
    files = {"file": ("img.png", (built["images"] / "img_001.png").read_bytes(), "image/png")}
    body = client.post("/classify", data=data, files=files).json()
    assert [l["label"] for l in body["labels"]].count("thing 1") == 1 and len(body["labels"]) == 3
    assert sum(l["score"] for l in body["labels"]) == pytest.approx(1.0, abs=1e-4)
    scores = [l["score"] for l in body["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert body["templates"] and all("{}" in t for t in body["templates"])
    custom = client.post("/classify", data={**data, "templates": "a picture of {}|{}"}, files=files).json()
    assert custom["templates"] == ["a picture of {}", "{}"]


def test_classify_labels_and_templates_follow_their_patterns(client: TestClient) -> None:
    img = {"file": ("a.png", png_bytes(), "image/png")}
    ok = client.post("/classify", data={"labels": "cat,\u3000dog\r\nrocket\n", "templates": "  photo "}, files=img)
    assert ok.status_code == 200, ok.text
    assert sorted(l["label"] for l in ok.json()["labels"]) == ["cat", "dog", "rocket"]
    assert len(ok.json()["templates"]) > 1  # the named set, not a template called "photo"
    assert "5 labels" in error_of(client.post("/classify", data={"labels": "a,b,c,d,e,f"}, files=img), 422)
    for labels in (" , ,", "a,,b", ", a", "a, b,,"):
        assert "none of them blank" in error_of(client.post("/classify", data={"labels": labels}, files=img), 422)
    for templates in ("nonsense", "a {} {b}", "{} and {}", "a {}|", "x {0}"):
        # "a {} {b}" passed the old check (one "{}") and failed in str.format: a 500
        msg = error_of(client.post("/classify", data={"labels": "a", "templates": templates}, files=img), 422)
        assert "templates" in msg and "no other brace" in msg, templates
    assert "labels: is required" in error_of(client.post("/classify", files=img), 422)
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
    ({"q": ""}, "q: String should have at least 1 character"),
    ({"q": "   "}, "q: is blank"),
    ({"q": "\u00a0\u2029"}, "q: is blank"),
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
    assert "greater than or equal to 0" in error_of(client.get("/images/-1"), 422)
    assert "no such endpoint" in error_of(client.get("/nope"), 404)


@pytest.mark.parametrize("method,path,allowed", [("GET", "/classify", {"POST"}), ("TRACE", "/health", {"GET"}),
                                                 ("DELETE", "/images/3", {"GET"}), ("HEAD", "/search", {"GET"})])
def test_405_says_which_methods_are_allowed(client: TestClient, method: str, path: str, allowed: set) -> None:
    r = client.request(method, path)
    assert r.status_code == 405 and (method == "HEAD" or "not allowed" in error_of(r, 405))
    assert {m.strip() for m in r.headers["allow"].split(",")} == allowed


def test_openapi_states_the_rules_the_server_checks(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas, paths = spec["components"]["schemas"], spec["paths"]
    texts = paths["/embed/text"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert (texts["minItems"], texts["maxItems"]) == (1, 4)
    assert (texts["items"]["minLength"], texts["items"]["maxLength"], texts["items"]["pattern"]) == (1, 100, NONBLANK)
    q, k = (p["schema"] for p in paths["/search"]["get"]["parameters"])
    assert (q["minLength"], q["maxLength"], q["pattern"]) == (1, 100, NONBLANK)
    assert k["minimum"] == 1 and k["default"] <= k["maximum"] == 10
    assert paths["/images/{row}"]["get"]["parameters"][0]["schema"]["minimum"] == 0
    files = schemas["Body_embed_image_embed_image_post"]["properties"]["file"]
    assert (files["minItems"], files["maxItems"], files["items"]["format"]) == (1, 4, "binary")
    classify = schemas["Body_classify_classify_post"]["properties"]
    assert classify["file"]["format"] == "binary"
    assert classify["labels"]["pattern"] == labels_pattern(5) and classify["labels"]["maxLength"] == 500
    assert classify["templates"]["pattern"] == templates_pattern(TEMPLATES)
    for path in ("/embed/image", "/classify", "/search/image"):
        encoding = paths[path]["post"]["requestBody"]["content"]["multipart/form-data"]["encoding"]
        assert encoding["file"]["contentType"] == ", ".join(IMAGE_TYPES)
    documented = {(path, code) for path, ops in paths.items() for op in ops.values() for code in op["responses"]}
    for path, codes in [("/health", "413"), ("/embed/text", "400 413 422"), ("/embed/image", "400 413 415 422"),
                        ("/classify", "400 413 415 422"), ("/search", "404 413 422"),
                        ("/search/image", "400 404 413 415 422"), ("/images/{row}", "404 413 422")]:
        assert {c for p, c in documented if p == path and c.startswith("4")} == set(codes.split()), path
    errors = [r for ops in paths.values() for op in ops.values() for c, r in op["responses"].items() if c[0] == "4"]
    assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"} for r in errors)
    assert "HTTPValidationError" not in schemas


@pytest.mark.parametrize("text,blank", [("a", False), (" \t\n", True), ("\u3000\u2003\u00a0\u0085", True),
                                        ("\x1c", False), ("\ufeff", False), ("", True)])
def test_blank_means_the_same_to_the_pattern_pydantic_and_the_handlers(text: str, blank: bool) -> None:
    """Python's `\\s` and str.strip() count U+001C..U+001F as white space, JavaScript's U+FEFF, Rust's neither:
    NONBLANK spells Unicode White_Space out, and SPACE strips exactly that."""
    import re

    from pydantic import StringConstraints, TypeAdapter
    from typing import Annotated

    def valid(value: str) -> bool:
        try:
            TypeAdapter(Annotated[str, StringConstraints(pattern=NONBLANK)]).validate_python(value)
            return True
        except ValueError:
            return False

    assert valid(text) is (not blank)
    assert (re.search(NONBLANK, text) is None) is blank
    assert (text.strip(SPACE) == "") is blank


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


# -- the schema is the behaviour: schemathesis, every phase and check ---------------------------------
def run_schemathesis(app, max_examples: int, seed: int) -> tuple[list[str], Counter]:
    """What `SCHEMATHESIS_HOOKS=tests/schemathesis_hooks.py schemathesis --config-file tests/schemathesis.toml
    run <url>/openapi.json --checks all` does
    (every phase: examples, coverage, fuzzing, stateful), in-process against the ASGI ``app``. Returns the
    failed checks, one line each, and the answers counted by (operation, method sent, status)."""
    import schemathesis
    from schemathesis.engine import events, from_schema

    import schemathesis_hooks  # noqa: F401  (registers its filter_failure hook)

    config = schemathesis.Config.from_path(Path(__file__).with_name("schemathesis.toml"))
    config.update(seed=seed, max_failures=None)
    config.projects.override.checks.update(included_check_names=["all"])
    config.projects.override.generation.update(max_examples=max_examples, database="none")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    failures, answers = [], Counter()
    for event in from_schema(schema).execute():
        if isinstance(event, (events.NonFatalError, events.FatalError)):
            failures.append(f"schemathesis could not run: {event}")
        if not isinstance(event, events.ScenarioFinished):
            continue
        for case_id, interaction in event.recorder.interactions.items():
            if interaction.response is not None:
                operation = event.recorder.cases[case_id].value.operation.label
                answers[operation, interaction.request.method, interaction.response.status_code] += 1
        for case_id, checks in event.recorder.checks.items():
            for check in checks:
                if check.failure_info is not None:
                    response = event.recorder.interactions[case_id].response
                    answer = f"HTTP {response.status_code} {response.content[:300]!r}" if response else "no answer"
                    failures.append(f"{event.phase.value} {event.recorder.label}: {check.name}: "
                                    f"{check.failure_info.failure.title}: {answer}\n{check.failure_info.code_sample}")
    return failures, answers


def test_schemathesis_finds_no_contract_failure_and_no_5xx(client: TestClient) -> None:
    """The schema says what the server does: undeclared methods get 405 with Allow, every schema-valid
    request is accepted (a 415 for a file that is not an image aside, see tests/schemathesis.toml), every
    schema-breaking one refused with a documented 4xx, every answer matches its documented schema."""
    pytest.importorskip("schemathesis")
    failures, answers = run_schemathesis(client.app, max_examples=15, seed=1)
    assert not failures, "\n\n".join(failures)
    assert not [key for key in answers if key[2] >= 500]
    operations = {op for op, _, _ in answers}
    assert operations == {"GET /health", "POST /embed/text", "POST /embed/image", "POST /classify", "GET /search",
                          "POST /search/image", "GET /images/{row}", "POST /match"}
    uploads = {"POST /embed/image", "POST /classify", "POST /search/image", "POST /match"}
    for op in operations:  # each took schema-valid data, refused schema-breaking data, and other methods
        method = op.split()[0]
        # an upload is accepted only when schemathesis picked one of its image samples (else 415)
        assert answers[op, method, 200] + (answers[op, method, 415] if op in uploads else 0) > 0, op
        assert sum(n for (o, m, status), n in answers.items() if o == op and m != method and status == 405) > 0, op
        if op != "GET /health":
            assert sum(n for (o, m, status), n in answers.items() if o == op and status == 422) > 0, op
    assert sum(answers[op, "POST", 200] for op in uploads) > 0  # real images were decoded and embedded


def test_labels_limit_stays_within_what_a_pattern_can_hold() -> None:
    """The labels pattern holds one copy of a label's pattern per label; pydantic's regex engine refuses
    programs over 10 MiB, so the limit is checked when the limits are made, not at the first request."""
    from typing import Annotated

    from pydantic import StringConstraints, TypeAdapter

    largest = TypeAdapter(Annotated[str, StringConstraints(pattern=labels_pattern(Limits(max_labels=1000).max_labels))])
    assert largest.validate_python(",".join(["cat"] * 1000))
    with pytest.raises(ValueError):
        largest.validate_python(",".join(["cat"] * 1001))
    with pytest.raises(UnialignError, match="max_labels must be 1 to 1000"):
        Limits(max_labels=5000)
