"""HTTP API and web page for an aligned model (and, optionally, an image index built with it).

``create_app(model_dir, index_dir=None, limits=Limits())`` builds the FastAPI app; ``unialign serve``
runs it with uvicorn on 127.0.0.1 by default. The model and index are loaded when the app is built,
so a wrong folder fails at startup with one clear message, not at the first request.

The OpenAPI schema states every rule a request is checked against (lengths, counts, ranges, the
patterns of texts, labels and templates), so a client or a fuzzer that follows the schema is only
refused for what a schema cannot say: a file that is not a readable image, empty ones included (415),
an image over the pixel limit or a body over the byte limit (413), an unknown image row or a search
without an index (404), a ``/match`` to a model without a match calibration (409). Every refusal is a 4xx listed in the route's ``responses`` with one JSON body,
``{"error": "<what is wrong>", "status": <code>}``: 400 for a body that cannot be parsed (malformed
multipart, JSON that is not UTF-8), 405 (with ``Allow``) for a method a path does not take, 422 for a
field that breaks the schema.
"""
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, List, Optional

import numpy as np
from fastapi import Body, FastAPI, File, Form, HTTPException, Path as PathParam, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field, StringConstraints, WithJsonSchema
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
    max_text_chars: int = 1000  # length of one text, query or templates field; x max_labels: of the labels field

    def __post_init__(self) -> None:
        if not 1 <= self.max_labels <= 1000:  # the labels pattern holds one copy per label; regex sizes are capped
            raise UnialignError(f"max_labels must be 1 to 1000, got {self.max_labels}")


