"""Training throughput on cached features and time to converge on the default data.

1. pairs/s of the training step (gather from the memory-mapped store, heads forward/backward, AdamW)
   for several batch sizes, no validation, fixed number of steps;
2. the default recipe trained to early stopping on the default protocol: seconds, steps, best step;
3. peak resident memory of this process (features are memory-mapped, so it stays small).

    python3 benchmarks/train_speed.py
"""
from __future__ import annotations

import argparse
import time

from _common import command, markdown, peak_rss_mb, write
from unialign.encoders import load_encoder
from unialign_train.align import fit, get_recipe, make_pairs, train, train_config
from unialign_train.config import load_config
from unialign_train.data import load_dataset, make_splits
from unialign_train.evaluate import validator
from unialign_train.features import cache_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--recipe", default="linear", help="a trained recipe (the default preset is closed-form)")
    args = ap.parse_args()

    cfg = load_config()
    ds = load_dataset(cfg.data.dataset)
    img_enc, txt_enc = load_encoder(cfg.encoders["image"]), load_encoder(cfg.encoders["text"])
    cached = cache_features(ds, {"image": img_enc, "text": txt_enc}, cfg.layers, cfg.extract, log=lambda s: None)
    splits = make_splits(ds, cfg.data)
    pairs = make_pairs(cached, splits.train, "image", "text")
    x, y = cached["image"].features, cached["text"].features
    rss_before = peak_rss_mb()
    base = train_config(get_recipe(args.recipe), {})

    rows, speed = [], {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        tcfg = base.model_copy(update={"batch_size": bs, "max_steps": args.steps, "eval_every": 0, "patience": 0})
        t0 = time.perf_counter()
        res = train(x, y, pairs, tcfg, log=None)
        secs = time.perf_counter() - t0
        speed[bs] = min(bs, len(pairs)) * res.steps / secs
        rows.append([bs, res.steps, f"{secs:.2f}", f"{speed[bs]:.0f}"])
    table1 = markdown(["batch size", "steps", "seconds", "pairs/s"], rows)

    validate = validator(cached, txt_enc, cfg.layers_of("text"), splits.val, "image", cfg.eval.templates)
    t0 = time.perf_counter()
    res = train(x, y, pairs, base, validate, log=None)
    converge = {"seconds": time.perf_counter() - t0, "steps": res.steps, "best_step": res.best_step,
                "best_val_score": res.best_score, "pairs": len(pairs), "parameters": res.parameters}
    table2 = markdown(["recipe", "training pairs", "steps (early stop)", "best step", "seconds to converge",
                       "trainable params", "peak RSS MB (before training / after)"],
                      [[args.recipe, len(pairs), res.steps, res.best_step, f"{converge['seconds']:.1f}", res.parameters,
                        f"{rss_before:.0f} / {peak_rss_mb():.0f}"]])
    # the default preset is training-free: time its fit on the same pairs
    t0 = time.perf_counter()
    info = fit(get_recipe(cfg.recipe), cfg.train, x, y, pairs, ("image", "text"), log=lambda s: None).info
    fit_s = time.perf_counter() - t0
    table2 += "\n\n" + markdown(["default preset", "anchor pairs", "seconds to fit"], [[cfg.recipe, info["n_pairs"], f"{fit_s:.2f}"]])
    converge["default_preset_fit_seconds"] = fit_s
    write("train_speed", {"throughput_pairs_per_s": speed, "converge": converge, "peak_rss_mb_before_training": rss_before,
                          "peak_rss_mb": peak_rss_mb()}, table1 + "\n\n" + table2,
          command("train_speed.py"))


if __name__ == "__main__":
    main()
