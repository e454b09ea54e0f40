"""torch.distributed (gloo, 2 CPU processes): gathered loss and summed gradients equal one process on
the full batch, for InfoNCE and SigLIP; a 2-rank train() run ends with the single-process weights."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unialign_train.align import distributed as D
from unialign_train.align import loop as T
from unialign_train.align.pairs import Pairs
from unialign_train.features import Features

WORLD = 2
BATCH = 16


def _data():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((64, 10)).astype(np.float32)
    txt = rng.standard_normal((80, 6)).astype(np.float32)
    pairs = Pairs.from_lists(list(range(64)), [[i, 64 + i % 16] for i in range(64)], [i % 24 for i in range(64)])
    return Features([img]), Features([txt]), pairs


def _cfg(loss: str, **kw) -> T.TrainConfig:
    # no dropout: each rank draws its own masks, so only dropout-free heads match one process exactly
    return T.TrainConfig(head="mlp", head_options={"all": {"dropout": 0.0, "hidden": 32}}, dim=8, loss=loss, batch_size=BATCH, lr=1e-2, warmup_steps=2, max_steps=4,
                         eval_every=0, captions_per_step=2, **kw)


def _step(loss: str, rank: int, world: int) -> dict:
    """One batch: loss and gradients (after the cross-rank sum) of the heads and the loss scalars."""
    img, txt, pairs = _data()
    cfg = _cfg(loss)
    torch.manual_seed(0)
    model = T.build_model(cfg, img.dims, txt.dims, ("image", "text"))
    T._fit_standardizers(model["image"], model["text"], img, txt, pairs, 0)
    loss_fn = T.make_loss(loss)
    crit = D.GatheredLoss(loss_fn) if world > 1 else loss_fn
    items = np.arange(3, 3 + BATCH)
    draws = np.linspace(0, 0.99, BATCH)
    lb = BATCH // world
    mine = slice(rank * lb, (rank + 1) * lb)
    x_img = torch.from_numpy(img[pairs.x_rows(items[mine], draws[mine])])
    x_txts = [torch.from_numpy(txt[pairs.y_rows(items[mine], draws[mine], s)]) for s in range(2)]
    groups = torch.from_numpy(pairs.groups[items])
    value, _ = T.batch_loss(model["image"], model["text"], crit, x_img, x_txts, groups, cfg, 0, world)
    value.backward()
    D.sync_gradients(model.parameters(), loss_fn.parameters())
    grads = {f"model.{k}": p.grad.clone() for k, p in model.named_parameters()}
    grads.update({f"loss.{k}": p.grad.clone() for k, p in loss_fn.named_parameters()})
    return {"loss": value.detach(), "grads": grads}


def _train(loss: str, sampling: str) -> dict:
    img, txt, pairs = _data()
    res = T.train(img, txt, pairs, _cfg(loss, sampling=sampling, chunk_size=8, shuffle_chunks=2), log=None)
    return res.model.state_dict()


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {loss: _step(loss, rank, WORLD) for loss in ("infonce", "siglip")}
        res["train"] = {(l, s): _train(l, s) for l, s in (("infonce", "chunked"), ("siglip", "global"))}
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.numerics
@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_gathered_loss_and_gradients_equal_full_batch(ranks, loss):
    ref = _step(loss, 0, 1)
    for r in ranks:
        assert torch.allclose(r[loss]["loss"], ref["loss"], atol=1e-5, rtol=0)
        assert r[loss]["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            assert torch.allclose(r[loss]["grads"][k], g, atol=1e-5, rtol=0), k
    assert any(k.startswith("loss.") for k in ref["grads"])


@pytest.mark.numerics
@pytest.mark.parametrize("loss,sampling", [("infonce", "chunked"), ("siglip", "global")])
def test_two_rank_training_matches_one_process(ranks, loss, sampling):
    ref = _train(loss, sampling)
    for r in ranks:
        got = r["train"][(loss, sampling)]
        for k, v in ref.items():
            assert torch.allclose(got[k], v, atol=1e-5, rtol=0), k


def test_without_process_group_gather_is_identity():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert D.gather_features(a, b) == (a, b) and D.world_size() == 1 and D.is_main()
