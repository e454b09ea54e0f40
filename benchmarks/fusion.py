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
work, two threads ran the fusion steps 2-4x slower. The cheap methods (unimodal heads, late fusion,
concat-MLP: seconds per seed) run for every seed first; the token methods (Manager, Bridge, MM-Lego:
minutes per seed) then seed by seed while ``--token-budget`` seconds allow (no seed starts that the
last one's duration says would overrun it), so the table may hold fewer seeds for them; its ``seeds``
column says how many. HAMMER-lite seeds follow the same budget. Results are written after every seed.

    python3 benchmarks/fusion.py                                   # both fusion tasks and consistency, 5 seeds
    python3 benchmarks/fusion.py --tasks category --seeds 2 --methods late,concat
    # in parallel processes (what docs/fusion.md reports): one part per method family, then the join
    python3 benchmarks/fusion.py --tasks category --methods manager --part manager --token-budget 2900
    python3 benchmarks/fusion.py --tasks category,subcategory --merge
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from _common import RESULTS, command, write
from unialign.model import AlignedModel
from unialign_train.config import load_config
from unialign_train.fuse import (METHODS, FuseConfig, consistency_by_type, consistency_table, fusion_table,
                                 load_fusion_data, load_pairs, run_consistency, run_methods)

CHEAP = ("late", "concat")
# the encoders these results were measured with (pinned: the configuration's defaults may move on)
ENCODERS = {"image": "effnet-lite0?image_size=128", "text": "st:all-MiniLM-L6-v2"}
TASKS = ("category", "subcategory", "consistency")


class Budget:
    """Whether another seed of a slow method fits: elapsed time plus the last seed's duration within
    ``seconds`` (None: always)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t0, self.last = seconds, time.perf_counter(), 0.0

    def allows(self) -> bool:
        return self.seconds is None or time.perf_counter() - self.t0 + self.last <= self.seconds

    def spent(self, seconds: float) -> None:
        self.last = seconds


def describe(target: str, classes: int, parts: dict[str, int], rows: list[dict]) -> str:
    return (f"Task: emoji {target} ({classes} classes), {parts['test']} test records (unseen concepts, unseen "
            f"apple style); mean +- std over the seeds in the `seeds` column (training seeds 0..n-1; one split)."
            f"\n\n{fusion_table(rows)}")


def fusion_task(target: str, methods: list[str], seeds: int, cfg: FuseConfig, budget: Budget, argv: list[str],
                part: str | None = None, first_seed: int = 0) -> None:
    """Train and score ``methods`` on ``target``; the results go to ``fusion_<target>`` or, with ``part``,
    to ``fusion_<target>.<part>`` (methods run in parallel processes; ``--merge`` joins the parts)."""
    run = load_config()
    data = load_fusion_data(run.data.dataset, target, "classification", run.data, ENCODERS,
                            run.extract, tokens=bool(set(methods) - set(CHEAP)), device="cpu")
    parts = {k: int(len(v)) for k, v in data.parts.items()}
    rows: list[dict] = []

    def save() -> None:
        done = sorted({r["seed"] for r in rows})
        write(f"fusion_{target}" + (f".{part}" if part else ""),
              {"target": target, "classes": len(data.target.classes), "parts": parts, "seeds": len(done),
               "max_tokens": data.max_tokens, "encoders": ENCODERS, "config": cfg.model_dump(), "rows": rows},
              describe(target, len(data.target.classes), parts, rows), command("fusion.py", argv))

    cheap = [m for m in methods if m in CHEAP]
    slow = [m for m in methods if m not in CHEAP]
    for seed in range(first_seed, first_seed + seeds if cheap else 0):
        rows += run_methods(data, cheap, cfg.model_copy(update={"seed": seed}))
    if cheap:
        save()
    for seed in range(first_seed, first_seed + seeds if slow else 0):
        if not budget.allows():
            print(f"{target}: token methods stop before seed {seed}: the budget would be overrun")
            break
        t0 = time.perf_counter()
        for family in slow:  # saved family by family: a stopped run keeps what it finished
            rows += run_methods(data, [family], cfg.model_copy(update={"seed": seed}))
            save()
        budget.spent(time.perf_counter() - t0)


def merge(target: str, argv: list[str]) -> None:
    """Join the part files ``fusion_<target>.*.json`` into ``fusion_<target>.json`` / ``.md``."""
    order = ["cheap", *METHODS]  # the table's row order: baselines, then the token methods as METHODS lists them
    files = sorted(RESULTS.glob(f"fusion_{target}.*.json"),
                   key=lambda f: (order.index(f.stem.split(".")[-1]) if f.stem.split(".")[-1] in order else len(order), f.name))
    if not files:
        raise SystemExit(f"no part files fusion_{target}.*.json in {RESULTS}")
    loaded = [json.loads(f.read_text()) for f in files]
    rows = [r for d in loaded for r in d["rows"]]
    first = loaded[0]
    write(f"fusion_{target}", {**{k: first[k] for k in ("target", "classes", "parts", "max_tokens", "config")},
                               "encoders": ENCODERS, "seeds": max(d["seeds"] for d in loaded), "rows": rows,
                               "parts_made_with": {f.name: d["command"] for f, d in zip(files, loaded)}},
          describe(target, first["classes"], first["parts"], rows)
          + "\n\nParts: " + "; ".join(f"`{d['command']}`" for d in loaded) + ".", command("fusion.py", argv))


def consistency_task(model_dir: str, seeds: int, cfg: FuseConfig, budget: Budget, argv: list[str]) -> None:
    run = load_config()
    model = AlignedModel.from_pretrained(model_dir, device="cpu")
    pairs, cached = load_pairs(model, run.data.dataset, run.data, ENCODERS, run.extract, device="cpu")
    test_counts = {k: int((pairs.kind[pairs.parts["test"]] == k).sum()) for k in ("real", "text_swap", "attribute_swap",
                                                                                 "image_swap")}

    def save(result: dict) -> bool:
        meta = result["training"]
        n = len(meta)
        train = (f"HAMMER-lite: {n} seed(s), mean +- std; {meta[0]['parameters']:,} trainable parameters, "
                 f"{sum(m['seconds'] for m in meta) / n:.0f} s training per seed" if n else "HAMMER-lite: not trained")
        tables = (f"Test pairs (unseen concepts, apple style): {test_counts}; {train}. Zero-shot: "
                  f"`AlignedModel.match` of `{model_dir}`, Platt-calibrated on the validation concepts' pairs "
                  f"(its ECE is that of `match`).\n\n"
                  + consistency_table(result["results"]) + "\n\n" + consistency_by_type(result["results"]))
        write("consistency", {"model": model_dir, "match_calibration": model.info.get("match"), "test_counts": test_counts,
                              "config": cfg.model_dump(), **result}, tables, command("fusion.py", argv))
        if n:
            budget.spent(meta[-1]["seconds"])
        return budget.allows()

    save(run_consistency(model, pairs, cached, list(range(seeds)), cfg, calibrate=True, after_seed=save))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated: {', '.join(TASKS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"fusion method families: {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (a part that "
                                                               "adds seeds to another part's; --merge joins them)")
    ap.add_argument("--model", default="runs/default/model", help="aligned model of the zero-shot detector")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--token-budget", type=float, default=None,
                    help="seconds per task for the token methods' (and HAMMER-lite's) seeds; default: no limit")
    ap.add_argument("--part", default=None, help="write fusion_<task>.<part>.json/md (one of several parallel runs)")
    ap.add_argument("--merge", action="store_true", help="join fusion_<task>.*.json into fusion_<task>.json and stop")
    args = ap.parse_args()
    argv = [a for a in os.sys.argv[1:]]
    torch.set_num_threads(args.threads)
    cfg = FuseConfig()
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        t0 = time.perf_counter()
        budget = Budget(args.token_budget)
        if args.merge:
            if task != "consistency":
                merge(task, argv)
            continue
        if task == "consistency":
            consistency_task(args.model, args.seeds, cfg, budget, argv)
        elif task in TASKS:
            fusion_task(task, [m.strip() for m in args.methods.split(",")], args.seeds, cfg, budget, argv, args.part,
                        args.first_seed)
        else:
            raise SystemExit(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
        print(f"{task}: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
