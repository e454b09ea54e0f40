"""The real CLIP_benchmark (1.6.2) command line on a unialign model.

CLIP_benchmark needs a torchvision that cannot load beside this environment's CPU torch, so it runs
in the side environment ``scripts/clip_benchmark_env.sh`` builds (and caches under $UNIALIGN_HOME);
the main environment stays importable. ``unialign benchmark`` there registers the ``unialign`` model
type in CB's own registry, exports the run's evaluation sets with CB's own converter and calls CB's
own CLI; the files it writes must carry the names ``unialign eval`` gives its own results and the
same numbers, and ``clip_benchmark build`` must read both folders.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_without_clip_benchmark_says_how_to_get_it(tmp_path):
    """In an environment where CB does not import, one line says why and how to build one where it does."""
    try:
        import clip_benchmark.cli  # noqa: F401
        pytest.skip("clip_benchmark imports in this environment")
    except Exception:
        pass
    r = subprocess.run([sys.executable, "-m", "unialign", "benchmark", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "scripts/clip_benchmark_env.sh" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _decisions(record: dict, metric: str) -> int:
    """How many yes/no decisions a metric averages (images for classification and text retrieval,
    captions for image retrieval): one flipped near-tie moves it by 1 / this."""
    if record["task"] == "zeroshot_classification":
        return int(record["n_samples"])
    return int(record["n_text"] if metric.startswith("image_") else record["n_image"])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the side environment's first build (about 3 GB of wheels) plus three CB runs
def test_real_clip_benchmark_cli_matches_unialign_eval(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    venv = subprocess.run(["bash", str(ROOT / "scripts" / "clip_benchmark_env.sh")], capture_output=True, text=True,
                          env=env, timeout=1800)
    assert venv.returncode == 0, venv.stderr[-3000:]
    side_python = Path(venv.stdout.strip().splitlines()[-1]) / "bin" / "python"

    # a default run (closed-form recipe, packaged encoders, cached features); Fashion-MNIST cut to 500 images
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "unialign", "run", "--output", str(run),
                        "--set", "eval.zero_shot_sets.fashion-mnist.limit=500"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cb"
    r = subprocess.run([str(side_python), "-m", "unialign", "benchmark", str(run), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])

    cb_files = sorted(out.glob("*.json"))
    mine = {p.name: json.loads(p.read_text()) for p in (run / "results").glob("*.json")}
    assert [p.name for p in cb_files] == sorted(mine)  # CB's own file names = unialign eval's
    assert len(cb_files) == 3  # emoji held-out classification + retrieval, Fashion-MNIST classification
    for p in cb_files:
        cb = json.loads(p.read_text())
        ours = mine[p.name]
        assert (cb["task"], cb["model"], cb["pretrained"]) == (ours["task"], ours["model"], ours["pretrained"])
        assert cb["dataset"] == "wds/" + ours["dataset"]
        assert set(cb["metrics"]) == set(ours["metrics"]), p.name
        for metric, value in cb["metrics"].items():
            # two computations (CB encodes live in its own torch; unialign reads cached features): equal up
            # to one decision flipped by float rounding at a near-tie; both values are float32 means, each
            # within float32's 2**-24 of its exact fraction, so a flip can read up to ~1.2e-7 over 1/decisions
            assert abs(value - ours["metrics"][metric]) <= 1 / _decisions(ours, metric) + 2 ** -22, (p.name, metric)
        assert ours["metrics"]["acc1" if "acc1" in ours["metrics"] else "image_retrieval_recall@10"] > 3 * \
            ours["chance"]["acc1" if "acc1" in ours["chance"] else "image_retrieval_recall@10"]

    # CB's `build` (its CSV summary) reads both folders
    tables = []
    for files, name in ((cb_files, "cb.csv"), (sorted((run / "results").glob("*.json")), "unialign.csv")):
        r = subprocess.run([str(side_python.parent / "clip_benchmark"), "build", *map(str, files), "--output",
                            str(tmp_path / name)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        with open(tmp_path / name) as f:
            tables.append(list(csv.DictReader(f)))
    assert [len(t) for t in tables] == [3, 3]
    assert all("acc1" in t[0] or "image_retrieval_recall@1" in t[0] for t in tables)
