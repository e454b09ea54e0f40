"""Helpers of the fault suite (tests/test_faults.py): deterministic kill points, CLI runners and a
generated corpus of bad inputs."""
from __future__ import annotations

import functools
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import traceback
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# Prepended to a child script: every atomic write of unialign ticks a counter when its temporary file
# is created, just before and just after its rename; the child SIGKILLs itself at tick FAULT_KILL_AT
# (and at every training step, when the script calls ``tick_steps()``). So kill points are seeded,
# reproducible and land mid-write, between a shard's files, between a file and its record, ...
KILL_PRELUDE = r'''
import os, signal, sys, tempfile
import torch
torch.set_num_threads(1)
_KILL_AT = int(os.environ.get("FAULT_KILL_AT", "0"))
_n = [0]
def tick():
    _n[0] += 1
    if _n[0] == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
_mkstemp, _replace = tempfile.mkstemp, os.replace
def _mk(*a, **k):
    r = _mkstemp(*a, **k); tick(); return r
def _rep(a, b):
    tick(); _replace(a, b); tick()
tempfile.mkstemp, os.replace = _mk, _rep
def tick_steps():
    step = torch.optim.AdamW.step
    def counted(self, *a, **k):
        out = step(self, *a, **k); tick(); return out
    torch.optim.AdamW.step = counted
from tiny import register_tiny
register_tiny()
'''


# The children are forked from a forkserver: an interpreter of its own (not the test process) that has
# imported torch and the stages once, so each of the ~40 killed children of a test run starts in
# milliseconds instead of the ~3 s of a fresh interpreter's imports. Each child is still a process of its
# own that SIGKILLs itself mid-write; the server never runs a tensor operation, so no thread pool is
# forked half-initialised. torch._dynamo is imported by the first optimizer a child makes (about 3 s).
PRELOAD = ["torch", "torch._dynamo", "numpy", "PIL.Image", "pytest", "tiny", "unialign_train.features",
           "unialign_train.align.loop", "unialign_train.data.records", "unialign_serve.index", "unialign.encoders"]


@functools.cache
def _forkserver() -> Any:
    """The forkserver context, its server started with ``ENV`` (one OpenMP/MKL thread from the start, as
    the libraries read those variables when they load)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(ENV)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return context


def _child_main(code: str, env: dict[str, str], errors: str) -> None:
    """In the child: the test's environment, then the script; a traceback goes to ``errors``."""
    os.environ.clear()
    os.environ.update(env)
    try:
        exec(compile(code, "<fault child>", "exec"), {"__name__": "__main__"})
    except BaseException:
        Path(errors).write_text(traceback.format_exc())
        raise


def run_child(body: str, kill_at: int = 0, timeout: float = 300) -> int:
    """Run ``KILL_PRELUDE + body`` in a child process; its exit code (-9 when it killed itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        errors = os.path.join(tmp, "traceback.txt")
        child = _forkserver().Process(target=_child_main,
                                      args=(KILL_PRELUDE + body, {**ENV, "FAULT_KILL_AT": str(kill_at)}, errors))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise AssertionError(f"child still running after {timeout} s")
        if child.exitcode not in (0, -9):
            text = Path(errors).read_text() if os.path.exists(errors) else "(no traceback)"
            raise AssertionError(f"child failed ({child.exitcode}):\n{text[-3000:]}")
        return child.exitcode


def run_cli(*args: str, tiny: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python3 -m unialign ARGS``; with ``tiny`` the same entry point (``unialign_cli.main.main``) in a
    process that first registers the tiny test encoders (``tiny-image``, ``tiny-text``)."""
    if tiny:
        code = ("import sys; from tiny import register_tiny; register_tiny(); from unialign_cli.main import main; "
                f"sys.argv = ['unialign', *{list(args)!r}]; main()")
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "unialign", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


PROGRESS = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 1) -> str:
    """Exit ``code``, no traceback, exactly one non-empty line on stderr holding every needle."""
    # progress bars (tqdm, on stderr) are not messages: drop their carriage-return-separated frames
    err = "\n".join(f for f in re.split(r"[\r\n]", proc.stderr) if not PROGRESS.search(f))
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {err[-3000:]}"
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path (temporary files included: none may be left)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- bad inputs --------------------------------------------------------------------------------------
def _png(im: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels (a few hundred bytes; never decodable)."""
    data = _png(Image.new("L", (1, 1)))
    ihdr = data.index(b"IHDR")
    import struct
    import zlib

    body = b"IHDR" + struct.pack(">II", width, height) + data[ihdr + 12 : ihdr + 17]
    return data[: ihdr - 4] + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + data[ihdr + 21 :]


RED = (200, 30, 30)


def image_corpus(folder: Path) -> dict[str, tuple[str, str]]:
    """Write the bad-and-odd image corpus; name -> (relative path, expected: "ok" or a skip reason).

    "ok" images must be encoded *as the plain RGB image they show* (checked against ``expected_rgb``)."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[str, str]] = {}

    def put(name: str, rel: str, data: bytes | None, expect: str) -> None:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            p.write_bytes(data)
        out[name] = (rel, expect)

    rgb = Image.new("RGB", (12, 12), RED)
    good_png = _png(rgb)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    good_jpg = buf.getvalue()
    put("plain", "plain.png", good_png, "ok")
    put("zero-byte", "zero.png", b"", "file is empty")
    put("truncated-png", "trunc.png", good_png[:40], "not a readable image")
    put("truncated-jpeg", "trunc.jpg", good_jpg[: len(good_jpg) // 2], "not a readable image")
    put("text-as-png", "text.png", b"this is not an image\n", "not a readable image")
    (folder / "dir.jpg").mkdir(exist_ok=True)
    put("directory-as-jpg", "dir.jpg", None, "is a directory")
    put("bomb", "bomb.png", bomb_png(), "too large")
    put("missing", "missing.png", None, "does not exist")
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG", quality=95)
    put("cmyk", "cmyk.jpg", buf.getvalue(), "ok")
    gray16 = Image.fromarray(np.full((12, 12), 65535 * 128 // 255, dtype=np.uint16))
    put("16-bit", "gray16.png", _png(gray16), "ok")
    put("palette", "palette.png", _png(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)), "ok")
    put("grayscale", "gray.png", _png(Image.new("L", (12, 12), 128)), "ok")
    rgba = Image.new("RGBA", (12, 12), (*RED, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 12, 6))  # top half fully transparent: white once composited
    put("alpha", "alpha.png", _png(rgba), "ok")
    tall = Image.new("RGB", (6, 12), RED)
    tall.paste((0, 0, 255), (0, 0, 6, 6))  # stored sideways; EXIF orientation 6 turns it
    exif = Image.Exif()
    exif[0x0112] = 6
    put("exif-rotated", "exif.png", _png(tall.transpose(Image.Transpose.ROTATE_90), exif=exif), "ok")
    put("unicode-and-space-path", "ünï cødé 日本/a b.png", good_png, "ok")
    return out


def expected_rgb(name: str) -> Image.Image:
    """What an "ok" corpus image must decode to."""
    if name in ("16-bit", "grayscale"):
        return Image.new("RGB", (12, 12), (128, 128, 128))
    if name == "alpha":
        im = Image.new("RGB", (12, 12), RED)
        im.paste((255, 255, 255), (0, 0, 12, 6))
        return im
    if name == "exif-rotated":
        im = Image.new("RGB", (6, 12), RED)
        im.paste((0, 0, 255), (0, 0, 6, 6))
        return im
    return Image.new("RGB", (12, 12), RED)
