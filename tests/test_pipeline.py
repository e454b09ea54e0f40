"""The main job end to end on a real subset: packaged encoders, real emoji, held-out concepts in a
held-out style, Fashion-MNIST zero-shot. Asserts quality well above chance on unseen concepts only.

Data comes from the datasets that `scripts/setup.sh` builds; features are cached under
$UNIALIGN_HOME (keyed by inputs), so a rerun of this test reuses them.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from unialign.config import load_config
from unialign.data import load_dataset
from unialign.model import AlignedModel
from unialign.pipeline import run

N_CONCEPTS = 480


@pytest.fixture(scope="module")
def emoji_subset(tmp_path_factory):
    """A fixed, seeded subset of the real emoji concepts in all four styles, saved as a dataset folder."""
    ds = load_dataset("emoji")
    rng = np.random.default_rng(123)
    keep = sorted(rng.choice(ds.concepts(), size=N_CONCEPTS, replace=False).tolist())
    sub = ds.subset(ds.indices(concepts=keep))
    sub.name = f"emoji-subset{N_CONCEPTS}"
    folder = tmp_path_factory.mktemp("emoji_subset")
    sub.save(folder)
    return folder


def test_main_job_on_a_real_subset(emoji_subset, tmp_path):
    cfg = load_config(overrides={
        "output": str(tmp_path / "run"),
        "data.dataset": str(emoji_subset),
        "data.train_styles": ["google", "twitter", "openmoji"],
        "data.test_styles": ["apple"],
        "encoders.image": "effnet-lite0?image_size=96",
        "eval.fashion_mnist_limit": 1000,
    })
    out = run(cfg, log=lambda s: None)
    recs = {(r["dataset"], r["task"]): r for r in out["records"]}
    zs = recs[("emoji-subset480-test-apple", "zeroshot_classification")]
    assert zs["n_classes"] == 96  # 20% of the concepts, never seen in training, in an unseen style
    assert zs["metrics"]["acc1"] >= 10 * zs["chance"]["acc1"]
    ret = recs[("emoji-subset480-test-apple", "zeroshot_retrieval")]
    for k in ("image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert ret["metrics"][k] >= 5 * ret["chance"][k]
    fm = recs[("fashion-mnist", "zeroshot_classification")]
    assert fm["n_samples"] == 1000 and fm["metrics"]["acc1"] >= 2 * fm["chance"]["acc1"]

    # the saved model reproduces the pipeline's embeddings, and its folder explains itself
    model = AlignedModel.load(tmp_path / "run" / "model")
    assert "zeroshot_classification" in (tmp_path / "run" / "model" / "README.md").read_text()
    ds = load_dataset(str(emoji_subset))
    img = model.encode_image([ds.image_path(0)])
    assert img.shape == (1, model.projection.image.out_dim)
    results = json.loads((tmp_path / "run" / "results" / "fashion-mnist__zeroshot_classification.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(results)


def test_cli_help_and_bad_options():
    help_ = subprocess.run([sys.executable, "-m", "unialign", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "run" in help_.stdout and "extract" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "unialign", "run", "--set", "train.lr=fast"], capture_output=True, text=True)
    assert bad.returncode == 1 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "unialign", "run", "--recipe", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown recipe 'nope'" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "unialign", "extract"], capture_output=True, text=True)
    assert usage.returncode == 2
