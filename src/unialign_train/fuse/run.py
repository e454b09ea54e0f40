"""The fuse stage: every fusion method on one task, the same records, features and budget for all.

:func:`load_fusion_data` reads the dataset, splits it by the protocol (held-out concepts; the emoji
test records are in the held-out apple style), caches pooled features through the feature store
(``cache_features``) and token features through :mod:`.tokens`. :func:`run_methods` trains each method
once for one seed and returns one row per model: its test scores with every modality, and with each
modality hidden (a record without it still predicts), its trainable parameters and training time.

Rows per method family:

- ``late``: each modality's MLP head alone (the unimodal baselines), then late fusion of those very
  heads (logits averaged; its parameters and time are the heads' sums);
- ``concat``: concat-MLP;
- ``manager`` / ``bridge``: the ManagerTower / BridgeTower cross-modal encoders;
- ``lego``: each modality's LegoBlock trained alone, LegoMerge of them (no multimodal training: its time
  is the blocks'), LegoFuse (the blocks stacked and fine-tuned for ``fuse_epochs``; time: blocks + tuning).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from unialign.encoders import load_encoder
from unialign.encoders.base import FINAL

from ..data import DataConfig, load_dataset, make_splits
from ..features.cache import ExtractConfig, cache_features
from .data import FuseData, Kind, prepare, record_items
from .modules import BridgeFusion, ConcatMLP, FusionModule, LateFusion, LegoBlock, LegoFuse, LegoMerge, ManagerFusion
from .tokens import TokenStore, extract_tokens
from .train import FuseConfig, Trained, evaluate, train_fusion

Log = Callable[[str], None]
METHODS = ("late", "concat", "manager", "bridge", "lego")


def load_fusion_data(dataset: str, target: str, kind: Kind, protocol: DataConfig, encoders: Mapping[str, str],
                     extract: ExtractConfig, tokens: bool = True, token_layers: Mapping[str, Sequence[str]] | None = None,
                     grid: int = 4, device: str = "auto", max_tokens: int | None = 32, log: Log = print) -> FuseData:
    """The dataset split by ``protocol``, pooled features of each modality of ``encoders`` (from the
    feature store), and, with ``tokens``, their token stores over the items the parts' records use (token
    modules read at most ``max_tokens`` of an item's tokens; see :mod:`.data`)."""
    ds = load_dataset(dataset)
    splits = make_splits(ds, protocol)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    encs = {m: load_encoder(spec, device=device) for m, spec in encoders.items()}
    cached = cache_features(ds, encs, {m: [FINAL] for m in encs}, extract, log)
    stores: dict[str, TokenStore] = {}
    if tokens:
        used = np.concatenate(list(parts.values()))
        for m, spec in encoders.items():
            items = record_items(ds, m, target)
            enc = encs[m] if encs[m].backend == "torch" else load_encoder(spec, device=device, backend="torch")
            layers = (token_layers or {}).get(m)
            stores[m] = extract_tokens([items[i] for i in used if items[i] is not None], enc, m, layers, grid=grid,
                                       batch_size=extract.batch_size, log=log)
    return prepare(ds, parts, target, kind, cached, stores, list(encoders), max_tokens=max_tokens)


def scores_row(name: str, family: str, model: FusionModule, data: FuseData, seconds: float, parameters: int,
               trained: Trained | None, seed: int, note: str = "") -> dict[str, Any]:
    """One model's result: test scores with all modalities and with each one hidden."""
    return {"method": name, "family": family, "seed": seed, "test": evaluate(model, data, "test"),
            "without": {m: evaluate(model, data, "test", without=[m]) for m in model.modalities if len(model.modalities) > 1},
            "parameters": int(parameters), "seconds": round(float(seconds), 2),
            "epochs": trained.epochs if trained else 0, "best_epoch": trained.best_epoch if trained else 0,
            "val": evaluate(model, data, "val")[data.target.primary], "note": note}


