"""CLIP_benchmark, run for real on a unialign model: its own CLI, dataset reader and metrics.

Nothing here re-implements CLIP_benchmark (CB). unialign joins CB through CB's own extension points:

- :func:`register` adds ``"unialign"`` to CB's model registry (``clip_benchmark.models.TYPE2FUNC``,
  which its ``load_clip`` reads, and ``MODEL_TYPES``, the ``--model_type`` choices), with
  :func:`unialign.openclip.load_clip_benchmark` as the loader; :func:`run_cli` is then CB's own
  ``clip_benchmark`` command line.
- :func:`export_set` writes an evaluation set in CB's webdataset layout (``classnames.txt``,
  ``zeroshot_classification_templates.txt``, ``test/{0..n}.tar``) with CB's own converter, so
  ``clip_benchmark eval --dataset wds/<name> --dataset_root <folder>`` reads it. Images are decoded the
  way unialign decodes them (EXIF rotation, alpha on white, RGB) and stored as lossless PNG, so CB's
  reader hands the model the same pixels ``unialign eval`` used.
- :func:`benchmark` runs every set a ``unialign run`` scored (its held-out split, classification and
  retrieval; its zero-shot sets), or CB dataset ids, through CB's CLI, writing files under CB's own
  names (``{dataset}_{pretrained}_{model}_{language}_{task}.json``, the names ``unialign eval`` writes),
  and :func:`compare` lines them up with the run's own results.

CB needs torchvision (and NumPy < 2.4: its ``accuracy()`` calls ``float()`` on a 1-element array),
which this environment's CPU torch may lack; ``scripts/clip_benchmark_env.sh`` builds a side
virtualenv where both import. See docs/interop.md.
"""
from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from unialign.errors import DataError, UnialignError
from unialign.io import read_json

Log = Callable[[str], None]
TASKS = ("zeroshot_classification", "zeroshot_retrieval")
CB_OPTIONS = ["--no_amp", "--num_workers", "0", "--recall_k", "1", "5", "10", "--language", "en"]


def require_clip_benchmark() -> Any:
    """CB's CLI module, or one clear error on how to get an environment where it imports."""
    try:
        from clip_benchmark import cli
    except Exception as e:  # ImportError, or torchvision failing to load beside this torch
        raise UnialignError(f"CLIP_benchmark does not import here ({type(e).__name__}: {e}). It needs torchvision "
                            "built for this torch and NumPy < 2.4; `bash scripts/clip_benchmark_env.sh` builds a side "
                            "virtualenv with both (see docs/interop.md)") from None
    return cli


def register() -> None:
    """Make ``--model_type unialign`` a CB model type (``--pretrained`` = a saved model folder)."""
    require_clip_benchmark()
    from clip_benchmark import models

    from unialign.openclip import load_clip_benchmark

    models.TYPE2FUNC.setdefault("unialign", load_clip_benchmark)
    if "unialign" not in models.MODEL_TYPES:
        models.MODEL_TYPES.append("unialign")  # the very list the CLI's --model_type choices hold


def run_cli(argv: Sequence[str]) -> None:
    """``clip_benchmark <argv>`` (CB's own ``main``, which reads ``sys.argv``) with unialign registered."""
    cli = require_clip_benchmark()
    register()
    old = sys.argv
    sys.argv = ["clip_benchmark", *map(str, argv)]
    try:
        cli.main()
    finally:
        sys.argv = old


# -- a run's evaluation sets in CB's format ----------------------------------------------------------
@dataclass
class EvalSet:
    """One (dataset, task) that ``unialign run`` scored: its records, and for classification the class
    names (in label order), each record's label and the prompt templates."""

    name: str
    task: str
    dataset: Any  # unialign_train.data.Dataset
    indices: list[int]
    classes: list[str] | None = None
    labels: list[int] | None = None
    templates: list[str] | None = None


def evaluation_sets(run_info: dict[str, Any], log: Log = print) -> list[EvalSet]:
    """The held-out split (classification, then retrieval when it has captions) and each zero-shot set
    of a run, with the records, classes and templates its own evaluation used."""
    from unialign.zeroshot import get_templates

    from .data import DataConfig, heldout_name, load_dataset, make_splits
    from .evaluate.tasks import EvalConfig, class_names_and_labels, zero_shot_sets

    cfg = run_info["config"]
    align = list(cfg["align"])
    if sorted(align) != ["image", "text"]:
        raise UnialignError(f"CLIP_benchmark scores image-text models; this run aligns {align}")
    data_cfg, eval_cfg = DataConfig.model_validate(cfg["data"]), EvalConfig.model_validate(cfg["eval"])
    ds = load_dataset(data_cfg.dataset)
    splits = make_splits(ds, data_cfg)
    kept = [int(i) for i in splits.test if ds.items(int(i), "image")]
    name = heldout_name(ds, splits)
    classes, labels = class_names_and_labels(ds, kept)
    sets = [EvalSet(name, TASKS[0], ds, kept, classes, labels, get_templates(eval_cfg.templates))]
    if any(ds.items(i, "text") for i in kept) and ds.classes is None:  # a labelled set's captions are its class names
        sets.append(EvalSet(name, TASKS[1], ds, kept))
    for zname, zs, zds, _ in zero_shot_sets(eval_cfg.zero_shot_sets, align, log):
        idx = [i for i in range(len(zds)) if zds.items(i, "image")]
        zc, zl = class_names_and_labels(zds, idx)
        sets.append(EvalSet(zname, TASKS[0], zds, idx, zc, zl, get_templates(zs.templates)))
    return sets


