"""Emoji in several vendor styles, built from npm packages: the project's main offline image-text set.

Why emoji: every concept is drawn by several vendors (Google, Twitter, Apple, Facebook, OpenMoji), so we
can split by concept (test concepts unseen in training) and by style (held-out vendor = domain shift),
and each emoji comes with real text (Unicode name, CLDR annotation and tags, subcategory).

Sources (fetched with ``npm pack`` into :func:`unialign.paths.downloads_dir`, never into the repo, since
Apple and Facebook images are not licensed for redistribution):

- ``emoji-datasource-<vendor>@16.0.0``: ``package/emoji.json`` and 64 px PNGs ``package/img/<vendor>/64/``.
- ``openmoji@17.0.0``: ``package/data/openmoji.json`` (annotations, tags) and colour SVGs, which we
  rasterise with cairosvg. Always fetched (4 MB) because its annotations make the best captions/labels.

Layout under the output folder (default ``datasets_dir()/"emoji"``)::

    src/emoji.json, src/openmoji.json      metadata extracted from the tarballs
    svg/openmoji/<code>.svg                 OpenMoji SVGs for the base emoji
    img/<style>-<size>/<code>.png           one image per base emoji and style (RGBA, alpha kept)
    records.parquet, dataset.json           the saved Dataset

Every file is written atomically and each image folder gets a ``.complete`` marker once filled, so an
interrupted build resumes where it stopped and a finished one loads in milliseconds.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from unialign import paths
from unialign.errors import ConfigError, DataError
from unialign.io import atomic_path, read_json, write_bytes
from unialign.progress import progress

from .records import Dataset

EMOJI_DATASOURCE_VERSION = "16.0.0"
OPENMOJI_VERSION = "17.0.0"
VENDORS = ("google", "twitter", "apple", "facebook")
STYLES = VENDORS + ("openmoji",)
VENDOR_PNG_SIZE = 64  # the size of the PNGs inside emoji-datasource-<vendor>
DEFAULT_STYLES = ("google", "twitter", "apple", "openmoji")
RECORDS_FORMAT = 2  # records carry modality fields (``text``); older saved datasets are rebuilt
# The emoji protocol: train and validate on three drawing styles, test on a fourth that no training
# image shows (a domain shift), recorded in the dataset so the split needs no name check.
PROTOCOL = {"train_styles": ["google", "twitter", "openmoji"], "test_styles": ["apple"]}


def build_emoji(
    styles: Sequence[str] = DEFAULT_STYLES,
    size: int = 64,
    root: str | os.PathLike | None = None,
    force: bool = False,
) -> Dataset:
    """Build (or load, if already built with the same styles and size) the multi-style emoji set.

    Concepts are the base emoji of ``emoji.json`` (skin-tone variants excluded) that have an image in
    *every* requested style, so each concept appears once per style and style comparisons are fair.
    One record per (concept, style): ``id`` ``"<code>/<style>"``, ``concept`` the lowercase unified code
    (``"1f600"``), ``label`` the OpenMoji annotation (``"grinning face"``), ``text`` (captions) the Unicode name,
    the annotation, ``"annotation: tags"`` and the subcategory. Extra columns: category, subcategory.

    ``root`` is the output folder (default ``datasets_dir()/"emoji"``); ``force`` re-extracts and
    re-rasterises everything (downloaded tarballs are kept: delete them to fetch again).
    """
    styles = _check_styles(styles)
    if not isinstance(size, int) or size < 8 or size > 1024:
        raise ConfigError(f"emoji size must be an integer between 8 and 1024, got {size!r}")
    out = Path(root) if root is not None else paths.datasets_dir() / "emoji"
    if not force and (out / "dataset.json").exists():
        ds = Dataset.load(out)
        if (ds.meta.get("styles") == list(styles) and ds.meta.get("size") == size
                and ds.meta.get("records_format") == RECORDS_FORMAT):
            return ds

    vendors = [s for s in styles if s in VENDORS]
    dl = paths.downloads_dir()
    tarballs = {v: npm_pack(f"emoji-datasource-{v}@{EMOJI_DATASOURCE_VERSION}", dl) for v in vendors or ["google"]}
    om_tarball = npm_pack(f"openmoji@{OPENMOJI_VERSION}", dl)

    # Metadata: emoji.json is the same in every vendor package; take it from the first one fetched.
    src = out / "src"
    _extract_members(next(iter(tarballs.values())), {"package/emoji.json": src / "emoji.json"}, force, "emoji.json")
    _extract_members(om_tarball, {"package/data/openmoji.json": src / "openmoji.json"}, force, "openmoji.json")
    for f in ("emoji.json", "openmoji.json"):
        if not (src / f).exists():
            raise DataError(f"{f} is missing from the npm package; delete {dl} and run again")
    entries = sorted(read_json(src / "emoji.json"), key=lambda e: e.get("sort_order", 0))
    openmoji = openmoji_index(read_json(src / "openmoji.json"))

    available: dict[str, set[str]] = {}
    for style in styles:
        folder = out / "img" / f"{style}-{size}"
        if style == "openmoji":
            _build_openmoji(om_tarball, entries, openmoji, out, folder, size, force)
        else:
            _build_vendor(tarballs[style], style, entries, folder, size, force)
        available[style] = {p.stem for p in folder.glob("*.png")}

    records = make_records(entries, openmoji, styles, available, size)
    if not records:
        raise DataError(f"no emoji has an image in all of the styles {list(styles)}")
    protocol = {k: [x for x in v if x in styles] for k, v in PROTOCOL.items()}
    meta = {"styles": list(styles), "size": size, "n_concepts": len(records) // len(styles),
            "records_format": RECORDS_FORMAT,
            "protocol": protocol if all(protocol.values()) else {},
            "sources": {"emoji-datasource": EMOJI_DATASOURCE_VERSION, "openmoji": OPENMOJI_VERSION}}
    # root "." is stored relative, so the dataset still loads if the cache folder moves.
    Dataset("emoji", records, Path("."), None, meta).save(out)
    return Dataset.load(out)


# -- pure parsing (tested without any download) ------------------------------------------------------
def strip_fe0f(hexcode: str) -> str:
    """OpenMoji drops the emoji variation selector FE0F from file names; emoji.json keeps it."""
    return "-".join(p for p in hexcode.upper().split("-") if p and p != "FE0F")


def openmoji_index(openmoji: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """OpenMoji entries keyed by FE0F-stripped uppercase hex code (first entry wins)."""
    index: dict[str, dict[str, Any]] = {}
    for r in openmoji:
        index.setdefault(strip_fe0f(str(r.get("hexcode", ""))), r)
    return index


def concept_code(entry: dict[str, Any]) -> str:
    """The concept id: emoji.json's unified code in lowercase (``"1f600"``, ``"263a-fe0f"``)."""
    return str(entry["unified"]).lower()


