"""The shape of the code: imports flow one way (core <- stages <- pipeline <- server <- CLI), no cycles,
and the lean core loads a model without the training, plotting, serving or Ray dependencies."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["matplotlib", "faiss", "ray", "fastapi", "cairosvg", "pyarrow", "pydantic", "yaml", "typer"]


def _lint(src: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` (import-linter, contracts in pyproject.toml) over the packages under ``src``."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed; run `bash scripts/setup.sh` (installs the dev extra)")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([exe, "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=src.parent,
                          capture_output=True, text=True, env=env, timeout=300)


def test_import_contracts_hold():
    proc = _lint(ROOT / "src")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and proc.stdout.count("KEPT") == 3


def test_an_upward_import_is_caught(tmp_path):
    """The check can fail: a stage importing a later one (data importing the pipeline) breaks the layers."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    records = src / "unialign_train" / "data" / "records.py"
    records.write_text(records.read_text() + "\n\ndef _upward():\n    from ..pipeline import run  # noqa: F401\n")
    proc = _lint(src)
    assert proc.returncode != 0 and "BROKEN" in proc.stdout
    assert "unialign_train.data.records -> unialign_train.pipeline" in proc.stdout


def test_the_lean_core_imports_none_of_the_heavy_extras():
    code = ("import sys, unialign, unialign.model, unialign.openclip, unialign.search, unialign.zeroshot; "
            f"print(sorted(k for k in sys.modules if k.split('.')[0] in {set(HEAVY)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
