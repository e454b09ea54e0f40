"""Bring your own data: a CSV / JSONL / Parquet table of media paths, captions and vector keys, or an
image folder.

Tables are read without pandas (the standard library for CSV and JSONL, pyarrow for Parquet) and are
decoded with ``errors="replace"``: one stray Latin-1 byte in a million captions should cost one odd
character, not the run. Replaced bytes and dropped empty captions are counted in ``dataset.meta`` so
the user can see that something was off.

Column rules (auto-detected when not given, first match wins, case-insensitive):

- image: ``image``, ``image_path``, ``filepath``, ``file_path``, ``path``, ``file``, ``filename``;
  audio: ``audio``, ``audio_path``, ``wav``; video: ``video``, ``video_path``; vector key: ``vector``,
  ``vector_key``. A table needs no media column at all when its vectors come from a ``vectors:``
  encoder keyed by the ``id`` column.
- captions: a ``captions`` or ``caption`` column, else all ``caption_<n>`` / ``caption<n>`` columns, else
  ``text`` or ``title``. A cell may hold one caption or a list (a JSON/Parquet list, or in CSV a cell
  that is a JSON list such as ``["a dog", "a puppy"]``). Several captions can also come from several
  columns (``caption_cols=["title", "alt"]``). Strings are never split on other separators.
- concept: ``concept``, ``class``, ``category``; label: ``label``, ``class_name``, ``name``;
  style: ``style``, ``domain``; id: ``id``.

``concept`` defaults to the label, else the first caption, else the image path (each image its own
concept); ``label`` defaults to the concept. Relative image paths resolve against ``root`` if given, else
the table's folder.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from unialign.errors import DataError
from .records import Dataset

TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

IMAGE_NAMES = ("image", "image_path", "filepath", "file_path", "path", "file", "filename")
AUDIO_NAMES = ("audio", "audio_path", "wav")
VIDEO_NAMES = ("video", "video_path")
VECTOR_NAMES = ("vector", "vector_key")
CAPTION_NAMES = ("captions", "caption")
CAPTION_FALLBACK = ("text", "title")
CONCEPT_NAMES = ("concept", "class", "category")
LABEL_NAMES = ("label", "class_name", "name")
STYLE_NAMES = ("style", "domain")
_NUMBERED_CAPTION = re.compile(r"^captions?_?\d+$", re.IGNORECASE)


def from_table(
    path: str | os.PathLike,
    image_col: str | None = None,
    caption_cols: str | Sequence[str] | None = None,
    concept_col: str | None = None,
    label_col: str | None = None,
    style_col: str | None = None,
    root: str | os.PathLike | None = None,
    audio_col: str | None = None,
    video_col: str | None = None,
    vector_col: str | None = None,
) -> Dataset:
    """Read a CSV, JSONL or Parquet table of (media paths, captions, vector key, ...) rows into a Dataset.

    Errors name the file, the missing column and the columns that exist; a row without a media path
    names its row number (1-based, header not counted). Media files must exist.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: table file not found")
    rows, columns, replaced = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: the table has no rows")

    def pick(given: str | None, names: Sequence[str], what: str) -> str | None:
        if given is not None:
            if given not in columns:
                raise DataError(f"{path}: {what} column {given!r} not found; columns are {columns}")
            return given
        lower = {c.lower(): c for c in columns}
        return next((lower[n] for n in names if n in lower), None)

    media = {m: c for m, c in (("image", pick(image_col, IMAGE_NAMES, "image")),
                               ("audio", pick(audio_col, AUDIO_NAMES, "audio")),
                               ("video", pick(video_col, VIDEO_NAMES, "video"))) if c is not None}
    vector_c = pick(vector_col, VECTOR_NAMES, "vector")
    concept_c = pick(concept_col, CONCEPT_NAMES, "concept")
    label_c = pick(label_col, LABEL_NAMES, "label")
    style_c = pick(style_col, STYLE_NAMES, "style")
    id_c = next((c for c in columns if c.lower() == "id"), None)
    if not media and vector_c is None and id_c is None:
        raise DataError(f"{path}: no media column (image: {list(IMAGE_NAMES)}, audio: {list(AUDIO_NAMES)}, video: "
                        f"{list(VIDEO_NAMES)}), no vector key column ({list(VECTOR_NAMES)}) and no id column; columns "
                        f"are {columns}. Pass image_col=... (or audio_col/video_col/vector_col) to name one.")
    cap_cs = _caption_columns(path, columns, caption_cols)
    if not cap_cs and concept_c is None and label_c is None:
        raise DataError(f"{path}: no caption column (looked for {list(CAPTION_NAMES)}, caption_<n>, "
                        f"{list(CAPTION_FALLBACK)}) and no concept/label column; columns are {columns}. "
                        "Pass caption_cols=[...].")
    used = {*media.values(), vector_c, concept_c, label_c, style_c, id_c, *cap_cs}

    base = Path(root) if root is not None else path.parent
    records: list[dict[str, Any]] = []
    dropped = 0
    missing_files: list[str] = []
    for n, row in enumerate(rows, start=1):
        files = {m: _text(row.get(c)) for m, c in media.items()}
        for m, f in files.items():
            if not f:
                raise DataError(f"{path}: row {n} has no {m} path in column {media[m]!r}")
        caps: list[str] = []
        for c in cap_cs:
            for cap in _as_list(row.get(c)):
                cap = _text(cap)
                if cap:
                    caps.append(cap)
                else:
                    dropped += 1
        label = _text(row.get(label_c)) if label_c else ""
        rid = (_text(row.get(id_c)) if id_c else "") or str(n)
        first_file = next(iter(files.values()), "")
        concept = (_text(row.get(concept_c)) if concept_c else "") or label or (caps[0] if caps else first_file or rid)
        rec: dict[str, Any] = {"id": rid, **files, "text": list(dict.fromkeys(caps)), "concept": concept,
                               "label": label or concept, "style": _text(row.get(style_c)) if style_c else ""}
        if vector_c is not None and _text(row.get(vector_c)):
            rec["vector"] = _text(row.get(vector_c))
        for c in columns:  # extra columns, as text so mixed-type JSON values still save to Parquet
            if c not in used and c not in rec:
                v = row.get(c)
                rec[c] = None if v is None else v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        for f in files.values():
            p = Path(f)
            if not (p if p.is_absolute() else base / p).is_file():
                missing_files.append(f)
        records.append(rec)

    if missing_files:
        raise DataError(f"{path}: {len(missing_files)} of {len(rows)} media file(s) not found (relative paths "
                        f"resolve against {base}), e.g. {missing_files[:3]}")
    counts = Counter(r["id"] for r in records)
    if len(counts) != len(records):
        dup = next(i for i, k in counts.items() if k > 1)
        raise DataError(f"{path}: id {dup!r} appears more than once in column {id_c!r}")
    meta = {"source": str(path), "dropped_captions": dropped, "replaced_bytes": replaced}
    return Dataset(path.stem, records, base.resolve(), None, meta)


