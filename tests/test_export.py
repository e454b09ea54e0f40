"""sentence-transformers export (``unialign export``): both towers, every kind of projection, loaded
and run in a Python process that never imports unialign.

The models are built here from small real backbones (EfficientNet-Lite0 at 32 px, a 2-layer ViT and a
2-layer BERT with MiniLM's tokenizer, random weights) and random but well-formed projections, saved
and reloaded with ``AlignedModel.from_pretrained``, exported, and then loaded by one child process
that writes its embeddings to .npy files; the parent compares them with ``AlignedModel.encode``.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unialign.encoders import load_encoder
from unialign.model import AlignedModel
from unialign.projections import AnchorMap, Chain, LayerScale, LinearMap, Tower

from tiny import tiny_model

TEXTS = ["a cat face", "grinning face", "an emoji of a red apple.", "x", "a much longer caption " * 12]
STANDALONE = Path(__file__).resolve().parents[1] / "src" / "unialign" / "standalone"

# Loads each exported folder with sentence-transformers alone, encodes, writes .npy files, and fails if
# anything named unialign* was imported on the way.
CHILD = textwrap.dedent('''
    import json, sys
    import numpy as np
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    for job in json.loads(sys.argv[1]):
        if job["remote"]:  # custom code in the folder: refused without the flag
            try:
                SentenceTransformer(job["folder"], device="cpu")
                raise SystemExit(job["folder"] + " loaded without trust_remote_code")
            except ValueError as e:
                assert "trust_remote_code" in str(e), e
        st = SentenceTransformer(job["folder"], device="cpu", trust_remote_code=job["remote"])
        items = [Image.open(v) if k == "image" else v for k, v in job["inputs"]]
        out = job["out"]
        np.save(out + "-default.npy", st.encode(items))
        np.save(out + "-batch3.npy", st.encode(items, batch_size=3))
        np.save(out + "-alone.npy", np.stack([st.encode(x) for x in items]))
        if job.get("resave"):
            st.save(job["resave"])
            again = SentenceTransformer(job["resave"], device="cpu", trust_remote_code=True)
            np.save(out + "-resaved.npy", again.encode(items, batch_size=3))
    bad = sorted(k for k in sys.modules if k.split(".")[0].startswith("unialign"))
    assert not bad, bad
''')


def _images(folder: Path) -> list[Path]:
    """Small PNGs in the modes unialign converts (RGBA on white, palette, grey), of several shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (mode, (w, h)) in enumerate([("RGB", (40, 30)), ("RGBA", (24, 24)), ("L", (50, 20)), ("P", (33, 33))]):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if mode == "RGBA":
            im.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        paths.append(folder / f"im{i}.png")
        (im if mode == "RGBA" else im.convert(mode)).save(paths[-1])
    return paths


def _tiny_st(folder: Path) -> Path:
    """A 2-layer BERT with MiniLM's tokenizer as a sentence-transformers folder, trailing Normalize included."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling
    from transformers import BertConfig, BertModel

    from unialign.encoders.st import packaged_minilm_path

    bert = folder / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_minilm_path() / f, bert / f)
    SentenceTransformer(modules=[Transformer(str(bert), max_seq_length=24), Pooling(32, "mean"), Normalize()],
                        device="cpu").save(str(folder / "st"))
    return folder / "st"


def _tiny_vit(folder: Path) -> Path:
    """A 2-layer ViT with a fixed-size (no crop) processor config."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder


def _centre(feats: torch.Tensor) -> torch.Tensor:
    """The fit-set mean closed-form maps subtract: the mean of the L2-normalised features."""
    return F.normalize(feats.double(), dim=-1).mean(0)


