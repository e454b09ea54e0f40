"""The training loop: plain PyTorch, short enough to hold in your head.

Data order is a pure function of (seed, epoch), so a checkpoint needs only model, loss, optimiser and
scheduler states, the step, the early-stopping state and the torch RNG (for dropout): a run resumed
from any checkpoint ends with exactly the weights of an uninterrupted run.

Sampling: ``"global"`` (default) permutes all pairs each epoch; ``"chunked"`` permutes chunks of
``chunk_size`` consecutive pairs, then shuffles within buffers of ``shuffle_chunks`` chunks, so batches
read a moving window of the memory-mapped store and peak memory does not grow with the store (mapped
pages of finished buffers are released). Under torchrun (``distributed="auto"``) every rank follows the
same order, encodes its slice of each global batch and the loss sees the all-gathered batch (see
``distributed.py``); the result equals one process on the full batch.
"""
from __future__ import annotations

import copy
import math
import mmap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from unialign.device import autocast, pick_device
from unialign.io import atomic_path
from unialign.projections import HEADS, Tower, count_parameters

from ..features.cache import Features
from ..validate import one_of
from . import distributed as D
from .losses import LOSSES, make_loss, multi_positive, structure_regularizer
from .pairs import Pairs


class TrainConfig(BaseModel):
    """Hyper-parameters of one head training, validated (a bad value names its field and what it takes).
    Defaults were chosen on held-out *validation* concepts; recipes override some of them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    head: Annotated[str, one_of(HEADS, "head")] = Field("linear", description="head of the first modality (and of "
                                                                             "the second unless text_head)")
    text_head: Annotated[str | None, one_of(HEADS, "head")] = Field(None, description="head of the second modality; "
                                                                                       "null: same as head")
    head_options: dict[str, dict[str, Any]] = Field(default_factory=dict,
                                                    description="options per side: {all|<modality>: {...}}")
    dim: PositiveInt = Field(256, description="width of the shared space")
    loss: Annotated[str, one_of(LOSSES, "loss")] = "infonce"
    loss_options: dict[str, Any] = Field(default_factory=dict)
    captions_per_step: PositiveInt = Field(1, description=">1: SAIL multi-positive, one loss block per second-"
                                                          "modality item drawn")
    mixup: NonNegativeFloat = Field(0.0, description="FuseMix latent mixup: Beta(a, a) parameter a of the one "
                                                     "lambda and partner shared by both modalities (0: off)")
    prototypes: bool = Field(False, description="concept prototypes: train on one pair per concept, its mean "
                             "first-modality item across records with each of its captions (align/prototypes.py)")
    structure_lambda: NonNegativeFloat = 0.0
    structure_levels: PositiveInt = 1
    structure_tau: PositiveFloat = 0.05
    structure_warmup: NonNegativeInt = 1000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: NonNegativeInt = 50
    epochs: NonNegativeInt = 40
    max_steps: PositiveInt | None = None
    eval_every: NonNegativeInt = Field(50, description="steps between validations (0: never)")
    patience: NonNegativeInt = Field(6, description="validations without improvement before stopping (0: never)")
    checkpoint_every: NonNegativeInt = Field(100, description="steps between checkpoints (0: none)")
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    sampling: Literal["global", "chunked"] = Field("global", description="global: one permutation per epoch; "
                                                                         "chunked: shuffled chunks (stores > RAM)")
    chunk_size: PositiveInt = 4096
    shuffle_chunks: PositiveInt = 16
    distributed: Literal["auto", "off"] = "auto"

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(v)}")
        return v


@dataclass
class TrainResult:
    model: torch.nn.ModuleDict  # one Tower per modality
    loss: torch.nn.Module
    history: list[dict[str, float]]
    best_step: int
    best_score: float
    steps: int
    seconds: float
    parameters: int


def build_model(cfg: TrainConfig, x_dims: Sequence[int], y_dims: Sequence[int], names: Sequence[str],
                steps: Sequence[int] = (1, 1)) -> torch.nn.ModuleDict:
    """A Tower per modality for features made of layers of the given widths (one entry per stored layer),
    each row holding ``steps`` time steps side by side. Layer-mixing and temporal heads are told the
    layer boundaries (and a temporal head the frames) unless their options name them."""
    def tower(side: str, kind: str, dims: Sequence[int], dim: int, n_steps: int) -> Tower:
        opts = dict(cfg.head_options.get(side, cfg.head_options.get("all", {})))
        if kind in ("layermix", "temporal"):
            opts.setdefault("layer_dims", [int(d) for d in dims])
        if kind == "temporal":
            opts.setdefault("frames", int(n_steps))
        return Tower(kind, sum(dims), dim, opts)

    x, y = names
    kinds = (cfg.head, cfg.text_head or cfg.head)
    dim = shared_dim(cfg.dim, kinds, sum(x_dims), sum(y_dims))
    return torch.nn.ModuleDict({x: tower(x, kinds[0], x_dims, dim, steps[0]),
                                y: tower(y, kinds[1], y_dims, dim, steps[1])})


def shared_dim(dim: int, kinds: Sequence[str], x_dim: int, y_dim: int) -> int:
    """Width of the shared space: ``dim``, unless one side keeps its own space (an ``identity`` head,
    ShareLock's frozen side): then that side's feature width, which the other head maps into."""
    fixed = {d for k, d in zip(kinds, (x_dim, y_dim)) if k == "identity"}
    if len(fixed) > 1:
        raise ValueError(f"both sides have identity heads but different widths {x_dim} and {y_dim}; "
                         "at most one side can stay in its own space")
    return fixed.pop() if fixed else dim


def latent_mixup(x: torch.Tensor, ys: list[torch.Tensor], lam: float, partner: torch.Tensor
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """FuseMix: ``lam * v + (1 - lam) * v[partner]`` for the features of *both* modalities with the same
    ``lam`` and the same partner, so a mixed image still pairs with its equally mixed caption."""
    return lam * x + (1.0 - lam) * x[partner], [lam * y + (1.0 - lam) * y[partner] for y in ys]


def mixup_draw(alpha: float, seed: int, step: int, n: int) -> tuple[float, torch.Tensor]:
    """The lambda ~ Beta(alpha, alpha) and partner permutation of one step: a pure function of (seed,
    step), so a resumed run mixes exactly as an uninterrupted one."""
    rng = np.random.default_rng([seed, step, 77])
    return float(rng.beta(alpha, alpha)), torch.from_numpy(rng.permutation(n))


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(
    x: Features,
    y: Features,
    pairs: Pairs,
    cfg: TrainConfig,
    validate: Callable[[torch.nn.ModuleDict], dict[str, float]] | None = None,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    stop_after: int | None = None,
    names: Sequence[str] = ("image", "text"),
) -> TrainResult:
    """Train one :class:`~unialign.projections.Tower` per modality on paired cached features ``x`` and
    ``y`` (the modalities ``names``, e.g. image and text); the result's model is a ``ModuleDict`` of them.

    ``validate(model) -> {"score": ..., ...}`` is called every ``eval_every`` steps; the best-scoring
    weights are kept and training stops after ``patience`` validations without improvement.
    ``checkpoint`` is a file to resume from and save to every ``checkpoint_every`` steps.
    ``stop_after`` ends the run early at that step (used to test resuming).
    """
    if len(pairs) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(pairs)}")
    device = pick_device(cfg.device)
    use_dist = cfg.distributed == "auto" and D.init_from_env(device) and D.world_size() > 1
    if use_dist:
        device = D.local_device(device)
    world, rank = (D.world_size(), D.rank()) if use_dist else (1, 0)
    main = rank == 0
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, x.dims, y.dims, names, (x.steps, y.steps))
    x_tower, y_tower = (model[n] for n in names)
    _fit_standardizers(x_tower, y_tower, x, y, pairs, cfg.seed,
                       release=(lambda: _release_pages(x, y)) if cfg.sampling == "chunked" else None)
    model.to(device)
    loss_fn = make_loss(cfg.loss, **cfg.loss_options).to(device)
    if use_dist:
        D.broadcast_params(model)
        D.broadcast_params(loss_fn)
    criterion = D.GatheredLoss(loss_fn) if use_dist else loss_fn
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas)

    bs = min(cfg.batch_size, len(pairs))
    if use_dist:  # every rank encodes an equal slice of each global batch
        bs -= bs % world
        if bs < world:
            raise ValueError(f"batch_size {cfg.batch_size} is smaller than the world size {world}")
    local_bs = bs // world
    steps_per_epoch = max(1, len(pairs) // bs)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    state = {"step": 0, "history": [], "best_score": -math.inf, "best_step": 0, "best": None, "bad": 0}
    run_key = {"config": cfg.model_dump(), "n_pairs": len(pairs), "dims": [x.dim, y.dim]}
    if checkpoint is not None and Path(checkpoint).exists():
        resumed = _load_checkpoint(checkpoint, model, loss_fn, opt, run_key)
        if resumed is not None:
            state = resumed
            if state.get("stopped"):  # it had stopped early: a rerun must not train on past that step
                total = state["step"]
            if log and main:
                log(f"resumed from {checkpoint} at step {state['step']}")
        elif log and main:
            log(f"ignoring {checkpoint}: it belongs to another configuration or data; starting afresh")

    t0 = time.perf_counter()
    epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    chunked = (_ChunkedOrder(len(pairs), cfg.seed, cfg.chunk_size, cfg.shuffle_chunks, lambda: _release_pages(x, y))
               if cfg.sampling == "chunked" else None)
    step = state["step"]
    while step < total:
        if stop_after is not None and step >= stop_after:
            break
        epoch, k = divmod(step, steps_per_epoch)
        if chunked is not None:
            items, draws = chunked.batch(epoch, k, bs)
        else:
            if epoch not in epoch_cache:
                epoch_cache.clear()
                rng = np.random.default_rng([cfg.seed, epoch])
                epoch_cache[epoch] = (rng.permutation(len(pairs)), rng.random(len(pairs)))
            perm, draw = epoch_cache[epoch]
            items = perm[k * bs : (k + 1) * bs]
            draws = draw[items]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.warmup_steps, cfg.lr)

        model.train()
        mine = slice(rank * local_bs, (rank + 1) * local_bs)  # this rank's slice of the global batch
        x_in = torch.from_numpy(x[pairs.x_rows(items[mine], draws[mine])]).to(device, non_blocking=True)
        y_ins = [torch.from_numpy(y[pairs.y_rows(items[mine], draws[mine], shift)]).to(device, non_blocking=True)
                 for shift in range(cfg.captions_per_step)]
        groups = torch.from_numpy(pairs.groups[items]).to(device)  # of the global batch
        if cfg.mixup > 0:
            lam, partner = mixup_draw(cfg.mixup, cfg.seed + rank, step, len(x_in))
            x_in, y_ins = latent_mixup(x_in, y_ins, lam, partner.to(device))
        loss, reg = batch_loss(x_tower, y_tower, criterion, x_in, y_ins, groups, cfg, step, world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if use_dist:
            D.sync_gradients(model.parameters(), loss_fn.parameters())
        opt.step()
        step += 1
        state["step"] = step

        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
        last = step == total
        if validate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last) and not main:
            if D.broadcast_flag(False, device):  # rank 0 validates and decides on early stopping
                total = step
        elif validate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or last):
            model.eval()
            metrics = validate(model)
            rec = {"step": step, "loss": float(loss.item()), "reg": float(reg.item()),
                   "temperature": float(loss_fn.temperature), "lr": opt.param_groups[0]["lr"], **metrics}
            state["history"].append(rec)
            if metrics["score"] > state["best_score"]:
                state.update(best_score=metrics["score"], best_step=step, best=copy.deepcopy(model.state_dict()), bad=0)
            else:
                state["bad"] += 1
            if log:
                log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            if cfg.patience and state["bad"] >= cfg.patience:
                if log:
                    log(f"early stop at step {step}: no improvement for {cfg.patience} validations")
                total = step
                state["stopped"] = True
            if use_dist:
                D.broadcast_flag(total == step and not last, device)
        if (checkpoint is not None and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == total)
                and main):
            _save_checkpoint(checkpoint, model, loss_fn, opt, state, run_key)

    if state["best"] is not None:
        model.load_state_dict(state["best"])
    model.eval()
    return TrainResult(model.cpu(), loss_fn.cpu(), state["history"], state["best_step"], state["best_score"], step,
                       time.perf_counter() - t0, count_parameters(model))


def batch_loss(x_tower: torch.nn.Module, y_tower: torch.nn.Module, criterion: torch.nn.Module, x_in: torch.Tensor,
               y_ins: list[torch.Tensor], groups: torch.Tensor, cfg: TrainConfig, step: int, world: int = 1
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrastive loss (+ STRUCTURE) of one batch. ``criterion`` may gather over ranks
    (:class:`~unialign_train.align.distributed.GatheredLoss`); STRUCTURE is computed on the local slice
    and divided by ``world`` so the summed gradients average it over ranks."""
    device = x_in.device
    with autocast(device):
        z_x = x_tower(x_in)
        z_ys = [y_tower(v) for v in y_ins]
    loss = multi_positive(criterion, z_x, z_ys, groups)
    reg = torch.zeros((), device=device)
    if cfg.structure_lambda > 0:
        reg = (structure_regularizer(x_in, z_x, cfg.structure_levels, cfg.structure_tau)
               + structure_regularizer(y_ins[0], z_ys[0], cfg.structure_levels, cfg.structure_tau)) / 2
        loss = loss + cfg.structure_lambda * min(1.0, (step + 1) / max(1, cfg.structure_warmup)) * reg / world
    return loss, reg


class _ChunkedOrder:
    """The epoch order of ``chunked`` sampling, built lazily buffer by buffer (a pure function of
    (seed, epoch)): chunks of ``chunk`` consecutive pairs in a seeded random order, grouped
    ``per_buffer`` at a time; the pairs of a buffer are shuffled together (with their caption draws).
    Memory: the chunk order plus the one or two buffers the current batch spans."""

    def __init__(self, n: int, seed: int, chunk: int, per_buffer: int, on_evict: Callable[[], None] | None = None):
        if chunk < 1 or per_buffer < 1:
            raise ValueError("chunk_size and shuffle_chunks must be >= 1")
        self.n, self.seed, self.chunk, self.per_buffer, self.on_evict = n, seed, chunk, per_buffer, on_evict
        self.epoch: int | None = None
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _start_epoch(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch, 1])
        n_chunks = -(-self.n // self.chunk)
        self.order = rng.permutation(n_chunks)
        lens = np.minimum(self.chunk, self.n - self.order * self.chunk)
        sizes = [int(lens[i : i + self.per_buffer].sum()) for i in range(0, n_chunks, self.per_buffer)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.epoch, self.cache = epoch, {}

    def _buffer(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self.cache:
            chunks = self.order[b * self.per_buffer : (b + 1) * self.per_buffer]
            items = np.concatenate([np.arange(c * self.chunk, min(self.n, (c + 1) * self.chunk)) for c in chunks])
            rng = np.random.default_rng([self.seed, self.epoch, 2, b])
            self.cache[b] = (items[rng.permutation(len(items))], rng.random(len(items)))
        return self.cache[b]

    def batch(self, epoch: int, k: int, bs: int) -> tuple[np.ndarray, np.ndarray]:
        """Items and caption draws at positions ``k*bs .. (k+1)*bs - 1`` of the epoch's order."""
        if epoch != self.epoch:
            self._start_epoch(epoch)
        lo, hi = k * bs, (k + 1) * bs
        b0 = int(np.searchsorted(self.starts, lo, side="right") - 1)
        b1 = int(np.searchsorted(self.starts, hi - 1, side="right") - 1)
        old = [b for b in self.cache if b < b0]
        for b in old:
            del self.cache[b]
        if old and self.on_evict is not None:
            self.on_evict()
        items, draws = [], []
        for b in range(b0, b1 + 1):
            it, dr = self._buffer(b)
            s = int(self.starts[b])
            a, z = max(lo, s) - s, min(hi, int(self.starts[b + 1])) - s
            items.append(it[a:z])
            draws.append(dr[a:z])
        return np.concatenate(items), np.concatenate(draws)


def _release_pages(*features: Features) -> None:
    """Drop this process's mapping of memory-mapped feature pages (the page cache keeps them), so the
    resident set holds only what the current buffers touch."""
    for f in features:
        for a in getattr(f, "arrays", [f]):
            for part in getattr(a, "parts", [a]):
                mm = getattr(part, "_mmap", None)
                if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                    try:
                        mm.madvise(mmap.MADV_DONTNEED)
                    except (OSError, ValueError):
                        pass


def _fit_standardizers(x_tower: Tower, y_tower: Tower, x: Features, y: Features, pairs: Pairs, seed: int,
                       n: int = 50_000, release: Callable[[], None] | None = None) -> None:
    """Per-dimension mean/std of the training features (a sample of at most ``n`` rows).

    Rows are gathered in blocks; ``release`` (chunked sampling) drops the mapped pages after each
    block, since random reads of a memory-mapped store map whole neighbourhoods of pages."""
    rng = np.random.default_rng([seed, 99])
    pick = np.sort(rng.choice(len(pairs), size=min(n, len(pairs)), replace=False))

    def gather(feats: Features, rows: np.ndarray, block: int = 4096) -> np.ndarray:
        parts = []
        for s in range(0, len(rows), block):
            parts.append(feats[rows[s : s + block]])
            if release is not None:
                release()
        return np.concatenate(parts) if parts else feats[rows]

    x_tower.standardize.fit(torch.from_numpy(gather(x, np.unique(pairs.x_flat[pairs.x_offsets[pick]]))))
    y_rows = np.unique(pairs.y_flat)
    if len(y_rows) > n:  # large stores: a sample of the second modality's rows (small data: all of them)
        y_rows = np.sort(rng.choice(y_rows, size=n, replace=False))
    y_tower.standardize.fit(torch.from_numpy(gather(y, y_rows)))


def _save_checkpoint(path: str | Path, model: torch.nn.Module, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer,
                     state: dict[str, Any], run_key: dict[str, Any]) -> None:
    payload = {"model": model.state_dict(), "loss": loss_fn.state_dict(), "opt": opt.state_dict(),
               "state": state, "torch_rng": torch.get_rng_state(), "run_key": run_key}
    if torch.cuda.is_available():
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: str | Path, model: torch.nn.Module, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer,
                     run_key: dict[str, Any]) -> dict[str, Any] | None:
    """Restore a checkpoint of the same configuration and data; ``None`` if it is of another run."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("run_key") != run_key:
        return None
    model.load_state_dict(payload["model"])
    loss_fn.load_state_dict(payload["loss"])
    opt.load_state_dict(payload["opt"])
    torch.set_rng_state(payload["torch_rng"])
    if "cuda_rng" in payload and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    return payload["state"]