class _Samples:
    """(PNG bytes, label or captions) per record: the items CB's converter writes into its tar shards."""

    def __init__(self, s: EvalSet):
        self.s = s
        self.classes = s.classes
        self.templates = [t.replace("{}", "{c}") for t in s.templates] if s.templates else None  # CB's placeholder

    def __len__(self) -> int:
        return len(self.s.indices)

    def __getitem__(self, j: int) -> tuple[bytes, Any]:
        from unialign.media import load_image

        i = self.s.indices[j]
        buf = io.BytesIO()
        load_image(self.s.dataset.path(i)).save(buf, format="png")
        target = self.s.labels[j] if self.s.labels is not None else self.s.dataset.items(i, "text")
        return buf.getvalue(), target


def export_set(s: EvalSet, folder: Path) -> Path:
    """``folder`` in CB's webdataset layout for ``s`` (written once: a folder with its ``test/nshards.txt``
    is complete, as CB's converter writes that file last)."""
    require_clip_benchmark()
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset

    if (folder / "test" / "nshards.txt").exists():
        return folder
    if s.task == TASKS[1] and any("\n" in c for i in s.indices for c in s.dataset.items(i, "text")):
        raise DataError(f"{s.name}: a caption contains a newline; CB's retrieval format keeps captions one per line")
    convert = convert_dataset if s.task == TASKS[0] else convert_retrieval_dataset
    convert(_Samples(s), "test", str(folder), image_format="png", verbose=False)
    return folder


# -- running and comparing ------------------------------------------------------------------------------
def benchmark(run_dir: str | Path, out: str | Path | None = None, datasets: Sequence[str] | None = None,
              data_root: str | Path | None = None, batch_size: int = 64, extra: Sequence[str] = (),
              log: Log = print) -> list[Path]:
    """Score a run's saved model with CB's own CLI; returns the result files written.

    ``datasets``: CB dataset ids (``cifar10``, ``wds/...``), scored on CB's own terms (its default task,
    ``data_root`` as ``--dataset_root``); default: every set the run scored, exported to CB's format
    under ``$UNIALIGN_HOME/clip_benchmark``.
    """
    from unialign.paths import home
    from unialign.results import cb_output_template

    require_clip_benchmark()
    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (run_dir / "run.json").exists() or not (model_dir / "config.json").exists():
        raise UnialignError(f"{run_dir} is not a finished run folder (no run.json or model/config.json); "
                            "give the --output folder of `unialign run`")
    info = read_json(run_dir / "run.json")
    out = Path(out) if out is not None else run_dir / "clip_benchmark"
    out.mkdir(parents=True, exist_ok=True)
    model_name = str(info["config"]["name"])
    common = ["eval", "--model_type", "unialign", "--model", model_name, "--pretrained", str(model_dir),
              "--output", str(out / cb_output_template(str(model_dir))), "--batch_size", str(batch_size),
              *CB_OPTIONS, *extra]
    jobs: list[tuple[str, str | None, str | None]] = []  # (CB dataset id, dataset root, task or None = CB's default)
    if datasets:
        jobs = [(d, str(data_root) if data_root else "root", None) for d in datasets]
    else:
        for s in evaluation_sets(info, log):
            key = f"{s.name}-{s.dataset.fingerprint()[:12]}-{s.task.split('_')[-1]}"
            log(f"CB format: {s.name} ({s.task}, {len(s.indices)} images)")
            jobs.append((f"wds/{s.name}", str(export_set(s, home() / "clip_benchmark" / key)), s.task))
    written = []
    for dataset, root, task in jobs:
        log(f"clip_benchmark eval --dataset {dataset}" + (f" --task {task}" if task else ""))
        t0 = time.time()
        run_cli([*common, "--dataset", dataset, "--dataset_root", root, *(["--task", task] if task else []), "--quiet"])
        written += [p for p in out.glob("*.json") if p.stat().st_mtime >= t0 - 1]  # CB names the file itself
    return sorted(set(written))


def compare(cb_files: Sequence[Path], results_dir: Path) -> list[list[str]]:
    """Rows (file, metric, CB, unialign, |difference|) for every CB result that has a file of the same
    name (CB's naming) in ``results_dir``; a CB file without one gets a row saying so."""
    rows = []
    for p in sorted(cb_files):
        cb = json.loads(p.read_text())
        mine_path = results_dir / p.name
        if not mine_path.exists():
            rows.append([p.name, "-", "-", "(no unialign file of this name)", "-"])
            continue
        mine = json.loads(mine_path.read_text())
        for metric, value in cb["metrics"].items():
            if isinstance(value, (int, float)) and metric in mine["metrics"]:
                rows.append([p.name, metric, f"{value:.6f}", f"{mine['metrics'][metric]:.6f}",
                             f"{abs(value - mine['metrics'][metric]):.1e}"])
    return rows


__all__ = ["EvalSet", "benchmark", "compare", "evaluation_sets", "export_set", "register", "require_clip_benchmark",
           "run_cli"]
