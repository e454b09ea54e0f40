"""Does fusing two frozen encoders beat the best single one? And can a pair's consistency be checked?

Fusion tasks (``unialign fuse train``): predict the emoji's category (10 classes) or subcategory (99) from
its image (EfficientNet-Lite0, 128 px) and its caption (all-MiniLM-L6-v2; the longest caption that does
not name the target). The default protocol of ``unialign run``: concepts split 70/10/20 (split seed 0),
training and early stopping on google + twitter + openmoji, test on the unseen concepts in the unseen
apple style. Every method family of ``unialign_train.fuse.run`` (unimodal heads, late fusion, concat-MLP,
Manager, Bridge, LegoBlocks, LegoMerge, LegoFuse) with the same settings (``FuseConfig`` defaults), each
scored with both modalities and with each one hidden, over ``--seeds`` training seeds.

Consistency (``unialign fuse consistency``): the manipulated pairs of the same protocol
(``build_manipulated``, seed 0), the zero-shot detector on ``--model`` (calibrated on the validation
concepts' pairs, in memory: the model folder is not changed) and HAMMER-lite per seed.

Training runs on one torch thread (``--threads``): on this project's 2-core machines, shared with other
work, two threads ran the fusion steps 2-4x slower.

    python3 benchmarks/fusion.py                                   # both fusion tasks and consistency, 5 seeds
    python3 benchmarks/fusion.py --tasks category --seeds 2 --methods late,concat
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _common import command, write
from unialign.model import AlignedModel
from unialign_train.config import load_config
from unialign_train.fuse import (METHODS, FuseConfig, consistency_by_type, consistency_table, fusion_table,
                                 load_fusion_data, load_pairs, run_consistency, run_methods)

TASKS = ("category", "subcategory", "consistency")


def fusion_task(target: str, methods: list[str], seeds: int, cfg: FuseConfig, argv: list[str]) -> None:
    run = load_config()
    data = load_fusion_data(run.data.dataset, target, "classification", run.data, {m: run.encoders[m] for m in run.align},
                            run.extract, device="cpu")
    rows = []
    for seed in range(seeds):
        rows += run_methods(data, methods, cfg.model_copy(update={"seed": seed}))
        table = fusion_table(rows)
        parts = {k: int(len(v)) for k, v in data.parts.items()}
        write(f"fusion_{target}", {"target": target, "classes": len(data.target.classes), "parts": parts,
                                   "seeds": seed + 1, "config": cfg.model_dump(), "rows": rows},
              f"Task: emoji {target} ({len(data.target.classes)} classes), {parts['test']} test records (unseen "
              f"concepts, unseen apple style); {seed + 1} seed(s), mean +- std.\n\n{table}", command("fusion.py", argv))


def consistency_task(model_dir: str, seeds: int, cfg: FuseConfig, argv: list[str]) -> None:
    run = load_config()
    model = AlignedModel.from_pretrained(model_dir, device="cpu")
    pairs, cached = load_pairs(model, run.data.dataset, run.data, run.encoders, run.extract, device="cpu")
    result = run_consistency(model, pairs, cached, list(range(seeds)), cfg, calibrate=True)
    test_counts = {k: int((pairs.kind[pairs.parts["test"]] == k).sum()) for k in ("real", "text_swap", "attribute_swap",
                                                                                 "image_swap")}
    tables = (f"Test pairs (unseen concepts, apple style): {test_counts}; HAMMER-lite: {seeds} seed(s), mean +- std.\n\n"
              + consistency_table(result["results"]) + "\n\n" + consistency_by_type(result["results"]))
    write("consistency", {"model": model_dir, "match_calibration": model.info.get("match"), "test_counts": test_counts,
                          "config": cfg.model_dump(), **result}, tables, command("fusion.py", argv))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {', '.join(TASKS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"fusion method families: {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--model", default="runs/default/model", help="aligned model of the zero-shot detector")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    argv = [a for a in os.sys.argv[1:]]
    torch.set_num_threads(args.threads)
    cfg = FuseConfig()
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        t0 = time.perf_counter()
        if task == "consistency":
            consistency_task(args.model, args.seeds, cfg, argv)
        elif task in TASKS:
            fusion_task(task, [m.strip() for m in args.methods.split(",")], args.seeds, cfg, argv)
        else:
            raise SystemExit(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
        print(f"{task}: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