def _anchor_map(feats: torch.Tensor, n_anchors: int, n_unique: int, nuisance: int, seed: int) -> AnchorMap:
    """An ASIF map with duplicated anchors (as captions shared across styles give) and nuisance directions."""
    g = torch.Generator().manual_seed(seed)
    d = feats.shape[1]
    m = AnchorMap(d, n_anchors, n_unique, k=5, p=4.0, nuisance_rank=nuisance, chunk_size=3)
    m.mean.copy_(_centre(feats))
    m.nuisance.copy_(torch.linalg.qr(torch.randn(d, nuisance, dtype=torch.float64, generator=g))[0])
    m.anchors.copy_(F.normalize(torch.randn(n_unique, d, generator=g), dim=-1))
    # every distinct anchor held at least once, as in a fitted map
    held = torch.cat([torch.arange(n_unique), torch.randint(0, n_unique, (n_anchors - n_unique,), generator=g)])
    m.inverse.copy_(held[torch.randperm(n_anchors, generator=g)])
    return m


def _scaled_anchor_map(feats: torch.Tensor, dims: list[int]) -> Chain:
    """Two layers weighted by a LayerScale, then an ASIF map (the default's layer_weights)."""
    scale = LayerScale(dims)
    scale.scale.copy_(torch.tensor([3.0, 0.5]))
    return Chain([scale, _anchor_map(scale(feats), 40, 25, 2, 0)])