# -- the rules of a request, as they appear in the schema ---------------------------------------------
# Unicode White_Space as code point ranges: the one meaning of "blank" for the schema's patterns and the
# handlers' stripping. Spelled out because regex engines disagree on `\s` (Python's adds U+001C..U+001F,
# JavaScript's U+FEFF, schemathesis reads patterns with re.ASCII), and pydantic (Rust regex), clients
# and fuzzers must all agree on which texts are blank.
_SPACE_RANGES = ((0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                 (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))
SPACE = "".join(chr(c) for lo, hi in _SPACE_RANGES for c in range(lo, hi + 1))  # for str.strip
_SPACE_CLASS = "".join(f"\\u{lo:04x}" + (f"-\\u{hi:04x}" if hi > lo else "") for lo, hi in _SPACE_RANGES)
NONBLANK = f"[^{_SPACE_CLASS}]"  # a pattern: the text holds a character that is not white space

# What an uploaded image may be, declared as the multipart encoding of each file part (the decoder is PIL's).
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")

# A file part is `format: binary` as well as OpenAPI 3.1's `contentMediaType`, so that 3.0 tools see a file
# too (schemathesis then sends real image samples first). Whether the bytes are an image, empty ones
# included, no schema can say: that is the 415. FastAPI writes the schema of a lone file parameter itself
# (``BINARY`` is added to it) and leaves a list's items to pydantic (``ImageFile``).
BINARY = {"format": "binary"}
ImageFile = Annotated[UploadFile, WithJsonSchema({"type": "string", "contentMediaType": "application/octet-stream",
                                                   **BINARY})]


def labels_pattern(max_labels: int) -> str:
    """1 to ``max_labels`` labels separated by commas or newlines, none blank; one separator may end the list
    (a textarea's last newline). JSON Schema cannot count the parts of a string otherwise."""
    label = f"[{_SPACE_CLASS}]*[^,\\n{_SPACE_CLASS}][^,\\n]*"
    return f"^{label}(?:[,\\n]{label}){{0,{max_labels - 1}}}[,\\n]?[{_SPACE_CLASS}]*$"


def templates_pattern(names: Iterable[str]) -> str:
    """A template set's name, or templates separated by ``|``, each holding ``{}`` once and no other brace
    (any other brace would break ``str.format``); blank means the default set."""
    template = "[^{}|]*\\{\\}[^{}|]*"
    named = "|".join(re.escape(n) for n in sorted(names))
    return f"^[{_SPACE_CLASS}]*(?:{named}|{template}(?:\\|{template})*)?[{_SPACE_CLASS}]*$"


def split_labels(value: str) -> list[str]:
    """The distinct labels of a ``labels`` field that matched :func:`labels_pattern`, in order."""
    return list(dict.fromkeys(l for l in (part.strip(SPACE) for part in re.split("[,\n]", value)) if l))


def split_templates(value: str, default: str = "emoji") -> str | list[str]:
    """A ``templates`` field that matched :func:`templates_pattern` -> a set name or a list of templates."""
    spec = value.strip(SPACE) or default
    return [t.strip(SPACE) for t in spec.split("|")] if "{}" in spec else spec


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


class MatchScore(BaseModel):
    text: str = Field(description="A text, as given (surrounding white space removed).")
    probability: float = Field(description="Calibrated probability that the image and this text match.")


class MatchOut(BaseModel):
    filename: str = Field(description="Name of the uploaded file.")
    calibration: dict = Field(description="How probabilities are made: P(match) = sigmoid(a * cosine + b), with a "
                                          "and b fitted on validation pairs (and what they were fitted on).")
    texts: List[MatchScore] = Field(description="One entry per text, in the order given.")


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


# What each 4xx means, for the ``responses`` of every route that can answer it (all with :class:`ErrorOut`).
ERRORS: dict[int, str] = {
    400: "The request body could not be parsed (malformed multipart/form-data, or JSON that is not UTF-8).",
    404: "Not found.",
    409: "The model has no match calibration; fit one with `unialign fuse consistency --save-calibration`.",
    413: "The request body or an uploaded file is over the byte limit, or an uploaded image over the pixel limit.",
    415: "An uploaded file is not a readable image.",
    422: "A field is missing or breaks a rule of the schema; the message names the field and the rule.",
}


def _errors(*codes: int, not_found: str | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` entries of a route's 4xx answers; ``not_found`` says what a 404 means there."""
    text = {**ERRORS, **({404: not_found} if not_found else {})}
    return {c: {"model": ErrorOut, "description": text[c]} for c in sorted(codes)}


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


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

    def match_texts(image: Image.Image, texts: list[str]) -> np.ndarray:
        with lock:
            return model.match([image], texts)

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

    # -- input checks the schema cannot state ---------------------------------------------------
    async def read_image(upload: UploadFile) -> Image.Image:
        name = upload.filename or "upload"
        data = await upload.read(limits.max_upload_bytes + 1)
        if len(data) > limits.max_upload_bytes:
            raise _error(413, f"{name}: file is larger than the upload limit of {limits.max_upload_bytes} bytes")
        return decode_image(data, name, limits.max_image_pixels)

    def need_index() -> Any:
        if index is None:
            raise _error(404, "this server was started without an image index; restart it with "
                              "`unialign serve --model ... --index <folder built by unialign index>`")
        return index

    def hits_out(hits: list[Any]) -> list[SearchHit]:
        return [SearchHit(rank=i + 1, score=round(h.score, 6), row=h.row, id=h.id, label=h.label, style=h.style,
                          url=f"/images/{h.row}") for i, h in enumerate(hits)]

    # -- the rules of each field (pydantic checks them; the schema shows them) ---------------------
    text_rule = {"min_length": 1, "max_length": limits.max_text_chars, "pattern": NONBLANK}
    labels_re, templates_re = labels_pattern(limits.max_labels), templates_pattern(TEMPLATES)
    pattern_help = {  # pydantic would quote the pattern; say the rule instead
        NONBLANK: "is blank; give some text",
        labels_re: f"give 1 to {limits.max_labels} labels separated by commas or newlines, none of them blank",
        templates_re: (f"give a template set ({', '.join(sorted(TEMPLATES))}) or templates separated by '|', "
                       "each holding '{}' once and no other brace"),
    }

    def k_param() -> Any:  # a fresh parameter per route: FastAPI keeps state on the object it is given
        return Query(min(12, limits.max_k), ge=1, le=limits.max_k, description=f"Number of results, 1 to {limits.max_k}.")

    images_encoding = {"requestBody": {"content": {"multipart/form-data": {
        "encoding": {"file": {"contentType": ", ".join(IMAGE_TYPES)}}}}}}
    no_index = "No image index loaded (the server was started without --index)."

    # -- app ----------------------------------------------------------------------------------
    app = FastAPI(
        title="unialign",
        version="1",
        description=(
            "Embed texts and images into the shared space of an aligned model (two frozen unimodal encoders "
            "joined by trained projectors), classify an image zero-shot against labels you choose, check whether "
            "texts match an image (calibrated probabilities), and search an image index by text or by image. Errors come back as `{\"error\": ..., \"status\": ...}` with a "
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
        return _error_response(exc.status_code, detail, exc.headers)  # a 405 carries its Allow header

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
            elif e.get("type") == "string_pattern_mismatch":
                msg = pattern_help.get((e.get("ctx") or {}).get("pattern"), msg)
            parts.append(f"{where} {field}: {msg}".replace("  ", " ").replace(" :", ":"))
        return _error_response(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(UnialignError)
    async def _unialign_error(request: Request, exc: UnialignError) -> JSONResponse:
        return _error_response(422, str(exc))

    @app.get("/health", response_model=HealthOut, responses=_errors(413), summary="Is the server up; what does it serve",
             description="Model folder and encoders, the index (if any) and the request limits.")
    def health() -> HealthOut:
        idx = None
        if index is not None:
            idx = {"dir": str(index.root), "size": len(index), "kind": index.info.get("index", {}).get("kind"),
                   "collection": index.info.get("collection", {}).get("spec")}
        return HealthOut(status="ok", index=idx, limits=asdict(limits),
                         model={"dir": str(model_path), "image_encoder": model.image_encoder.spec,
                                "text_encoder": model.text_encoder.spec, "dim": dim})

    @app.post("/embed/text", response_model=EmbeddingsOut, responses=_errors(400, 413, 422),
              summary="Embed texts", description=f"A JSON list of 1 to {limits.max_batch} non-blank strings of at most "
                                                 f"{limits.max_text_chars} characters -> one normalised embedding "
                                                 "each, in order.")
    def embed_text(texts: List[Annotated[str, StringConstraints(**text_rule)]] = Body(
            ..., min_length=1, max_length=limits.max_batch, description="The texts to embed.",
            examples=[["a red heart", "a rocket"]])) -> EmbeddingsOut:
        emb = embed_texts([t.strip(SPACE) for t in texts])
        return EmbeddingsOut(dim=emb.shape[1], count=len(emb), embeddings=emb.round(6).tolist())

    @app.post("/embed/image", response_model=EmbeddingsOut, responses=_errors(400, 413, 415, 422),
              openapi_extra=images_encoding, summary="Embed images",
              description=f"Upload 1 to {limits.max_batch} images as multipart field `file` (repeat the field for "
                          "several) -> one normalised embedding each.")
    async def embed_image(file: List[ImageFile] = File(
            ..., min_length=1, max_length=limits.max_batch,
            description="One or more image files (PNG, JPEG, WebP, GIF, BMP).")) -> EmbeddingsOut:
        images = [await read_image(f) for f in file]
        emb = await _run(embed_images, images)
        return EmbeddingsOut(dim=emb.shape[1], count=len(emb), embeddings=emb.round(6).tolist())

    @app.post("/classify", response_model=ClassifyOut, responses=_errors(400, 413, 415, 422),
              openapi_extra=images_encoding, summary="Classify an image zero-shot against your labels",
              description="Upload an image and give candidate labels; each label is put through the prompt templates, "
                          "and all labels come back ranked by probability.")
    async def classify(
        file: UploadFile = File(..., json_schema_extra=BINARY, description="The image to classify."),
        labels: str = Form(..., pattern=labels_re, max_length=limits.max_labels * limits.max_text_chars,
                           description=f"1 to {limits.max_labels} candidate labels separated by commas or newlines, "
                                       "none blank (repeats count once), e.g. `cat face, rocket, red heart`."),
        templates: str = Form("", pattern=templates_re, max_length=limits.max_text_chars,  # a form has no null
                              description="A template set name (" + ", ".join(sorted(TEMPLATES)) +
                              "; blank or absent: `emoji`) or templates separated by `|`, each holding `{}` once "
                              "and no other brace."),
    ) -> ClassifyOut:
        names, temps = split_labels(labels), get_templates(split_templates(templates))
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

    @app.post("/match", response_model=MatchOut, responses=_errors(400, 409, 413, 415, 422),
              openapi_extra=images_encoding, summary="Does an image match each of your texts",
              description=f"Upload an image and give 1 to {limits.max_batch} texts (repeat the field); for each text, "
                          "the calibrated probability that it matches the image (a caption swapped for another "
                          "concept's, or a colour or gender word changed, scores low).")
    async def match(
        file: UploadFile = File(..., json_schema_extra=BINARY, description="The image."),
        texts: List[Annotated[str, StringConstraints(**text_rule)]] = Form(
            ..., min_length=1, max_length=limits.max_batch, description="The texts to check against the image."),
    ) -> MatchOut:
        calibration = model.info.get("match")
        if not calibration:
            raise _error(409, ERRORS[409])
        image = await read_image(file)
        given = [t.strip(SPACE) for t in texts]
        probs = await _run(match_texts, image, given)
        return MatchOut(filename=file.filename or "upload", calibration=calibration,
                        texts=[MatchScore(text=t, probability=round(float(p), 6)) for t, p in zip(given, probs)])

    @app.get("/search", response_model=SearchOut, responses=_errors(404, 413, 422, not_found=no_index),
             summary="Search the index by text", description="The text query's embedding against every indexed image; "
                                                             "the k most similar images, with URLs to fetch them.")
    def search(q: str = Query(..., **text_rule, description="What to look for, e.g. `a red heart`."),
               k: int = k_param()) -> SearchOut:
        query = q.strip(SPACE)
        idx = need_index()
        hits = idx.search(embed_query(query)[None], k)[0]
        return SearchOut(query=query, k=k, results=hits_out(hits))

    @app.post("/search/image", response_model=SearchOut, openapi_extra=images_encoding,
              responses=_errors(400, 404, 413, 415, 422, not_found=no_index),
              summary="Search the index by image", description="Upload an image; the k most similar indexed images.")
    async def search_image(file: UploadFile = File(..., json_schema_extra=BINARY, description="The query image."),
                           k: int = k_param()) -> SearchOut:
        idx = need_index()
        image = await read_image(file)
        emb = await _run(embed_images, [image])
        hits = idx.search(emb, k)[0]
        return SearchOut(query=file.filename or "upload", k=k, results=hits_out(hits))

    @app.get("/images/{row}", summary="An indexed image", response_class=FileResponse,
             responses={200: {"description": "The image file.", "content": {"image/*": {}}},
                        **_errors(404, 413, 422, not_found="No index loaded, no such row, or its file is gone.")},
             description="The image file of one index row (the `url` of a search result).")
    def image(row: int = PathParam(ge=0, description="Row of the image in the index (a search hit's `row`).")) -> FileResponse:
        idx = need_index()
        if row >= len(idx):
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