def run_methods(data: FuseData, methods: Sequence[str], cfg: FuseConfig, log: Log = print) -> list[dict[str, Any]]:
    """Train and score each method family of ``methods`` (see the module doc) for ``cfg.seed``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown fusion method(s) {unknown}; accepted: {', '.join(METHODS)}")
    rows: list[dict[str, Any]] = []
    n_out, dims, tdims = data.target.n_out, data.dims(), data.token_dims()
    quiet = None
    for family in [m for m in METHODS if m in methods]:
        log(f"[seed {cfg.seed}] {family}")
        if family == "late":
            heads, seconds, params = {}, 0.0, 0
            for m, d in dims.items():
                t = train_fusion(LateFusion({m: d}, n_out, cfg.hidden, cfg.dropout), data, cfg, log=quiet)
                rows.append(scores_row(f"{m} alone", "unimodal", t.model, data, t.seconds, t.parameters, t, cfg.seed))
                heads[m], seconds, params = t.model.heads[m], seconds + t.seconds, params + t.parameters
            late = LateFusion(dims, n_out, cfg.hidden, cfg.dropout)
            late.heads = torch.nn.ModuleDict({m: copy.deepcopy(h) for m, h in heads.items()})
            rows.append(scores_row("late fusion", "baseline", late, data, seconds, params, None, cfg.seed,
                                   "the unimodal heads, logits averaged"))
        elif family == "concat":
            t = train_fusion(ConcatMLP(dims, n_out, cfg.hidden, cfg.dropout), data, cfg, log=quiet)
            rows.append(scores_row("concat-MLP", "baseline", t.model, data, t.seconds, t.parameters, t, cfg.seed))
        elif family in ("manager", "bridge"):
            cls, name = (ManagerFusion, "Manager") if family == "manager" else (BridgeFusion, "Bridge")
            model = cls(tdims, n_out, cfg.width, cfg.depth, cfg.heads, cfg.dropout, cfg.hidden)
            t = train_fusion(model, data, cfg, log=quiet)
            note = "mix weights " + str(_rounded(t.model.mix_weights())) if family == "manager" else ""
            rows.append(scores_row(name, family, t.model, data, t.seconds, t.parameters, t, cfg.seed, note))
        else:
            rows += lego_rows(data, cfg, quiet)
    return rows


def lego_rows(data: FuseData, cfg: FuseConfig, log: Log | None = None) -> list[dict[str, Any]]:
    """MM-Lego: a LegoBlock per modality trained alone on the task, LegoMerge of them, LegoFuse tuned."""
    rows, blocks, seconds, params = [], [], 0.0, 0
    for m, dims in data.token_dims().items():
        block = LegoBlock(m, dims[-1], data.target.n_out, cfg.latents, cfg.latent_width, cfg.lego_depth, cfg.heads,
                          cfg.dropout)
        t = train_fusion(block, data, cfg, log=log)
        rows.append(scores_row(f"LegoBlock {m}", "unimodal", t.model, data, t.seconds, t.parameters, t, cfg.seed))
        blocks.append(t.model)
        seconds, params = seconds + t.seconds, params + t.parameters
    merged = LegoMerge(blocks, cfg.merge)
    rows.append(scores_row("LegoMerge", "lego", merged, data, seconds, params, None, cfg.seed,
                           f"{cfg.merge} merge of the blocks, no multimodal training"))
    t = train_fusion(LegoFuse(blocks), data, cfg, epochs=cfg.fuse_epochs, lr=cfg.fuse_lr, log=log)
    rows.append(scores_row("LegoFuse", "lego", t.model, data, seconds + t.seconds, t.parameters, t, cfg.seed,
                           f"blocks stacked, {t.epochs} epochs of fine-tuning"))
    return rows


def _rounded(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return round(float(x), 2)


__all__ = ["METHODS", "lego_rows", "load_fusion_data", "run_methods", "scores_row"]