def _linear_map(feats: torch.Tensor, out_dim: int | None, seed: int) -> LinearMap:
    d = feats.shape[1]
    m = LinearMap(d, out_dim or d, identity=out_dim is None)
    m.mean.copy_(_centre(feats))
    if out_dim is not None:
        m.weight.copy_(torch.randn(d, out_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return m


def _tower(kind: str, feats: torch.Tensor, out_dim: int, options: dict | None = None) -> Tower:
    t = Tower(kind, feats.shape[1], out_dim, options)
    t.standardize.fit(feats)
    return t.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every kind of module an export holds, exported once and run through one child process; returns
    per export the child's embeddings and unialign's references."""
    from typer.testing import CliRunner

    from unialign_cli.main import app
    from unialign_train.export import export_sentence_transformers

    tmp = tmp_path_factory.mktemp("export")
    images = _images(tmp / "images")
    # backend=torch: the export runs PyTorch, so the references come from the same computation (ONNX
    # Runtime agrees with it to float32 rounding, not to the 1e-6 claimed here; tests/test_backends.py)
    effnet = load_encoder("effnet-lite0?image_size=32&backend=torch", device="cpu")
    text = load_encoder(f"st:{_tiny_st(tmp / 'text')}?backend=torch", device="cpu")
    vit = load_encoder(f"hf:{_tiny_vit(tmp / 'vit')}?pooling=cls+mean&backend=torch", device="cpu")
    pil = [Image.open(p) for p in images]
    f_eff = effnet.encode(pil, convert_to_numpy=False)
    f_eff_mix = effnet.encode(pil, convert_to_numpy=False, layers=["block3", "final"])
    f_vit, f_txt = vit.encode(pil, convert_to_numpy=False), text.encode(TEXTS, convert_to_numpy=False)
    f_txt_mix = text.encode(TEXTS, convert_to_numpy=False, layers=["final", "layer1"])
    torch.manual_seed(0)
    models = {  # name -> (encoders, projections, layers, exports: key -> modalities)
        "asif": ({"image": effnet, "text": text},  # the default's kind: ASIF on both sides, image layers scaled
                 {"image": _scaled_anchor_map(f_eff_mix, [int(effnet.layer_dims[n]) for n in ("block3", "final")]),
                  "text": _anchor_map(f_txt, 40, 30, 0, 1)}, {"image": ["block3", "final"]},
                 {"asif": None}),
        "towers": ({"image": effnet, "text": text},  # image layers mixed by concatenation, text by a layermix head
                   {"image": _tower("linear", f_eff_mix, 8),
                    "text": _tower("layermix", f_txt_mix, 8, {"layer_dims": [32, 32], "width": 16})},
                   {"image": ["block3", "final"], "text": ["final", "layer1"]}, {"towers": None}),
        "maps": ({"image": vit, "text": text},  # least squares: a linear map and the identity
                 {"image": _linear_map(f_vit, 32, 2), "text": _linear_map(f_txt, None, 3)}, {},
                 {"maps": None, "maps-text": ["text"]}),
        "linear": ({"image": vit, "text": text},
                   {"image": _tower("linear", f_vit, 8), "text": _tower("linear", f_txt, 8)}, {},
                   {"linear-text": ["text"]}),
    }
    both = [("image", str(p)) for p in images] + [("text", t) for t in TEXTS]
    both = [both[i] for i in (0, 4, 1, 5, 2, 6, 3, 7, 8)] + [("path", str(images[0]))]  # [image, "a cat face", ...]
    jobs, refs = {}, {}
    for name, (encs, projs, layers, keys) in models.items():
        saved = AlignedModel(encs, projs, layers).save_pretrained(tmp / "models" / name)
        model = AlignedModel.from_pretrained(saved, device="cpu")
        for key, mods in keys.items():
            folder, inputs = tmp / "st" / key, both if mods is None else [("text", t) for t in TEXTS]
            if key == "asif":  # through the command line, from the saved folder
                res = CliRunner().invoke(app, ["export", "--model", str(saved), "--out", str(folder)])
                assert res.exit_code == 0, res.output
            else:
                export_sentence_transformers(model, folder, modalities=mods)
            refs[key] = {"grouped": _reference(model, inputs, grouped=True), "alone": _reference(model, inputs)}
            remote = json.loads((folder / "unialign_export.json").read_text())["trust_remote_code"]
            jobs[key] = {"folder": str(folder), "remote": remote, "inputs": inputs, "out": str(tmp / "out" / key),
                         **({"resave": str(tmp / "resaved")} if key == "asif" else {})}
    (tmp / "out").mkdir()
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(list(jobs.values()))], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"refs": refs, "out": tmp / "out", "st": tmp / "st", "jobs": jobs}


def _reference(model: AlignedModel, inputs: list, grouped: bool = False) -> np.ndarray:
    """``AlignedModel.encode(..., normalize_embeddings=True)`` of each input (images as PIL images,
    ``path`` inputs as file paths): each alone, or (``grouped``) all images in one batch and all texts
    in another, the batches one mixed ``encode`` call of the export makes."""
    items = [(Image.open(v) if k == "image" else Path(v) if k == "path" else v) for k, v in inputs]
    if not grouped:
        return np.stack([model.encode([x], normalize_embeddings=True)[0] for x in items])
    rows: list = [None] * len(items)
    for is_text in (False, True):
        idx = [i for i, (k, _) in enumerate(inputs) if (k == "text") == is_text]
        if idx:
            for i, row in zip(idx, model.encode([items[i] for i in idx], normalize_embeddings=True)):
                rows[i] = row
    return np.stack(rows)


def _got(exports: dict, key: str, what: str) -> np.ndarray:
    return np.load(exports["out"] / f"{key}-{what}.npy")


KEYS = ["asif", "towers", "maps", "maps-text", "linear-text"]


@pytest.mark.numerics
@pytest.mark.parametrize("key", KEYS)
def test_export_encodes_like_aligned_model(exports: dict, key: str) -> None:
    """In another process, without unialign: one mixed ``encode`` call (images in one batch, texts in
    another) and each input alone give unialign's embeddings of the same batches."""
    refs = exports["refs"][key]
    assert refs["alone"].shape[0] == len(exports["jobs"][key]["inputs"]) and np.all(np.abs(refs["alone"]).sum(1) > 0)
    np.testing.assert_allclose(_got(exports, key, "default"), refs["grouped"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(_got(exports, key, "alone"), refs["alone"], atol=1e-6, rtol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("key", KEYS)
def test_export_embedding_does_not_depend_on_the_batch(exports: dict, key: str) -> None:
    """Batches of 3 mixing images and strings in sentence-transformers' length order. Texts: unialign's
    embeddings to 1e-6 whatever the batch. Images: the CNN/ViT backbones' own float results change with
    the batch size (oneDNN picks kernels by shape), in unialign as much as here; the export adds nothing
    to that spread (the anchor map and the router work row by row)."""
    refs, got = exports["refs"][key], _got(exports, key, "batch3")
    text = np.array([k == "text" for k, _ in exports["jobs"][key]["inputs"]])
    np.testing.assert_allclose(got[text], refs["alone"][text], atol=1e-6, rtol=0)
    if not text.all():
        spread = np.abs(refs["alone"] - refs["grouped"])[~text].max()  # unialign's own, batch of 1 vs of 5
        np.testing.assert_allclose(got[~text], refs["alone"][~text], atol=1e-6 + 2 * spread, rtol=0)


def test_must_show_pil_image_and_string_in_one_call(exports: dict) -> None:
    job = exports["jobs"]["asif"]
    assert [k for k, _ in job["inputs"][:2]] == ["image", "text"] and job["inputs"][1][1] == "a cat face"
    got = _got(exports, "asif", "default")[:2]  # SentenceTransformer(folder).encode([pil_image, "a cat face", ...])
    np.testing.assert_allclose(got, exports["refs"]["asif"]["grouped"][:2], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_resaved_export_loads_and_encodes_the_same(exports: dict) -> None:
    # sentence-transformers' own save of the loaded folder, loaded again: the same code on the same inputs
    assert np.array_equal(_got(exports, "asif", "resaved"), _got(exports, "asif", "batch3"))


@pytest.mark.parametrize("key,remote,custom", [
    ("asif", True, {"ModalityRouter", "EfficientNetImage", "Projection"}),
    ("towers", True, {"ModalityRouter", "EfficientNetImage", "Projection"}),
    ("maps", True, {"ModalityRouter", "HFVisionImage"}),
    ("maps-text", False, set()),
    ("linear-text", False, set()),
])
def test_custom_code_only_where_sentence_transformers_has_no_module(exports: dict, key: str, remote: bool,
                                                                    custom: set) -> None:
    folder = exports["st"] / key
    info = json.loads((folder / "unialign_export.json").read_text())
    refs = [m["type"] for m in json.loads((folder / "modules.json").read_text())]
    if (folder / "router_config.json").exists():
        refs += json.loads((folder / "router_config.json").read_text())["types"].values()
    assert info["trust_remote_code"] is remote and exports["jobs"][key]["remote"] is remote
    assert {r.split(".", 1)[1] for r in refs if r.startswith("st_modules.")} == custom
    assert all(r.startswith(("sentence_transformers.", "st_modules.")) for r in refs)
    shipped = sorted(p.name for p in folder.glob("*.py"))
    if remote:  # the standalone sources, verbatim
        assert shipped == ["compose.py", "heads.py", "imaging.py", "maps.py", "pooling.py", "st_modules.py"]
        assert all((folder / f).read_bytes() == (STANDALONE / f).read_bytes() for f in shipped)
        assert "trust_remote_code=True" in (folder / "README.md").read_text()
    else:
        assert shipped == [] and "trust_remote_code` is not" in (folder / "README.md").read_text()
    tails = {"maps": ["Normalize", "Dense", "Normalize"], "maps-text": ["Normalize", "Dense", "Normalize"],
             "linear-text": ["Pooling", "Dense", "Normalize"]}  # linear maps and heads fold into ST's own Dense
    if key in tails:
        assert all(route[-3:] == tails[key] for route in info["routes"].values())


def test_linear_folds_match_the_modules() -> None:
    from sentence_transformers.base.modules.normalize import Normalize

    from unialign_train.export import folded_dense, map_dense

    torch.manual_seed(0)
    x = torch.rand(64, 96) ** 3 * 5  # all positive and skewed, like CNN features
    for m in (_linear_map(x, 24, 0), _linear_map(x, None, 0)):
        got = map_dense(m)(Normalize()({"sentence_embedding": x}))["sentence_embedding"]
        torch.testing.assert_close(F.normalize(got, dim=-1), F.normalize(m(x), dim=-1), atol=1e-6, rtol=0)
    t = _tower("linear", x, 24)
    torch.nn.init.normal_(t.head.proj.weight)
    got = folded_dense(t)({"sentence_embedding": x})["sentence_embedding"]
    torch.testing.assert_close(F.normalize(got, dim=-1), F.normalize(t(x), dim=-1), atol=1e-6, rtol=0)


def test_standalone_sources_import_no_unialign() -> None:
    """What an export ships imports only these libraries and its sibling files."""
    allowed = {"__future__", "typing", "math", "dataclasses", "os", "json", "numpy", "torch", "PIL", "sentence_transformers",
               "transformers", "efficientnet_lite_pytorch"}
    siblings = {p.stem for p in STANDALONE.glob("*.py")}
    for path in STANDALONE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in siblings, (path.name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)


def test_export_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from unialign_cli.main import app

    model = tiny_model(tmp_path / "model")  # tiny test encoders: neither st: nor an image backbone

    def run(*args: str) -> str:
        res = CliRunner().invoke(app, ["export", "--model", str(model), *args])
        assert res.exit_code != 0 and res.exception is not None
        return str(res.exception)

    msg = run("--out", str(tmp_path / "a"))
    assert "tiny-image cannot be exported" in msg and "effnet-lite" in msg and "\n" not in msg
    assert "tiny-text cannot be exported" in run("--out", str(tmp_path / "a"), "--modalities", "text")
    assert "no audio side" in run("--out", str(tmp_path / "a"), "--modalities", "audio")
    assert "unknown format" in run("--out", str(tmp_path / "a"), "--format", "onnx")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert "not empty" in run("--out", str(tmp_path / "full"))
    assert not (tmp_path / "a").exists() and (tmp_path / "full" / "keep.txt").read_text() == "x"


@pytest.mark.slow
def test_default_model_export_without_unialign(tmp_path: Path) -> None:
    """The real default model (EfficientNet-Lite0 + MiniLM, ASIF): real emoji images and captions."""
    from unialign_train.export import export_sentence_transformers

    model_dir = Path(__file__).resolve().parents[1] / "runs" / "default" / "model"
    if not (model_dir / "config.json").exists():  # a clean checkout: train it as `unialign run` does (cached features)
        from unialign_train.config import load_config
        from unialign_train.pipeline import run

        cfg = load_config(overrides={"output": str(tmp_path / "default"), "eval.zero_shot_sets": {}})
        model_dir = Path(run(cfg, log=lambda s: None)["model_dir"])
    images = sorted(Path(os.environ.get("UNIALIGN_HOME", Path.home() / ".cache" / "unialign")).glob(
        "datasets/emoji/img/*/1f60*.png"))[:6]
    if not images:
        pytest.skip("the emoji dataset is not built")
    model = AlignedModel.from_pretrained(model_dir, device="cpu")
    export_sentence_transformers(model, tmp_path / "st")
    inputs = [("image", str(p)) for p in images] + [("text", t) for t in TEXTS]
    job = {"folder": str(tmp_path / "st"), "remote": True, "inputs": inputs, "out": str(tmp_path / "emb")}
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([job])], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grouped, alone = _reference(model, inputs, grouped=True), _reference(model, inputs)
    np.testing.assert_allclose(np.load(tmp_path / "emb-default.npy"), grouped, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "emb-alone.npy"), alone, atol=1e-6, rtol=0)
    spread = np.abs(alone - grouped).max()  # the backbone's float noise across batch sizes, in unialign itself
    np.testing.assert_allclose(np.load(tmp_path / "emb-batch3.npy"), alone, atol=1e-6 + 2 * spread, rtol=0)
