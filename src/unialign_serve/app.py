"""HTTP API and web page for an aligned model (and, optionally, an image index built with it).

``create_app(model_dir, index_dir=None, limits=Limits())`` builds the FastAPI app; ``unialign serve``
runs it with uvicorn on 127.0.0.1 by default. The model and index are loaded when the app is built,
so a wrong folder fails at startup with one clear message, not at the first request.

Every bad input is answered with a 4xx and a JSON body ``{"error": "<what is wrong>", "status": <code>}``:
413 for an upload over the byte limit or an image over the pixel limit, 415 for a file that is not a
readable image, 422 for a malformed or out-of-range field (empty query, ``k`` too big, too many texts
or labels), 404 for an unknown image or a search on a server started without an index.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import numpy as np
from fastapi import Body, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from unialign.errors import UnialignError

STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is refused with a 4xx naming the limit."""

    max_upload_bytes: int = 8 * 1024 * 1024  # whole request body and each uploaded file
    max_image_pixels: int = 4096 * 4096  # width x height of one uploaded image
    max_batch: int = 64  # texts in /embed/text, images in /embed/image
    max_k: int = 100  # results of a search
    max_labels: int = 200  # candidate labels of /classify
    max_text_chars: int = 1000  # length of one text, query or label


# -- response schemas (they make the OpenAPI page self-explanatory) ----------------------------------
class ErrorOut(BaseModel):
    error: str = Field(description="What is wrong with the request, in one sentence.")
    status: int = Field(description="The HTTP status code, repeated.")


class EmbeddingsOut(BaseModel):
    dim: int = Field(description="Dimension of the shared embedding space.")
    count: int = Field(description="Number of embeddings returned (one per input, in input order).")
    embeddings: List[List[float]] = Field(description="L2-normalised embeddings; dot products are cosine similarities.")


class LabelScore(BaseModel):
    label: str = Field(description="A candidate label, as given.")
    score: float = Field(description="Probability (softmax over the labels at the model's logit scale).")
    similarity: float = Field(description="Cosine similarity between the image and the label's text embedding.")


class ClassifyOut(BaseModel):
    filename: str = Field(description="Name of the uploaded file.")
    templates: List[str] = Field(description="Prompt templates each label was put through (embeddings averaged).")
    labels: List[LabelScore] = Field(description="All candidate labels, best first.")


class SearchHit(BaseModel):
    rank: int = Field(description="1 for the best match.")
    score: float = Field(description="Cosine similarity between the query and the image.")
    row: int = Field(description="Row of the image in the index.")
    id: str = Field(description="Item id in the indexed collection.")
    label: str = Field(description="The item's label in the collection (may be empty).")
    style: str = Field(description="The item's style / domain in the collection (may be empty).")
    url: str = Field(description="URL of the image, served by this app.")


class SearchOut(BaseModel):
    query: str = Field(description="The text query, or the uploaded file's name for an image query.")
    k: int = Field(description="Number of results asked for.")
    results: List[SearchHit] = Field(description="Nearest images, best first.")


class HealthOut(BaseModel):
    status: str = Field(description='"ok" when the model (and index, if any) are loaded.')
    model: dict = Field(description="Model folder and encoder specs.")
    index: Optional[dict] = Field(description="Index folder, size and kind; null when served without an index.")
    limits: dict = Field(description="Request limits of this server.")


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class _LRU:
    """A small thread-safe least-recently-used cache of computed embeddings."""

    def __init__(self, size: int = 512):
        self.size, self.data, self.lock = size, OrderedDict(), threading.Lock()

    def peek(self, key: Any) -> Any:
        """The cached value or None, without computing it; a hit counts as a use."""
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
            return self.data.get(key)

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.data:
                self.data.move_to_end(key)
                return self.data[key]
        value = make()
        with self.lock:
            self.data[key] = value
            while len(self.data) > self.size:
                self.data.popitem(last=False)
        return value


class _BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, whether it declares its
    length (refused before reading) or streams it (refused as soon as the count passes the limit)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        msg = f"request body is larger than the upload limit of {limit} bytes ({limit / 2**20:.1f} MiB)"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = _error_response(413, msg)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(status_code=413, detail=msg)
            return message

        return await self.app(scope, counted, send)