def emoji_captions(entry: dict[str, Any], om: dict[str, Any] | None) -> list[str]:
    """Unicode name, OpenMoji annotation, ``"annotation: tags"``, subcategory; deduplicated, no empties."""
    ann = str((om or {}).get("annotation") or "").strip()
    tags = str((om or {}).get("tags") or "").strip()
    caps = [
        str(entry.get("name") or "").strip().lower(),
        ann,
        f"{ann}: {tags}" if ann and tags else "",
        str(entry.get("subcategory") or "").replace("-", " ").strip(),
    ]
    return [c for c in dict.fromkeys(caps) if c]


def emoji_label(entry: dict[str, Any], om: dict[str, Any] | None) -> str:
    """A clean lowercase name for prompts: the CLDR annotation, else the Unicode name."""
    ann = str((om or {}).get("annotation") or "").strip()
    return (ann or str(entry.get("name") or entry["unified"])).lower()


def make_records(
    entries: list[dict[str, Any]],
    openmoji: dict[str, dict[str, Any]],
    styles: Sequence[str],
    available: dict[str, set[str]],
    size: int,
) -> list[dict[str, Any]]:
    """One record per (concept, style) for the base emoji that have an image in every style."""
    records = []
    for e in entries:
        code = concept_code(e)
        if not all(code in available[s] for s in styles):
            continue
        om = openmoji.get(strip_fe0f(e["unified"]))
        caps, label = emoji_captions(e, om), emoji_label(e, om)
        for s in styles:
            records.append({"id": f"{code}/{s}", "image": f"img/{s}-{size}/{code}.png", "text": caps,
                            "concept": code, "label": label, "style": s,
                            "category": e.get("category") or "", "subcategory": e.get("subcategory") or ""})
    return records


# -- fetching and extraction ---------------------------------------------------------------------------
def npm_pack(spec: str, dest: Path) -> Path:
    """Download an npm package tarball (``name@version``) into ``dest`` unless it is already there.

    npm writes into a temporary folder that is renamed into place, so an interrupted download never
    leaves a truncated tarball under the final name.
    """
    name, version = spec.rsplit("@", 1)
    tarball = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"  # npm's own file name for scoped packages
    if tarball.exists():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(f"npm is needed to fetch {spec} (install Node.js/npm, e.g. `apt-get install npm`, "
                        "or run scripts/setup.sh)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".npm-") as tmp:
        try:
            proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True,
                                  timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"`npm pack {spec}` could not run: {e}") from None
        produced = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not produced:
            tail = (proc.stderr or proc.stdout).strip()[-800:]
            raise DataError(f"`npm pack {spec}` failed (exit {proc.returncode}): {tail}")
        os.replace(produced[0], tarball)
    return tarball


