"""A searchable image index: a collection embedded by an aligned model, in FAISS, with its metadata.

Building goes through the feature store, so it is resumable and a rebuild reuses cached features:
images -> the model's frozen image encoder (its layers) -> :func:`~unialign.features.extract.extract`
-> the model's image projection -> L2-normalised vectors -> FAISS (inner product = cosine).

Folder layout (explains itself; clip-retrieval's names, so its tools read the same folder)::

    <index>/image.index                   the FAISS index; row i of the index is row i of the metadata
    <index>/metadata/metadata_0.parquet   image_path (absolute), caption, row, dataset index, id, label, concept, style
    <index>/img_emb/img_emb_0.npy         the vectors, float32 (rows, dim); left out with embeddings=False
    <index>/index.json                    format, model folder + encoder specs, dataset, counts, index kind, store
    <index>/README.md                     how it was built and how to load it

``clip-retrieval back`` serves ``image.index`` + ``metadata/`` as an "indice folder" (its
``columns_to_return`` default names ``image_path`` and ``caption``); ``img_emb/`` + ``metadata/`` are
the layout of ``clip-retrieval inference`` output, which ``clip-retrieval index``, autofaiss and
embedding-reader read (one ``.npy`` and one ``.parquet`` per part, paired by sorted name). The vectors
in ``img_emb/`` are also inside ``image.index`` (every kind here stores them); they are there for those
tools and to re-index without re-encoding, and ``embeddings=False`` (``--no-embeddings``) leaves them out.

Index kinds (built by :func:`unialign.search.build_index`): ``flat`` (exact) is the default below
``threshold`` vectors; above it, ``auto`` picks ``hnsw``. ``ivf`` can be asked for explicitly. Search
results are always cosine similarities in [-1, 1].
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unialign.errors import DataError, UnialignError
from unialign.io import atomic_path, read_json, write_json, write_text
from unialign.search import HNSW_THRESHOLD as DEFAULT_THRESHOLD
from unialign.search import INDEX_KINDS as KINDS
from unialign.search import build_index as build_faiss_index
from unialign.search import topk

FORMAT = "unialign-index/2"
INDEX_FILE = "image.index"
METADATA_FILE = "metadata/metadata_0.parquet"
EMBEDDINGS_FILE = "img_emb/img_emb_0.npy"
OLD_FILES = ("index.faiss", "metadata.parquet")  # unialign-index/1, before clip-retrieval's names


class IndexError_(UnialignError):
    """An index folder is missing, incomplete or does not match what was asked."""


# -- collection ------------------------------------------------------------------------------------
def load_collection(spec: str, styles: Sequence[str] | None = None, limit: int | None = None) -> Any:
    """A dataset spec (``emoji``, a table, a class-folder tree) or a flat folder of images -> PairDataset,
    optionally restricted to some styles and to the first ``limit`` records."""
    from unialign_train.data import Dataset, load_dataset
    from unialign_train.data.tables import IMAGE_SUFFIXES

    p = Path(str(spec)).expanduser()
    try:
        ds = load_dataset(str(spec))
    except DataError:
        if not p.is_dir():
            raise
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise DataError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) found") from None
        recs = [{"id": f.relative_to(p).as_posix(), "image": f.relative_to(p).as_posix(), "text": [],
                 "concept": f.stem, "label": f.stem.replace("_", " "), "style": ""} for f in files]
        ds = Dataset(p.resolve().name or "images", recs, p.resolve(), None, {"source": str(p)})
    if styles:
        keep = ds.indices(styles=list(styles))
        if len(keep) == 0:
            have = sorted(set(ds.column("style")))
            raise DataError(f"{spec}: no records in style(s) {list(styles)}; styles present: {have}")
        ds = ds.subset(keep, name=f"{ds.name}-{'-'.join(sorted(styles))}")
    if limit is not None and limit < len(ds):
        if limit < 1:
            raise DataError("limit must be >= 1")
        ds = ds.subset(range(limit), name=f"{ds.name}-first{limit}")
    return ds


# -- FAISS ---------------------------------------------------------------------------------------
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise UnialignError(f"unknown index kind {kind!r}; choose one of {list(KINDS)}")


# -- build -----------------------------------------------------------------------------------------
def build_index(model: Any, images: str | Any, out: str | Path, *, kind: str = "auto",
                threshold: int = DEFAULT_THRESHOLD, store: str | Path | None = None, styles: Sequence[str] | None = None,
                limit: int | None = None, batch_size: int = 64, num_workers: int | None = None,
                embeddings: bool = True, overwrite: bool = False, show_progress: bool = True,
                log: Any = None) -> "ImageIndex":
    """Embed a collection with ``model`` (an :class:`AlignedModel` or its folder) into an index folder.

    ``images`` is a dataset spec / image folder, or a Dataset. Features go through the resumable
    feature store (``store``, default under ``$UNIALIGN_HOME/features``): an interrupted run resumes,
    and a rerun reuses the cached features. ``embeddings=False`` writes no ``img_emb/`` (the vectors
    stay in ``image.index`` only).
    """
    import faiss

    from unialign.model import AlignedModel
    from unialign_train.features import extract

    _check_kind(kind)  # before the expensive part: loading the model and extracting every image
    log = log or (lambda *_: None)
    model_dir = None
    if not isinstance(model, AlignedModel):
        model_dir = Path(model).resolve()
        model = AlignedModel.from_pretrained(model_dir)
    elif model.info.get("model_dir"):
        model_dir = Path(model.info["model_dir"])
    out = Path(out)
    if (out / "index.json").exists() and not overwrite:
        old = read_json(out / "index.json")
        log(f"{out} already holds an index ({old.get('counts', {}).get('indexed')} images); rebuilding it")
    elif out.exists() and any(out.iterdir()) and not (out / "index.json").exists() and not overwrite:
        raise IndexError_(f"{out} exists and is not a unialign index; choose an empty folder or pass --overwrite")
    ds = images if hasattr(images, "records") else load_collection(str(images), styles, limit)
    spec = getattr(ds, "name", "?") if hasattr(images, "records") else str(images)

    fstore = extract(ds, model.image_encoder, store, layers=model.layers["image"], batch_size=batch_size,
                     num_workers=num_workers, show_progress=show_progress)
    if not len(fstore):
        raise IndexError_(f"{spec}: no image could be encoded ({len(fstore.skipped)} skipped; see {fstore.root}/manifest.json)")
    feats = np.concatenate([fstore.array(l).numpy(np.float32) for l in model.layers["image"]], axis=1)
    vectors = np.ascontiguousarray(model.project("image", feats).numpy().astype(np.float32))
    index, info = build_faiss_index(vectors, kind, threshold=threshold)

    record_of = {it: i for i in range(len(ds)) for it in ds.items(i, "image")}  # item path -> its record
    paths = fstore.items()
    rows = [record_of[p] for p in paths]
    recs = [ds.records[i] for i in rows]
    meta = {  # clip-retrieval's column names first: image_path, caption
        "image_path": [str(Path(p).resolve()) for p in paths],
        "caption": [str(r["text"][0]) if r.get("text") else "" for r in recs],
        "row": list(range(len(rows))),
        "index": rows,
        "id": [str(r["id"]) for r in recs],
        "label": [str(r.get("label") or "") for r in recs],
        "concept": [str(r.get("concept") or "") for r in recs],
        "style": [str(r.get("style") or "") for r in recs],
    }
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, embeddings)
    with atomic_path(out / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    with atomic_path(out / METADATA_FILE) as tmp:
        pq.write_table(pa.table(meta), tmp)
    if embeddings:
        with atomic_path(out / EMBEDDINGS_FILE) as tmp, open(tmp, "wb") as fh:
            np.save(fh, vectors)
    desc = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "dir": str(model_dir) if model_dir else None,
            "image_encoder": model.image_encoder.spec,
            "image_layers": model.layers["image"],
            "text_encoder": model.text_encoder.spec,
        },
        "collection": {"spec": spec, "name": ds.name, "fingerprint": ds.fingerprint(),
                       "styles": list(styles) if styles else None, "limit": limit},
        "counts": {"items": len(ds), "indexed": int(index.ntotal), "skipped": len(fstore.skipped)},
        "dim": int(vectors.shape[1]),
        "index": {**info, "threshold": threshold, "faiss": faiss.__version__},
        "feature_store": str(Path(fstore.root).resolve()),
        "files": {"index": INDEX_FILE, "metadata": METADATA_FILE, "embeddings": EMBEDDINGS_FILE if embeddings else None},
    }
    write_json(out / "index.json", desc)
    write_text(out / "README.md", _readme(desc))
    log(f"{out}: {index.ntotal} images indexed ({info['kind']}, dim {vectors.shape[1]}), "
        f"{len(fstore.skipped)} skipped; features in {fstore.root}")
    return ImageIndex.load(out)


def _remove_stale(out: Path, embeddings: bool) -> None:
    """Before a rebuild in place: remove what the new build would not overwrite and a reader would still
    pick up (clip-retrieval reads every part in ``metadata/`` and ``img_emb/``; the old layout's files)."""
    keep = {out / METADATA_FILE, out / EMBEDDINGS_FILE} if embeddings else {out / METADATA_FILE}
    stale = [out / f for f in OLD_FILES] + [*(out / "metadata").glob("*.parquet"), *(out / "img_emb").glob("*.npy")]
    for f in stale:
        if f not in keep and f.is_file():
            f.unlink()


def _readme(desc: dict[str, Any]) -> str:
    c = desc["counts"]
    return "\n".join([
        "# unialign image index",
        "",
        f"{c['indexed']} of {c['items']} images of `{desc['collection']['spec']}` ({c['skipped']} unreadable, skipped), "
        f"embedded by the aligned model `{desc['model']['dir']}` (image encoder `{desc['model']['image_encoder']}`) "
        f"into {desc['dim']}-d normalised vectors; FAISS `{desc['index']['kind']}` index, inner product = cosine.",
        "",
        f"- `{INDEX_FILE}`: the FAISS index; row i is row i of `{METADATA_FILE}`",
        f"- `{METADATA_FILE}`: image_path, caption, row, dataset index, id, label, concept, style",
        *([f"- `{EMBEDDINGS_FILE}`: the same vectors, float32 ({c['indexed']}, {desc['dim']})"]
          if desc["files"]["embeddings"] else []),
        "- `index.json`: how it was built (model, collection, counts, index parameters, feature store)",
        "",
        "clip-retrieval reads this folder as it is: `clip-retrieval back` as an indice folder (image.index + "
        "metadata/), and `clip-retrieval index` / autofaiss / embedding-reader as embeddings (img_emb/ + metadata/).",
        "",
        "```python",
        "from unialign import AlignedModel",
        "from unialign_serve.index import ImageIndex",
        "index = ImageIndex.load('.')",
        "model = AlignedModel.from_pretrained(index.model_dir)",
        "print(index.search(model.encode(['a red heart'], modality='text'), k=5)[0])",
        "```",
        "",
        "Serve it: `unialign serve --model <model> --index <this folder>`.",
        "",
    ])


# -- load / search ----------------------------------------------------------------------------------
def read_metadata(root: str | Path) -> pa.Table:
    """The metadata of an index folder, read as clip-retrieval reads it: every ``metadata/*.parquet``, in
    sorted order, one table (row i describes index row i)."""
    parts = sorted((Path(root) / "metadata").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in parts])