def from_image_folder(path: str | os.PathLike) -> Dataset:
    """An ImageFolder-style tree: ``<path>/<class>/**/<image>``; classes are the subfolder names, sorted.

    ``concept`` is the folder name (so ``classes.index(concept)`` works), ``label`` the same with
    underscores as spaces (it reads better in prompts), ``text`` = ``["a photo of a <label>"]``,
    ``target`` the class index. Hidden files and folders are ignored; classes without images are left out.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder")
    records: list[dict[str, Any]] = []
    classes: list[str] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(sub).parts))
        if not files:
            continue
        name, label = sub.name, sub.name.replace("_", " ").strip()
        for f in files:
            rel = f.relative_to(path).as_posix()
            records.append({"id": rel, "image": rel, "text": [f"a photo of a {label}"], "concept": name,
                            "label": label, "style": "", "target": len(classes)})
        classes.append(name)
    if not records:
        raise DataError(f"{path}: no class subfolders with images ({', '.join(IMAGE_SUFFIXES)}) found; expected "
                        "<folder>/<class name>/<image files>")
    return Dataset(path.name or "images", records, path.resolve(), classes, {"source": str(path)})


# -- reading ----------------------------------------------------------------------------------------
def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    """Rows as dicts, the column names in file order, and how many undecodable bytes were replaced."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported table type {suffix!r}; use one of {list(TABLE_SUFFIXES)}")
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    text = text.removeprefix("\ufeff")  # BOM written by Excel
    if suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            columns = [c for c in (reader.fieldnames or [])]
            rows = [{k: v for k, v in r.items() if k is not None} for r in reader]
        except csv.Error as e:
            raise DataError(f"{path}: not a valid CSV file ({e})") from None
        return rows, columns, replaced
    rows, columns = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {n} is not a JSON object")
        columns.update(dict.fromkeys(obj))
        rows.append(obj)
    return rows, list(columns), replaced


def _read_parquet(path: Path) -> tuple[list[dict[str, Any]], list[str], int]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    rows = table.to_pylist()
    replaced = 0

    def fix(v: Any) -> Any:  # binary columns: decode like the text formats do
        nonlocal replaced
        if isinstance(v, bytes):
            s = v.decode("utf-8", errors="replace")
            replaced += s.count("\ufffd") - v.decode("utf-8", errors="ignore").count("\ufffd")
            return s
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    rows = [{k: fix(v) for k, v in r.items()} for r in rows]
    return rows, list(table.column_names), replaced


def _caption_columns(path: Path, columns: list[str], given: str | Sequence[str] | None) -> list[str]:
    if given is not None:
        given = [given] if isinstance(given, str) else list(given)
        missing = [c for c in given if c not in columns]
        if missing:
            raise DataError(f"{path}: caption column(s) {missing} not found; columns are {columns}")
        return given
    lower = {c.lower(): c for c in columns}
    for n in CAPTION_NAMES:
        if n in lower:
            return [lower[n]]
    numbered = [c for c in columns if _NUMBERED_CAPTION.match(c)]
    if numbered:
        return numbered
    return next(([lower[n]] for n in CAPTION_FALLBACK if n in lower), [])


def _as_list(v: Any) -> list[Any]:
    """A cell as a list of captions: lists stay lists; a CSV cell holding a JSON list is parsed."""
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            parsed = json.loads(v)
            if isinstance(parsed, list):
                return parsed
        except json.JSONDecodeError:
            pass
    return [v]


def _text(v: Any) -> str:
    """A cell as stripped text; None / NaN / empty become ''."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v).strip()


__all__ = ["from_table", "from_image_folder", "TABLE_SUFFIXES", "IMAGE_SUFFIXES"]
