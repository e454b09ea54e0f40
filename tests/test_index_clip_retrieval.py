"""An index folder read by the real clip-retrieval (2.45.0) and embedding-reader, in an isolated virtualenv.

clip-retrieval pins torch, numpy < 2, pandas < 3 and an inference stack (wandb, webdataset, open_clip) that
this project's environment must not get, so it never goes into the test interpreter: a virtualenv under
``$UNIALIGN_HOME/venvs`` sees the system packages (faiss, numpy, pandas, pyarrow, torch) and adds, without
their dependencies, clip-retrieval, embedding-reader and the few light modules ``clip_back`` imports.
The virtualenv is made once and reused; the test skips, saying why, when pip cannot install them.

The folder goes through what ``clip-retrieval back`` does with an indice folder (``load_index`` plain and
memory-mapped, ``load_metadata_provider`` from parquet and through hdf5, ``KnnService.query`` with an
embedding, which searches, reconstructs, maps rows to metadata and inlines each image from its
``image_path``), and through ``EmbeddingReader`` over ``img_emb/`` + ``metadata/`` as ``clip-retrieval
index`` and autofaiss read embeddings.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unialign.encoders import register_encoder
from unialign.model import AlignedModel
from unialign.paths import home

from tiny import TinyImageEncoder, TinyTextEncoder, make_image_dataset, tiny_model

pytestmark = pytest.mark.slow

register_encoder("tiny-image", lambda name, device, **kw: TinyImageEncoder(), "tiny-image")
register_encoder("tiny-text", lambda name, device, **kw: TinyTextEncoder(), "tiny-text")

# Installed with --no-deps: the packages, and the light modules clip_back.py imports that the system lacks.
PACKAGES = ["clip-retrieval==2.45.0", "embedding-reader==1.8.1", "flask-restful", "aniso8601", "pytz", "six",
            "fire", "termcolor", "h5py", "prometheus-client"]

READER = r'''
import base64, importlib.util, io, json, shutil, sys, types
import numpy as np
from PIL import Image

# clip_retrieval/__init__.py imports the whole inference stack (wandb, webdataset, open_clip); the
# readers live in clip_back.py, so the package is loaded without running its __init__.
spec = importlib.util.find_spec("clip_retrieval")
package = types.ModuleType("clip_retrieval")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["clip_retrieval"] = package
from clip_retrieval import clip_back
from embedding_reader import EmbeddingReader

folder, copy, query = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
columns = ["image_path", "caption", "id", "label"]
out = {"queries": []}
for mmap, hdf5 in ((False, False), (True, True)):
    if hdf5:  # the hdf5 provider writes metadata.hdf5 into the folder it reads: give it a copy
        shutil.copytree(folder, copy)
    root = copy if hdf5 else folder
    index = clip_back.load_index(root + "/image.index", mmap)
    provider, _ = clip_back.load_metadata_provider(root, hdf5, False, index, columns, False)
    resource = clip_back.ClipResource(
        device="cpu", model=None, preprocess=None, tokenizer=None, model_txt_mclip=None, safety_model=None,
        violence_detector=None, metadata_provider=provider, image_index=index, text_index=None,
        ivf_old_to_new_mapping=None, columns_to_return=columns, metadata_is_ordered_by_ivf=False,
        aesthetic_embeddings=None)
    service = clip_back.KnnService(clip_resources={"unialign": resource})
    hits = service.query(embedding_input=query, modality="image", num_images=3, num_result_ids=3,
                         deduplicate=False)
    for hit in hits:
        image = hit.pop("image", None)
        hit["image_size"] = list(Image.open(io.BytesIO(base64.b64decode(image))).size) if image else None
        hit["id"] = int(hit["id"]); hit["similarity"] = float(hit["similarity"])
    out["queries"].append({"mmap": mmap, "hdf5": hdf5, "ntotal": int(index.ntotal), "hits": hits})

reader = EmbeddingReader(folder + "/img_emb", file_format="parquet_npy", metadata_folder=folder + "/metadata",
                         meta_columns=["image_path", "caption"])
parts = list(reader(batch_size=1000, start=0, end=reader.count, show_progress=False))
out["reader"] = {"count": int(reader.count), "dimension": int(reader.dimension),
                 "embeddings": np.concatenate([e for e, _ in parts]).tolist(),
                 "image_path": [p for _, m in parts for p in m["image_path"]],
                 "caption": [c for _, m in parts for c in m["caption"]]}
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def clip_retrieval_python() -> Path:
    """The python of a virtualenv that has clip-retrieval; made once under $UNIALIGN_HOME/venvs."""
    root = home() / "venvs" / "clip-retrieval-2.45.0"
    python = root / "bin" / "python"
    if not (root / "installed").exists():
        shutil.rmtree(root, ignore_errors=True)
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(root)
        r = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", *PACKAGES],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"clip-retrieval could not be installed into a virtualenv: {r.stderr.strip()[-500:]}")
        (root / "installed").write_text("\n".join(PACKAGES) + "\n")
    r = subprocess.run([str(python), "-c", "import faiss, flask_restful, h5py, embedding_reader"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"the clip-retrieval virtualenv {root} cannot import its readers: {r.stderr.strip()[-500:]}")
    return python


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_clip_retrieval_reads_the_index_folder(clip_retrieval_python: Path, tmp_path: Path, kind: str) -> None:
    from unialign_serve.index import ImageIndex, build_index

    model_dir = tiny_model(tmp_path / "model")
    dataset = make_image_dataset(tmp_path / "images", n=30)  # with captions, unlike a bare image folder
    folder = build_index(model_dir, dataset, tmp_path / "index", kind=kind, store=tmp_path / "store",
                         num_workers=0, show_progress=False).root
    ours = ImageIndex.load(folder)
    model = AlignedModel.from_pretrained(model_dir)
    query = np.asarray(model.encode([ours.path(7)], "image", normalize_embeddings=True), dtype=np.float32)

    r = subprocess.run([str(clip_retrieval_python), "-c", READER, str(folder), str(tmp_path / "copy"),
                        json.dumps(query[0].tolist())], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])

    expected = ours.search(query, k=3)[0]
    for q in out["queries"]:  # plain and memory-mapped index, parquet and hdf5 metadata: the same answer
        assert q["ntotal"] == 30
        assert [h["id"] for h in q["hits"]] == [h.row for h in expected]
        assert [h["image_path"] for h in q["hits"]] == [h.path for h in expected]
        assert [h["caption"] for h in q["hits"]] == [h.caption for h in expected]
        assert q["hits"][0]["image_path"].endswith("img_007.png")
        # the same index and query, which ImageIndex.search renormalises: float32 rounding apart, the same scores
        assert [h["similarity"] for h in q["hits"]] == pytest.approx([h.score for h in expected], abs=1e-6)
        # clip-retrieval inlined each image from its image_path
        assert all(h["image_size"] == list(Image.open(h["image_path"]).size) for h in q["hits"])

    reader = out["reader"]
    assert (reader["count"], reader["dimension"]) == (30, 8)
    assert reader["image_path"] == [ours.path(i) for i in range(30)]
    assert reader["caption"] == [f"thing {i % 7}" for i in range(30)]
    stored = np.load(folder / "img_emb" / "img_emb_0.npy")
    assert np.array_equal(np.asarray(reader["embeddings"], dtype=np.float32), stored)  # JSON round trip of float32