@dataclass
class Hit:
    row: int
    score: float
    id: str
    path: str
    label: str
    concept: str
    style: str
    caption: str


class ImageIndex:
    """A loaded index folder: ``search(vectors, k)`` -> ranked hits with their metadata."""

    def __init__(self, root: Path, info: dict[str, Any], index: Any, meta: dict[str, list[Any]]):
        self.root, self.info, self.index, self.meta = root, info, index, meta

    @classmethod
    def load(cls, root: str | Path) -> "ImageIndex":
        import faiss

        root = Path(root)
        if not (root / "index.json").exists():
            raise IndexError_(f"{root} is not a unialign index (no index.json); build one with `unialign index`")
        info = read_json(root / "index.json")
        if info.get("format") == "unialign-index/1":
            raise IndexError_(f"{root} is an index in the old layout ({', '.join(OLD_FILES)}); rebuild it with "
                              "`unialign index` (it reads the cached features back instead of re-encoding)")
        if info.get("format") != FORMAT:
            raise IndexError_(f"{root}: unsupported index format {info.get('format')!r} (expected {FORMAT})")
        for f in (INDEX_FILE, METADATA_FILE):
            if not (root / f).exists():
                raise IndexError_(f"{root}: {f} is missing; rebuild the index")
        index = faiss.read_index(str(root / INDEX_FILE))
        meta = read_metadata(root).to_pydict()
        if index.ntotal != len(meta["row"]):
            raise IndexError_(f"{root}: index holds {index.ntotal} vectors but metadata has {len(meta['row'])} rows")
        return cls(root, info, index, meta)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def model_dir(self) -> str | None:
        return self.info.get("model", {}).get("dir")

    def check_model(self, model: Any) -> None:
        """Raise if ``model``'s image side is not the one the index was built with."""
        m = self.info.get("model", {})
        if m.get("image_encoder") and m["image_encoder"] != model.image_encoder.spec:
            raise IndexError_(f"{self.root} was built with image encoder {m['image_encoder']!r}, the model uses "
                              f"{model.image_encoder.spec!r}; rebuild the index with this model")
        if model.embedding_dim != self.dim:
            raise IndexError_(f"{self.root} holds {self.dim}-d vectors, the model embeds into {model.embedding_dim}-d")

    def path(self, row: int) -> str:
        return str(self.meta["image_path"][row])

    def hit(self, row: int, score: float) -> Hit:
        m = self.meta
        return Hit(int(row), float(score), str(m["id"][row]), str(m["image_path"][row]), str(m["label"][row]),
                   str(m["concept"][row]), str(m["style"][row]), str(m["caption"][row]))

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Nearest images by cosine similarity for each query vector (normalised here)."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.shape[1] != self.dim:
            raise IndexError_(f"query vectors have {q.shape[1]} dims, the index {self.dim}")
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores, rows = topk(q, None, max(1, int(k)), index=self.index)
        return [[self.hit(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows.tolist(), scores.tolist())]