def _open_tar(tarball: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{tarball} is not a readable tarball ({e}); delete it and run again") from None


def _extract_members(tarball: Path, wanted: dict[str, Path], force: bool, desc: str,
                     transform: Callable[[bytes], bytes] | None = None) -> None:
    """Stream through ``tarball`` once, writing each wanted member to its path (atomically).

    Only members whose output is missing (or all, with ``force``) are written; ``transform`` may turn
    the member's bytes into the bytes to write (e.g. resize a PNG).
    """
    todo = {m: p for m, p in wanted.items() if force or not p.exists()}
    if not todo:
        return
    with _open_tar(tarball) as tf, progress(total=len(todo), desc=desc, unit="file", leave=False,
                                            disable=len(todo) < 50) as bar:
        try:
            for member in tf:
                out = todo.get(member.name)
                if out is None or not member.isfile():
                    continue
                fh = tf.extractfile(member)
                data = fh.read() if fh is not None else b""
                write_bytes(out, transform(data) if transform else data)
                bar.update()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{tarball} is damaged ({e}); delete it and run again") from None


def _resize_png(size: int) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    return run


def _build_vendor(tarball: Path, vendor: str, entries: list[dict[str, Any]], folder: Path, size: int,
                  force: bool) -> None:
    """Extract the 64 px PNG of every base emoji the vendor draws (resized when ``size`` != 64)."""
    marker = folder / ".complete"
    if marker.exists() and not force:
        return
    prefix = f"package/img/{vendor}/{VENDOR_PNG_SIZE}/"
    wanted = {prefix + e["image"]: folder / f"{concept_code(e)}.png" for e in entries if e.get("image")}
    transform = None if size == VENDOR_PNG_SIZE else _resize_png(size)
    folder.mkdir(parents=True, exist_ok=True)
    _extract_members(tarball, wanted, force, f"{vendor} png", transform)
    write_bytes(marker, b"")


def _build_openmoji(tarball: Path, entries: list[dict[str, Any]], openmoji: dict[str, dict[str, Any]],
                    out: Path, folder: Path, size: int, force: bool) -> None:
    """Extract the colour SVG of each base emoji and rasterise it to ``size`` px (in parallel)."""
    marker = folder / ".complete"
    if marker.exists() and not force:
        return
    svg_dir = out / "svg" / "openmoji"
    wanted: dict[str, Path] = {}
    for e in entries:
        om = openmoji.get(strip_fe0f(e["unified"]))
        if om is not None:
            wanted[f"package/color/svg/{om['hexcode']}.svg"] = svg_dir / f"{concept_code(e)}.svg"
    _extract_members(tarball, wanted, force, "openmoji svg")
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(svg), str(folder / f"{svg.stem}.png"), size) for svg in wanted.values()
            if svg.exists() and (force or not (folder / f"{svg.stem}.png").exists())]
    failures: list[str] = []
    bar = progress(total=len(jobs), desc="openmoji rasterise", unit="svg", leave=False, disable=len(jobs) < 50)
    with bar:
        if len(jobs) >= 200 and (os.cpu_count() or 1) > 1:
            # ~2 ms per SVG: worth a pool for the full set, not for a handful.
            with Pool(min(os.cpu_count() or 1, 8)) as pool:
                for err in pool.imap_unordered(_rasterise, jobs, chunksize=32):
                    failures += [err] if err else []
                    bar.update()
        else:
            for job in jobs:
                err = _rasterise(job)
                failures += [err] if err else []
                bar.update()
    if failures:  # a broken SVG drops that concept instead of failing the whole build
        bar.write(f"unialign: {len(failures)} OpenMoji SVG(s) could not be rasterised, e.g. {failures[0]}")
    write_bytes(marker, b"")


def _rasterise(job: tuple[str, str, int]) -> str | None:
    """SVG -> size x size RGBA PNG (alpha kept; load_image puts it on white). Returns an error or None."""
    import cairosvg  # imported here: a C-library binding only this step needs

    svg, png, size = job
    try:
        with atomic_path(png) as tmp:
            cairosvg.svg2png(url=svg, write_to=str(tmp), output_width=size, output_height=size)
    except Exception as e:  # cairosvg raises assorted types on bad SVGs
        return f"{svg}: {type(e).__name__}: {e}"
    return None


def _check_styles(styles: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(styles, str):
        styles = [styles]
    out = tuple(dict.fromkeys(str(s).lower() for s in styles))
    bad = [s for s in out if s not in STYLES]
    if bad or not out:
        raise ConfigError(f"emoji styles must be a non-empty subset of {list(STYLES)}, got {list(styles)}")
    return out


__all__ = ["build_emoji", "make_records", "emoji_captions", "emoji_label", "openmoji_index", "strip_fe0f",
           "npm_pack", "STYLES", "VENDORS", "DEFAULT_STYLES"]
