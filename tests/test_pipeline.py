"""The main job end to end on real data: packaged encoders, real emoji, held-out concepts in a held-out
style, Fashion-MNIST zero-shot. Asserts quality well above chance on unseen concepts only.

Data comes from the datasets that `scripts/setup.sh` builds; features are cached under
$UNIALIGN_HOME (keyed by inputs), so a rerun of these tests reuses them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from unialign.model import AlignedModel
from unialign_train.config import load_config
from unialign_train.data import load_dataset
from unialign_train.evaluate import zero_shot_set
from unialign_train.pipeline import run


@pytest.mark.slow
def test_main_job_on_a_real_subset(tmp_path):
    """The default job with less training data (one training style instead of three) and 1000
    Fashion-MNIST test images; features are shared with `unialign run` through the store cache."""
    cfg = load_config(overrides={
        "output": str(tmp_path / "run"),
        "data.train_styles": ["google"],
        "data.test_styles": ["apple"],
        "eval.zero_shot_sets.fashion-mnist.limit": 1000,
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
    model = AlignedModel.from_pretrained(model_dir)
    assert "zeroshot_classification" in (model_dir / "README.md").read_text()
    ds = load_dataset("emoji")
    idx = ds.indices(styles=["apple"])[:4]
    store_feats = model.encoders["image"].encode([ds.path(int(i)) for i in idx], layers=model.layers["image"])
    from_images = model.encode([ds.path(int(i)) for i in idx], "image", normalize_embeddings=True)
    from_store = model.project("image", np.asarray(store_feats, dtype=np.float16))  # the store keeps float16
    np.testing.assert_allclose(from_store.numpy(), from_images, atol=2e-2)
    results = json.loads(next((tmp_path / "run" / "results").glob("fashion-mnist_*zeroshot_classification.json")).read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(results)


def test_cli_help_is_fast_and_bad_options_are_one_line():
    t0 = time.perf_counter()
    help_ = subprocess.run([sys.executable, "-m", "unialign", "--help"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    assert help_.returncode == 0 and "run" in help_.stdout and "extract" in help_.stdout
    assert seconds < 5  # about 0.5 s; generous for a loaded CI machine, far below the 4.6 s of importing torch
    cmd = subprocess.run([sys.executable, "-c", "import sys, unialign_cli.main; print(sorted(m for m in sys.modules "
                          "if m.split('.')[0] in {'torch', 'pyarrow', 'numpy', 'transformers'}))"],
                         capture_output=True, text=True)
    assert cmd.stdout.strip() == "[]"  # the help path imports none of the heavy libraries
    bad = subprocess.run([sys.executable, "-m", "unialign", "run", "--set", "train.k=fast"], capture_output=True, text=True)
    assert bad.returncode == 1 and "train.k" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "unialign", "run", "--recipe", "nope"], capture_output=True, text=True)
    assert bad.returncode == 1 and "recipe" in bad.stderr and "'nope'" in bad.stderr and "asif" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "unialign", "extract"], capture_output=True, text=True)
    assert usage.returncode == 2


def test_zero_shot_set_limit_is_a_balanced_seeded_subset():
    """`unialign run` and `unialign report` score the same Fashion-MNIST images: a class-balanced limit."""
    zs = load_config(overrides={"eval.zero_shot_sets.fashion-mnist.limit": 50}).eval.zero_shot_sets["fashion-mnist"]
    sub = zero_shot_set(zs)
    counts = dict(zip(*np.unique(sub.column("concept"), return_counts=True)))
    assert len(sub) == 50 and len(counts) == 10 and set(counts.values()) == {5}
    assert sub.column("id") == zero_shot_set(zs).column("id")  # seeded: the same images every time
    full = zero_shot_set(load_config().eval.zero_shot_sets["fashion-mnist"])
    assert len(full) == 10000 and set(sub.column("id")) < set(full.column("id"))
