"""Training a fusion head: the alignment loop's conventions (``unialign_train.align.loop``) for a
supervised head on cached features.

AdamW with decoupled weight decay on matrices only, linear warmup then cosine decay (``lr_at``), data
order a pure function of (seed, epoch), validation after every epoch on the validation concepts, the
best-scoring weights kept and training stopped after ``patience`` epochs without improvement. Modality
dropout (each record with several modalities loses one of them with probability ``modality_dropout``,
drawn from (seed, epoch, step)) teaches every fusion module the missing-modality path it will meet at
test time.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt

from unialign.device import pick_device
from unialign.projections import LayerMixHead, count_parameters

from ..align.loop import lr_at
from .data import FuseData
from .modules import FusionModule

Log = Callable[[str], None]


class FuseConfig(BaseModel):
    """Sizes and optimisation of the fusion heads, one setting for every method. The epoch budget fits
    a 2-core CPU: on the emoji category task's validation concepts the token modules peaked by epoch 5-13
    of 20, the unimodal heads by 4-6 and LegoFuse's tuning at its first epoch of 5."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    width: PositiveInt = Field(64, description="width of the cross-modal layers")
    depth: PositiveInt = Field(2, description="cross-modal layers (and bridges)")
    heads: PositiveInt = 4
    hidden: PositiveInt = Field(256, description="hidden width of MLP heads")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    latents: PositiveInt = Field(16, description="MM-Lego latent array: rows")
    latent_width: PositiveInt = Field(64, description="MM-Lego latent array: columns")
    lego_depth: PositiveInt = Field(2, description="MM-Lego cross-attention rounds")
    merge: Literal["harmonic", "mean"] = Field("harmonic", description="LegoMerge rule")
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.05
    epochs: PositiveInt = 15
    warmup_steps: NonNegativeInt = 30
    patience: NonNegativeInt = Field(3, description="epochs without improvement before stopping (0: never)")
    modality_dropout: float = Field(0.15, ge=0.0, lt=1.0)
    mix_lr_scale: PositiveFloat = Field(1.0, description="learning-rate multiplier of the managers' mixing weights")
    fuse_epochs: PositiveInt = Field(3, description="LegoFuse: epochs of multimodal fine-tuning")
    fuse_lr: PositiveFloat = Field(3e-4, description="LegoFuse: learning rate of the fine-tuning")
    seed: int = 0
    device: str = Field("cpu", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class Trained:
    model: torch.nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf
    epochs: int = 0
    seconds: float = 0.0
    parameters: int = 0


def fit(model: torch.nn.Module, train: np.ndarray, step_loss: Callable[[np.ndarray, int, int], torch.Tensor],
        validate: Callable[[torch.nn.Module], float], cfg: FuseConfig, epochs: int | None = None,
        lr: float | None = None, log: Log | None = None) -> Trained:
    """The loop: ``step_loss(records, epoch, step)`` is one batch's loss, ``validate(model)`` the score to
    maximise after each epoch. Returns the best-scoring weights."""
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    mixing = {id(m.weights) for m in model.modules() if isinstance(m, LayerMixHead)}
    matrix = lambda p: p.ndim >= 2 and min(p.shape) > 1  # noqa: E731  (not biases, norms, mixing weights (L, 1))
    groups = [{"params": [p for p in params if matrix(p)], "weight_decay": cfg.weight_decay, "scale": 1.0},
              {"params": [p for p in params if not matrix(p) and id(p) not in mixing], "weight_decay": 0.0, "scale": 1.0},
              {"params": [p for p in params if id(p) in mixing], "weight_decay": 0.0, "scale": cfg.mix_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or cfg.lr)
    epochs = epochs or cfg.epochs
    bs = min(cfg.batch_size, len(train))
    per_epoch = max(1, len(train) // bs)
    total = epochs * per_epoch
    out = Trained(model, parameters=count_parameters(model))
    best, bad, step, t0 = None, 0, 0, time.perf_counter()
    for epoch in range(epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(train)
        model.train()
        for k in range(per_epoch):
            for g in opt.param_groups:
                g["lr"] = g["scale"] * lr_at(step, total, cfg.warmup_steps, lr or cfg.lr)
            loss = step_loss(order[k * bs : (k + 1) * bs], epoch, k)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fusion training loss became {loss.item()} at step {step}; lower the learning rate")
        model.eval()
        score = float(validate(model))
        out.history.append({"epoch": epoch + 1, "loss": float(loss.item()), "val": score})
        if log:
            log(f"epoch {epoch + 1} loss={loss.item():.4g} val={score:.4g}")
        if score > out.best_score:
            out.best_score, out.best_epoch, bad = score, epoch + 1, 0
            best = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        out.epochs = epoch + 1
        if cfg.patience and bad >= cfg.patience:
            break
    if best is not None:
        model.load_state_dict(best)
    model.eval().cpu()
    out.seconds = time.perf_counter() - t0
    return out


def drop_modalities(present: Mapping[str, np.ndarray], p: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per record with at least two modalities: with probability ``p``, hide one of them (uniformly)."""
    mods = list(present)
    has = np.stack([present[m] for m in mods], 1)
    n = len(has)
    hit = (rng.random(n) < p) & (has.sum(1) >= 2)
    pick = rng.random((n, len(mods))) * has  # a random present modality per record
    which = pick.argmax(1)
    return {m: hit & (which == j) for j, m in enumerate(mods)}


def train_fusion(model: FusionModule, data: FuseData, cfg: FuseConfig, epochs: int | None = None,
                 lr: float | None = None, log: Log | None = None) -> Trained:
    """Fit a fusion module on the training records of ``data`` (standardisers first, on the training
    features of the records that have each modality), early-stopped on the validation records."""
    train = data.parts["train"]
    for m, std in model.standardizers().items():
        rows = train[data.has[m][train]]
        std.fit(torch.from_numpy(data.pooled[m][rows]))
    fit_token_standardizers(model, data.tokens, {m: data.token_rows[m][train] for m in data.tokens}, cfg.seed)
    device = pick_device(cfg.device)

    def step_loss(idx: np.ndarray, epoch: int, k: int) -> torch.Tensor:
        rng = np.random.default_rng([cfg.seed, epoch, k, 7])
        drop = drop_modalities({m: data.has[m][idx] for m in model.modalities}, cfg.modality_dropout, rng)
        batch, y = data.batch(idx, drop, tokens=model.uses_tokens, fixed_length=model.fixed_length)
        return model.loss(batch.to(device), y.to(device), data.target.loss)

    validate = lambda mod: evaluate(mod, data, "val", device=device)[data.target.primary]  # noqa: E731
    return fit(model, train, step_loss, validate, cfg, epochs, lr, log)


def fit_token_standardizers(model: torch.nn.Module, stores: Mapping[str, Any], rows: Mapping[str, np.ndarray],
                            seed: int, n: int = 2000) -> None:
    """Fit a module's token standardisers on the tokens of (a seeded sample of at most ``n`` of) the
    training items ``rows`` (store rows; -1: none) of each modality."""
    wanted = getattr(model, "token_standardizers", lambda: [])()
    for m in dict.fromkeys(m for m, _, _ in wanted):
        have = np.unique(rows[m][rows[m] >= 0])
        pick = np.random.default_rng([seed, 11]).permutation(have)[:n]
        batch = stores[m].gather(np.sort(pick))
        for mod, j, std in wanted:
            if mod == m:
                std.fit(batch.layers[j][batch.mask])


@torch.no_grad()
def predict(model: FusionModule, data: FuseData, idx: Sequence[int], without: Sequence[str] = (),
            batch_size: int = 512, device: torch.device | str = "cpu") -> torch.Tensor:
    """Outputs for records ``idx`` with the modalities ``without`` hidden (the missing-modality test)."""
    model.eval().to(device)
    idx = np.asarray(idx, dtype=np.int64)
    outs = []
    for s in range(0, len(idx), batch_size):
        part = idx[s : s + batch_size]
        drop = {m: np.ones(len(part), dtype=bool) for m in without}
        batch, _ = data.batch(part, drop, tokens=model.uses_tokens, fixed_length=model.fixed_length)
        outs.append(model(batch.to(device)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, data.target.n_out)


def evaluate(model: FusionModule, data: FuseData, part: str = "test", without: Sequence[str] = (),
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Scores of ``model`` on a part's records (those that still have some modality when ``without`` is
    hidden), with their count."""
    idx = data.parts[part]
    left = np.zeros(len(idx), dtype=bool)
    for m in data.modalities:
        if m not in without:
            left |= data.has[m][idx]
    idx = idx[left]
    out = predict(model, data, idx, without, device=device)
    return {**data.target.scores(out, torch.from_numpy(data.y[idx])), "n": int(len(idx))}


__all__ = ["FuseConfig", "Trained", "drop_modalities", "evaluate", "fit", "fit_token_standardizers", "predict",
           "train_fusion"]
