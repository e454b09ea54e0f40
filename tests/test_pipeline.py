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


def test_main_job_on_a_real_subset(tmp_path):
    """The default job with less training data (one training style instead of three) and 1000
    Fashion-MNIST test images; features are shared with `unialign run` through the store cache."""
    cfg = load_config(overrides={
        "output": str(tmp_path / "run"),
        "data.train_styles": ["google"],
        "data.test_styles": ["apple"],
        "eval.fashion_mnist_limit": 1000,
    })
    out = run(cfg, log=lambda s: None)
    recs = {(r["dataset"], r["task"]): r for r in out["records"]}
    zs = recs[("emoji-test-apple", "zeroshot_classification")]
    assert zs["n_classes"] > 300  # 20% of the concepts, never seen in training, in an unseen style
    assert zs["metrics"]["acc1"] >= 10 * zs["chance"]["acc1"]
    ret = recs[("emoji-test-apple", "zeroshot_retrieval")]
    for k in ("image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert ret["metrics"][k] >= 5 * ret["chance"][k]
    fm = recs[("fashion-mnist", "zeroshot_classification")]
    assert fm["n_samples"] == 1000 and fm["metrics"]["acc1"] >= 2 * fm["chance"]["acc1"]

    # the saved model reproduces the pipeline's numbers from raw images, and its folder explains itself
    model_dir = tmp_path / "run" / "model"
    model = AlignedModel.load(model_dir)
    assert "zeroshot_classification" in (model_dir / "README.md").read_text()
    ds = load_dataset("emoji")
    idx = ds.indices(styles=["apple"])[:4]
    from unialign.pipeline import cache_features

    cached = cache_features(ds, model.image_encoder, None, cfg, log=lambda s: None)
    from_store = model.project_image_features(cached.image[cached.image_row[idx]]).numpy()
    from_images = model.encode_image([ds.image_path(i) for i in idx])
    assert np.allclose(from_store, from_images, atol=2e-2)  # the store keeps fp16 features
    results = json.loads((tmp_path / "run" / "results" / "fashion-mnist__zeroshot_classification.json").read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(results)


def test_cli_help_and_bad_options():
    help_ = subprocess.run([sys.executable, "-m", "unialign", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "run" in help_.stdout and "extract" in help_.stdout
    bad = subprocess.run([sys.executable, "-m", "unialign", "run", "--set", "train.lr=fast"], capture_output=True, text=True)
    assert bad.returncode == 1 and "train.lr" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "unialign", "run", "--recipe", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "recipe" in bad.stderr and "'nope'" in bad.stderr and "asif" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "unialign", "extract"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_fashion_mnist_eval_set_is_the_balanced_limit():
    """`unialign run` and `unialign report` score the same Fashion-MNIST images (report used to take all 10k)."""
    from unialign.pipeline import fashion_mnist_eval_set

    sub = fashion_mnist_eval_set(load_config(overrides={"eval.fashion_mnist_limit": 50}))
    assert len(sub) == 50 and sorted(set(sub.concepts())) == sorted(set(sub.column("concept")))
    counts = np.unique(sub.column("concept"), return_counts=True)[1]
    assert len(counts) == 10 and set(counts) == {5}
    assert len(fashion_mnist_eval_set(load_config(overrides={"eval.fashion_mnist_limit": None}))) == 10000