# -- the app -----------------------------------------------------------------------------------------
def create_app(model_dir: str | Path, index_dir: str | Path | None = None, limits: Limits | None = None,
               device: str | None = None) -> FastAPI:
    """Load the model (and index) and build the app. Raises :class:`UnialignError` with a clear message
    for a missing or invalid model or index folder, or an index built with another model."""
    from unialign.model import AlignedModel
    from unialign.zeroshot import TEMPLATES, get_templates

    from .index import ImageIndex

    limits = limits or Limits()
    model_path = Path(model_dir).expanduser()
    if not model_path.exists():
        raise UnialignError(f"model folder {model_path} does not exist (pass the folder a model was saved to, "
                            "e.g. runs/default/model)")
    if not model_path.is_dir():
        raise UnialignError(f"model folder {model_path} is a file, not a saved unialign model folder")
    model = AlignedModel.from_pretrained(model_path, device=device)
    index = None
    if index_dir is not None:
        ipath = Path(index_dir).expanduser()
        if not ipath.exists():
            raise UnialignError(f"index folder {ipath} does not exist (build one with `unialign index`)")
        index = ImageIndex.load(ipath)
        index.check_model(model)
    dim = model.embedding_dim
    lock = threading.Lock()  # encoders (HF tokenizers, torch modules) are not made for concurrent calls
    text_cache, class_cache = _LRU(2048), _LRU(8192)

    def embed_texts(texts: list[str]) -> np.ndarray:
        with lock:
            return np.asarray(model.encode(texts, "text", batch_size=64, normalize_embeddings=True), dtype=np.float32)

    def embed_query(text: str) -> np.ndarray:
        return text_cache.get(text, lambda: embed_texts([text])[0])

    def embed_images(images: list[Image.Image]) -> np.ndarray:
        with lock:
            return np.asarray(model.encode(images, "image", batch_size=32, normalize_embeddings=True), dtype=np.float32)

    def class_weights(labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        """One classifier row per label, cached per (label, templates): label sets overlap across requests."""
        rows = {l: class_cache.peek((l, templates)) for l in labels}
        missing = [l for l, row in rows.items() if row is None]
        if missing:
            with lock:
                new = model.class_embeddings(missing, list(templates)).numpy().astype(np.float32)
            for l, row in zip(missing, new):
                rows[l] = class_cache.get((l, templates), lambda row=row: row)
        return np.stack([rows[l] for l in labels])

    # -- input checks --------------------------------------------------------------------------
    def check_text(value: str, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _error(422, f"{what} is empty; give some text")
        if len(value) > limits.max_text_chars:
            raise _error(422, f"{what} has {len(value)} characters; the limit is {limits.max_text_chars}")
        return value.strip()

    async def read_image(upload: UploadFile) -> Image.Image:
        name = upload.filename or "upload"
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise _error(413, f"{name}: file is larger than the upload limit of {limits.max_upload_bytes} bytes")
        if not data:
            raise _error(422, f"{name}: file is empty (0 bytes)")
        return decode_image(data, name, limits.max_image_pixels)

    def need_index() -> Any:
        if index is None:
            raise _error(404, "this server was started without an image index; restart it with "
                              "`unialign serve --model ... --index <folder built by unialign index>`")
        return index

    def hits_out(hits: list[Any]) -> list[SearchHit]:
        return [SearchHit(rank=i + 1, score=round(h.score, 6), row=h.row, id=h.id, label=h.label, style=h.style,
                          url=f"/images/{h.row}") for i, h in enumerate(hits)]

    # -- app ----------------------------------------------------------------------------------
    app = FastAPI(
        title="unialign",
        version="1",
        description=(
            "Embed texts and images into the shared space of an aligned model (two frozen unimodal encoders "
            "joined by trained projectors), classify an image zero-shot against labels you choose, and search "
            "an image index by text or by image. Errors come back as `{\"error\": ..., \"status\": ...}` with a "
            f"4xx status. Limits: request body {limits.max_upload_bytes} bytes, image {limits.max_image_pixels} "
            f"pixels, batch {limits.max_batch}, k {limits.max_k}, labels {limits.max_labels}, "
            f"text {limits.max_text_chars} characters."
        ),
    )
    app.add_middleware(_BodyLimit, limit=limits.max_upload_bytes)
    app.state.model, app.state.index, app.state.limits = model, index, limits

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path} (see /docs)"
        return _error_response(exc.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ())]
            where = {"query": "query parameter", "body": "body", "path": "path parameter",
                     "header": "header"}.get(loc[0], loc[0]) if loc else "request"
            field = ".".join(loc[1:])
            msg = e.get("msg", "invalid")
            if e.get("type") == "missing":
                msg = "is required"
            parts.append(f"{where} {field}: {msg}".replace("  ", " ").replace(" :", ":"))
        return _error_response(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(UnialignError)
    async def _unialign_error(request: Request, exc: UnialignError) -> JSONResponse:
        return _error_response(422, str(exc))

    errors = {413: {"model": ErrorOut, "description": "Upload or image over a limit."},
              415: {"model": ErrorOut, "description": "The file is not a readable image."},
              422: {"model": ErrorOut, "description": "A field is missing, empty or out of range."}}

    @app.get("/health", response_model=HealthOut, summary="Is the server up; what does it serve",
             description="Model folder and encoders, the index (if any) and the request limits.")
    def health() -> HealthOut:
        idx = None
        if index is not None:
            idx = {"dir": str(index.root), "size": len(index), "kind": index.info.get("index", {}).get("kind"),
                   "collection": index.info.get("collection", {}).get("spec")}
        return HealthOut(status="ok", index=idx, limits=asdict(limits),
                         model={"dir": str(model_path), "image_encoder": model.image_encoder.spec,
                                "text_encoder": model.text_encoder.spec, "dim": dim})

    @app.post("/embed/text", response_model=EmbeddingsOut, responses={422: errors[422]},
              summary="Embed texts", description=f"A JSON list of 1 to {limits.max_batch} non-empty strings -> "
                                                 "one normalised embedding each, in order.")
    def embed_text(texts: List[str] = Body(..., description="The texts to embed.", examples=[["a red heart", "a rocket"]])) -> EmbeddingsOut:
        if not texts:
            raise _error(422, "the list of texts is empty; send a JSON list of 1 or more strings")
        if len(texts) > limits.max_batch:
            raise _error(422, f"{len(texts)} texts sent; the batch limit is {limits.max_batch}")
        texts = [check_text(t, f"text {i}") for i, t in enumerate(texts)]
        emb = embed_texts(texts)
        return EmbeddingsOut(dim=emb.shape[1], count=len(emb), embeddings=emb.round(6).tolist())

    @app.post("/embed/image", response_model=EmbeddingsOut, responses={k: errors[k] for k in (413, 415, 422)},
              summary="Embed images", description=f"Upload 1 to {limits.max_batch} images as multipart field `file` "
                                                  "(repeat the field for several) -> one normalised embedding each.")
    async def embed_image(file: List[UploadFile] = File(..., description="One or more image files (PNG, JPEG, WebP, GIF, ...).")) -> EmbeddingsOut:
        if len(file) > limits.max_batch:
            raise _error(422, f"{len(file)} images sent; the batch limit is {limits.max_batch}")
        images = [await read_image(f) for f in file]
        emb = await _run(embed_images, images)
        return EmbeddingsOut(dim=emb.shape[1], count=len(emb), embeddings=emb.round(6).tolist())

    @app.post("/classify", response_model=ClassifyOut, responses={k: errors[k] for k in (413, 415, 422)},
              summary="Classify an image zero-shot against your labels",
              description="Upload an image and give candidate labels; each label is put through the prompt templates, "
                          "and all labels come back ranked by probability.")
    async def classify(
        file: UploadFile = File(..., description="The image to classify."),
        labels: str = Form(..., description="Candidate labels, comma- or newline-separated, e.g. `cat face, rocket, red heart`."),
        templates: Optional[str] = Form(None, description="A template set name (" + ", ".join(sorted(TEMPLATES)) +
                                        "; default `emoji`) or templates each holding one `{}`, separated by `|`."),
    ) -> ClassifyOut:
        names = [l.strip() for l in labels.replace("\n", ",").split(",")]
        names = list(dict.fromkeys(n for n in names if n))
        if not names:
            raise _error(422, "no labels given; send candidate labels separated by commas, e.g. 'cat, dog, rocket'")
        if len(names) > limits.max_labels:
            raise _error(422, f"{len(names)} labels given; the limit is {limits.max_labels}")
        for n in names:
            check_text(n, f"label {n[:40]!r}")
        spec = (templates or "").strip() or "emoji"
        try:
            temps = get_templates(spec if "{}" not in spec and "|" not in spec else [t.strip() for t in spec.split("|") if t.strip()])
        except ValueError as e:
            raise _error(422, f"templates: {e}") from None
        image = await read_image(file)
        weights = await _run(class_weights, tuple(names), tuple(temps))
        emb = (await _run(embed_images, [image]))[0]
        sims = weights @ emb
        logits = float(model.logit_scale.exp()) * sims
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        return ClassifyOut(filename=file.filename or "upload", templates=temps,
                           labels=[LabelScore(label=names[j], score=round(float(probs[j]), 6),
                                              similarity=round(float(sims[j]), 6)) for j in order])

    @app.get("/search", response_model=SearchOut, responses={404: {"model": ErrorOut, "description": "No index loaded."},
                                                             422: errors[422]},
             summary="Search the index by text", description="The text query's embedding against every indexed image; "
                                                             "the k most similar images, with URLs to fetch them.")
    def search(q: str = Query(..., description="What to look for, e.g. `a red heart`.", max_length=limits.max_text_chars),
               k: int = Query(12, ge=1, le=limits.max_k, description=f"Number of results, 1 to {limits.max_k}.")) -> SearchOut:
        query = check_text(q, "query q")
        idx = need_index()
        hits = idx.search(embed_query(query)[None], k)[0]
        return SearchOut(query=query, k=k, results=hits_out(hits))

    @app.post("/search/image", response_model=SearchOut,
              responses={404: {"model": ErrorOut, "description": "No index loaded."}, **{c: errors[c] for c in (413, 415, 422)}},
              summary="Search the index by image", description="Upload an image; the k most similar indexed images.")
    async def search_image(file: UploadFile = File(..., description="The query image."),
                           k: int = Query(12, ge=1, le=limits.max_k, description=f"Number of results, 1 to {limits.max_k}.")) -> SearchOut:
        idx = need_index()
        image = await read_image(file)
        emb = await _run(embed_images, [image])
        hits = idx.search(emb, k)[0]
        return SearchOut(query=file.filename or "upload", k=k, results=hits_out(hits))

    @app.get("/images/{row}", summary="An indexed image", response_class=FileResponse,
             responses={404: {"model": ErrorOut, "description": "No such row, or its file is gone."}},
             description="The image file of one index row (the `url` of a search result).")
    def image(row: int) -> FileResponse:
        idx = need_index()
        if not 0 <= row < len(idx):
            raise _error(404, f"no image at row {row}; the index has rows 0 to {len(idx) - 1}")
        path = Path(idx.path(row))
        if not path.is_file():
            raise _error(404, f"the image file of row {row} is no longer at {path}")
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    page_html = (STATIC / "index.html").read_text(encoding="utf-8")  # read once, not per request

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(page_html)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking model work in the thread pool so the event loop keeps serving."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def decode_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image (:func:`unialign.media.load_image`), or a 4xx: 413 too many pixels, 415 not an image."""
    from unialign.errors import ImageLoadError
    from unialign.media import load_image

    try:
        return load_image(data, max_pixels=max_pixels, name=name)
    except ImageLoadError as e:
        if e.too_large:
            raise _error(413, str(e)) from None
        raise _error(415, f"{e}; upload a PNG, JPEG, WebP, GIF or BMP file") from None
