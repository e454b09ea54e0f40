"""End to end in a real browser: the web page served by `unialign serve`, driven by Playwright in
Debian's headless Chromium, over a model and index built from real emoji images with the real packaged
encoders (EfficientNet-Lite0 + MiniLM).

Kept fast and deterministic: 60 emoji concepts in one style (google), features through the feature
store, linear heads trained for a few hundred full-batch steps on those 60 pairs (seeded), so the
model knows exactly these concepts. Chromium must be installed (`bash scripts/setup.sh`): when it is
missing this test fails, it does not skip.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.slow  # a real Chromium and a server on 60 real emoji: end to end, run by .ci/run

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KNOWN = ["rocket", "red heart", "cat face", "pizza", "snowman", "t-rex", "sun", "dog face", "ghost", "banana"]
TEMPLATES = ["{}", "an emoji of {}.", "an icon of {}.", "a {} emoji."]


def emoji_subset(n: int = 60):
    """``n`` google-style emoji: the KNOWN concepts plus an even stride over the rest (deterministic)."""
    from unialign_train.data import load_dataset

    ds = load_dataset("emoji")
    google = [int(i) for i in ds.indices(styles=["google"])]
    by_label = {ds.records[i]["label"]: i for i in google}
    keep = [by_label[l] for l in KNOWN]
    for i in google[::32]:
        if len(keep) >= n:
            break
        if i not in keep:
            keep.append(i)
    return ds.subset(sorted(keep), name="emoji-google-browser-test")


def train_model(ds, store: Path, out: Path) -> Path:
    """Linear heads on the subset's cached features; a few seconds on CPU."""
    from unialign.encoders import load_encoder
    from unialign.model import AlignedModel
    from unialign.projections import Tower
    from unialign_train.features import extract

    torch.manual_seed(0)
    img_enc = load_encoder("effnet-lite0?image_size=128", device="cpu")
    txt_enc = load_encoder("st:all-MiniLM-L6-v2", device="cpu")
    fs = extract(ds, img_enc, store, num_workers=0, show_progress=False)
    x = torch.as_tensor(fs.array().numpy("float32"))
    labels = [ds.records[int(i)]["label"] for i in fs.index]
    t = torch.as_tensor(txt_enc.encode([tp.format(l) for tp in TEMPLATES for l in labels])).view(len(TEMPLATES), len(labels), -1)
    heads = torch.nn.ModuleDict({"image": Tower("linear", x.shape[1], 128), "text": Tower("linear", t.shape[-1], 128)})
    heads["image"].standardize.fit(x)
    heads["text"].standardize.fit(t.reshape(-1, t.shape[-1]))
    opt = torch.optim.Adam(heads.parameters(), lr=2e-3)
    target = torch.arange(len(labels))
    for _ in range(300):
        zi = F.normalize(heads["image"](x), dim=-1)
        loss = 0.0
        for k in range(len(TEMPLATES)):
            logits = zi @ F.normalize(heads["text"](t[k]), dim=-1).T / 0.05
            loss = loss + F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return AlignedModel({"image": img_enc, "text": txt_enc}, dict(heads.eval())).save_pretrained(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is not installed; run `bash scripts/setup.sh` (installs Debian's chromium)")
    import uvicorn

    from unialign_serve.app import create_app
    from unialign_serve.index import build_index

    root = tmp_path_factory.mktemp("browser")
    ds = emoji_subset()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and far faster on a busy machine
    try:
        model_dir = train_model(ds, root / "store", root / "model")
        index = build_index(model_dir, ds, root / "index", store=root / "store", num_workers=0, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(index) == 60
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(model_dir, index.root, device="cpu"), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "dataset": ds}
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        pg.set_default_timeout(30_000)
        pg.goto(server["url"] + "/")
        pg.wait_for_selector("body[data-ready='1']")
        yield pg
        browser.close()


def test_page_shows_model_and_index(page) -> None:
    assert "60 images indexed" in page.inner_text("#model-info")


@pytest.mark.parametrize("query,label", [("rocket", "rocket"), ("a red heart", "red heart"), ("t-rex", "t-rex")])
def test_text_search_shows_the_emoji(page, query: str, label: str) -> None:
    page.fill("#query", query)
    page.select_option("#k", "8")
    page.click("#search-button")
    page.wait_for_function("q => document.querySelector('#search-status').textContent.includes(q)", arg=query)
    tiles = page.locator("#results .tile")
    assert tiles.count() == 8
    top = [tiles.nth(i).get_attribute("data-label") for i in range(3)]
    assert label in top, top
    # the images come from the app and actually render
    page.wait_for_function("() => [...document.querySelectorAll('#results img')].slice(0, 3).every(i => i.complete && i.naturalWidth > 0)")
    assert "cosine" in tiles.first.inner_text()


def test_upload_classifies_the_image(page, server) -> None:
    ds = server["dataset"]
    i = next(j for j, r in enumerate(ds.records) if r["label"] == "pizza")
    page.set_input_files("#file", str(ds.path(i)))
    page.fill("#labels", "cat face, rocket, pizza, snowman, ghost")
    page.click("#classify-button")
    page.wait_for_function("() => document.querySelectorAll('#ranking li').length === 5")
    first = page.locator("#ranking li").first.inner_text()
    assert first.startswith("pizza"), first
    assert "Best match: pizza" in page.inner_text("#classify-status")


def test_upload_of_a_non_image_shows_the_error(page, tmp_path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.fill("#labels", "cat face, rocket")
    page.click("#classify-button")
    page.wait_for_selector("#classify-status.error")
    assert "not a readable image" in page.inner_text("#classify-status")


def test_empty_search_is_refused_in_the_page(page) -> None:
    page.fill("#query", "   ")
    page.click("#search-button")
    page.wait_for_selector("#search-status.error")
