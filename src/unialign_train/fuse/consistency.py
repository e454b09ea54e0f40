"""Image-text consistency on frozen encoders (DGM4 / HAMMER): was a pair manipulated, and which words?

Two detectors, scored on the same manipulated pairs (:func:`unialign_train.data.build_manipulated`):

- **zero-shot**, from an aligned model's shared space: the cosine of the pair's embeddings, turned into a
  probability of *matching* by Platt scaling (``sigmoid(a * cos + b)``, fitted on the validation
  concepts' pairs; :func:`calibrate_match` stores it in the model, where ``AlignedModel.match`` and the
  server's ``/match`` read it); the threshold is that probability's 1/2. Words are grounded by
  occlusion: a word is flagged in a pair judged manipulated when deleting it raises the similarity by
  more than a margin chosen on validation for the best word F1;
- **HAMMER-lite**, trained on both encoders' tokens: the two token sets mapped to a common width, a
  manipulation-aware contrastive term on their pooled embeddings (HAMMER's MAC: an image's positives
  are the captions of its concept, so a manipulated caption is a negative of its own image), two
  co-attention layers (:class:`~unialign_train.fuse.modules.CrossLayer`), a binary head on the pooled
  streams and a token head on every word piece (a word counts as flagged if any of its pieces is).
  HAMMER's manipulation-type and box heads are left out: boxes need image manipulations of a region,
  and the type follows from the word grounding here.

Scores (:func:`consistency_scores`): ROC AUC and accuracy of "manipulated", each per manipulation type
(AUC of real pairs against that type), expected calibration error, and DGM4's token grounding
precision / recall / F1 over all words of all pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unialign.device import pick_device
from unialign.encoders import load_encoder
from unialign.model import AlignedModel
from unialign.projections import Standardize, make_head

from ..data import DataConfig, load_dataset, make_splits
from ..data.manipulated import KINDS, build_manipulated
from ..data.records import Dataset
from ..evaluate.metrics import binary_auc, expected_calibration_error, precision_recall_f1
from ..features.cache import Cached, ExtractConfig, cache_features
from .modules import CrossLayer, masked_mean
from .tokens import TokenBatch, TokenStore, extract_tokens
from .train import FuseConfig, Trained, fit, fit_token_standardizers

Log = Callable[[str], None]


@dataclass
class Pairs:
    """Manipulated pairs prepared for the detectors: per pair its part, whether it is manipulated, its
    kind, its caption's words and which are manipulated, and its rows in the image and text token stores."""

    dataset: Dataset
    parts: dict[str, np.ndarray]
    fake: np.ndarray
    kind: np.ndarray
    words: list[list[str]]
    fake_words: list[list[int]]
    image_concept: np.ndarray
    text_concept: np.ndarray
    tokens: dict[str, TokenStore]
    token_rows: dict[str, np.ndarray]

    @classmethod
    def build(cls, ds: Dataset, tokens: Mapping[str, TokenStore] | None = None) -> "Pairs":
        recs = ds.records
        parts = {p: np.asarray([i for i, r in enumerate(recs) if r["part"] == p], dtype=np.int64)
                 for p in dict.fromkeys(r["part"] for r in recs)}
        captions = [r["text"][0] for r in recs]
        rows = {}
        for m, store in (tokens or {}).items():
            items = [ds.items(i, "image")[0] for i in range(len(ds))] if m == "image" else captions
            rows[m] = store.rows(items)
        return cls(ds, parts, np.asarray([bool(r["fake"]) for r in recs]), np.asarray([r["manipulation"] for r in recs]),
                   [c.split() for c in captions], [list(r["fake_words"]) for r in recs],
                   np.asarray([r["image_concept"] for r in recs]), np.asarray([r["text_concept"] for r in recs]),
                   dict(tokens or {}), rows)

    def word_labels(self, idx: Sequence[int]) -> list[np.ndarray]:
        return [np.isin(np.arange(len(self.words[i])), self.fake_words[i]) for i in idx]


# -- calibration -----------------------------------------------------------------------------------------
def fit_platt(scores: Sequence[float], labels: Sequence[bool], l2: float = 1e-4, iters: int = 100) -> tuple[float, float]:
    """(a, b) of ``P(label) = sigmoid(a * score + b)`` by Newton's method on the log-likelihood (float64,
    a tiny ridge so that separable data stays finite)."""
    x, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    w = np.zeros(2)
    X = np.stack([x, np.ones_like(x)], 1)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(w[0]), float(w[1])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


# -- zero-shot ---------------------------------------------------------------------------------------------
def aligned_similarity(model: AlignedModel, cached: Cached, idx: Sequence[int]) -> np.ndarray:
    """Cosine of each pair's image and caption embeddings in the model's shared space."""
    img, kept_i = cached["image"].record_features(idx)
    txt, kept_t = cached["text"].record_features(idx)
    if len(kept_i) != len(idx) or len(kept_t) != len(idx):
        raise ValueError("every pair needs an image and a caption feature")
    return (model.project("image", img) * model.project("text", txt)).sum(1).numpy().astype(np.float64)


def calibrate_match(model: AlignedModel, similarity: Sequence[float], match: Sequence[bool], source: str = "") -> dict[str, Any]:
    """Fit ``P(match) = sigmoid(a * cos + b)`` on validation pairs and keep it in ``model.info["match"]``
    (saved with the model; what :meth:`AlignedModel.match` reads)."""
    a, b = fit_platt(similarity, match)
    cal = {"a": a, "b": b, "n_pairs": int(len(match)), "fitted_on": source}
    model.info["match"] = cal
    return cal


def occlusion_gains(model: AlignedModel, image_emb: torch.Tensor, words: Sequence[Sequence[str]],
                    batch_size: int = 256) -> list[np.ndarray]:
    """Per pair and word: the similarity with the word deleted minus the similarity with the caption."""
    variants, owner = [], []
    for k, ws in enumerate(words):
        variants.append(" ".join(ws))
        owner.append(k)
        for j in range(len(ws)):
            variants.append(" ".join(ws[:j] + ws[j + 1:]))
            owner.append(k)
    emb = model.encode(variants, "text", batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    sims = (emb.cpu() * image_emb[torch.as_tensor(owner)]).sum(1).numpy()
    out, s = [], 0
    for ws in words:
        out.append(sims[s + 1 : s + 1 + len(ws)] - sims[s])
        s += 1 + len(ws)
    return out


def zero_shot(model: AlignedModel, cached: Cached, pairs: Pairs, calibrate: bool = True,
              log: Log = print) -> dict[str, Any]:
    """The zero-shot detector: Platt calibration and the occlusion margin fitted on the ``val`` pairs,
    scored on the ``test`` pairs. With ``calibrate`` the calibration is kept in ``model.info``."""
    out: dict[str, Any] = {}
    for part in ("val", "test"):
        idx = pairs.parts[part]
        sim = aligned_similarity(model, cached, idx)
        img, _ = cached["image"].record_features(idx)
        gains = occlusion_gains(model, model.project("image", img), [pairs.words[i] for i in idx])
        out[part] = (idx, sim, gains)
    vidx, vsim, vgains = out["val"]
    a, b = fit_platt(vsim, ~pairs.fake[vidx])
    if calibrate:
        calibrate_match(model, vsim, ~pairs.fake[vidx], f"{pairs.dataset.name} val")
    p_fake_val = 1.0 - sigmoid(a * vsim + b)
    margin = best_margin(vgains, p_fake_val > 0.5, pairs.word_labels(vidx))
    tidx, tsim, tgains = out["test"]
    p_fake = 1.0 - sigmoid(a * tsim + b)
    flagged = [(g > margin) & (p > 0.5) for g, p in zip(tgains, p_fake)]
    log(f"zero-shot: P(match) = sigmoid({a:.3g} cos + {b:.3g}) from {len(vidx)} validation pairs; word margin {margin:.3g}")
    return {**consistency_scores(pairs, tidx, p_fake, -tsim, flagged), "calibration": {"a": a, "b": b},
            "word_margin": float(margin)}


def best_margin(gains: Sequence[np.ndarray], judged_fake: np.ndarray, labels: Sequence[np.ndarray]) -> float:
    """The occlusion margin with the best word F1 on validation pairs (flagged: judged manipulated and
    gain above the margin)."""
    allg = np.concatenate([g for g in gains]) if gains else np.zeros(0)
    truth = np.concatenate(labels) if labels else np.zeros(0, bool)
    judged = np.concatenate([np.full(len(g), j) for g, j in zip(gains, judged_fake)]) if gains else np.zeros(0, bool)
    best, best_f1 = 0.0, -1.0
    for m in np.unique(np.quantile(allg, np.linspace(0, 1, 101))) if len(allg) else [0.0]:
        f1 = precision_recall_f1(judged & (allg > m), truth)["f1"]
        if not math.isnan(f1) and f1 > best_f1:
            best, best_f1 = float(m), f1
    return best


# -- HAMMER-lite -------------------------------------------------------------------------------------------
class HammerLite(nn.Module):
    """Manipulation detection and word grounding over two frozen encoders' tokens (see the module doc)."""

    def __init__(self, image_dim: int, text_dim: int, width: int = 128, depth: int = 2, heads: int = 4,
                 embed: int = 64, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.image_in = nn.Sequential(Standardize(image_dim), nn.LayerNorm(image_dim), nn.Linear(image_dim, width))
        self.text_in = nn.Sequential(Standardize(text_dim), nn.LayerNorm(text_dim), nn.Linear(text_dim, width))
        self.image_embed, self.text_embed = nn.Linear(width, embed), nn.Linear(width, embed)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.layers = nn.ModuleList(CrossLayer(["image", "text"], width, heads, dropout) for _ in range(depth))
        self.binary = make_head("mlp", 2 * width, 1, hidden=hidden, dropout=dropout)
        self.token = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))

    def forward(self, image: TokenBatch, text: TokenBatch) -> dict[str, torch.Tensor]:
        x = {"image": self.image_in(image.layers[-1]), "text": self.text_in(text.layers[-1])}
        mask = {"image": image.mask, "text": text.mask}
        emb = {"image": F.normalize(self.image_embed(masked_mean(x["image"], mask["image"])), dim=-1),
               "text": F.normalize(self.text_embed(masked_mean(x["text"], mask["text"])), dim=-1)}
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.cat([masked_mean(x["image"], mask["image"]), masked_mean(x["text"], mask["text"])], 1)
        return {"fake": self.binary(pooled)[:, 0], "tokens": self.token(x["text"])[..., 0],
                "image_emb": emb["image"], "text_emb": emb["text"]}

    def token_standardizers(self) -> list[tuple[str, int, Standardize]]:
        return [("image", -1, self.image_in[0]), ("text", -1, self.text_in[0])]

    def mac_loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
        """Manipulation-aware contrastive loss: soft cross-entropy of image->text and text->image
        similarities against ``positive`` (B, B) (image i shows the concept caption j names), over the
        rows and columns that have a positive."""
        logits = self.log_scale.clamp(0, math.log(100)).exp() * image_emb @ text_emb.T
        losses = []
        for lg, pos in ((logits, positive), (logits.T, positive.T)):
            keep = pos.any(1)
            if keep.any():
                target = pos[keep].float() / pos[keep].sum(1, keepdim=True)
                losses.append(-(target * F.log_softmax(lg[keep], 1)).sum(1).mean())
        return torch.stack(losses).mean() if losses else logits.sum() * 0


def hammer_batch(pairs: Pairs, idx: np.ndarray) -> tuple[TokenBatch, TokenBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image and text tokens of pairs ``idx``, whether each is manipulated, each piece's label (B, T)
    and the (B, B) MAC positives."""
    image = pairs.tokens["image"].gather(pairs.token_rows["image"][idx], layers=[pairs.tokens["image"].layers[-1]])
    text = pairs.tokens["text"].gather(pairs.token_rows["text"][idx], layers=[pairs.tokens["text"].layers[-1]])
    n_words = max(1, max(len(pairs.words[i]) for i in idx))
    fake_word = torch.zeros(len(idx), n_words + 1, dtype=torch.bool)  # last column: "no word"
    for k, i in enumerate(idx):
        fake_word[k, pairs.fake_words[i]] = True
    w = text.words.clamp(min=-1)
    piece = torch.gather(fake_word, 1, torch.where(w >= 0, w, torch.full_like(w, n_words)))
    ic, tc = pairs.image_concept[idx], pairs.text_concept[idx]
    positive = torch.from_numpy((ic[:, None] == tc[None, :]) & (tc[None, :] != ""))
    return image, text, torch.from_numpy(pairs.fake[idx]).float(), piece.float(), positive


def hammer_outputs(model: HammerLite, pairs: Pairs, idx: Sequence[int], batch_size: int = 256,
                   device: torch.device | str = "cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """(manipulation logits, per pair each word's probability of being manipulated: the max over its pieces)."""
    model.eval().to(device)
    idx = np.asarray(idx, dtype=np.int64)
    logits, words = [], []
    with torch.no_grad():
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            image, text, *_ = hammer_batch(pairs, part)
            out = model(_to(image, device), _to(text, device))
            logits.append(out["fake"].float().cpu().numpy())
            probs = torch.sigmoid(out["tokens"].float()).cpu().numpy()
            for k, i in enumerate(part):
                w = text.words[k].numpy()
                per = np.zeros(len(pairs.words[i]))
                for j in range(len(per)):
                    hit = w == j
                    per[j] = probs[k][hit].max() if hit.any() else 0.0
                words.append(per)
    return (np.concatenate(logits) if logits else np.zeros(0)), words


def _to(t: TokenBatch, device: torch.device | str) -> TokenBatch:
    return TokenBatch([x.to(device) for x in t.layers], t.mask.to(device), t.words.to(device))


def train_hammer(pairs: Pairs, cfg: FuseConfig, mac_weight: float = 1.0, log: Log | None = None) -> Trained:
    """Train HAMMER-lite on the ``train`` pairs; early stopping on the mean of validation AUC and word F1."""
    image_dim, text_dim = pairs.tokens["image"].dims[-1], pairs.tokens["text"].dims[-1]
    torch.manual_seed(cfg.seed)
    model = HammerLite(image_dim, text_dim, cfg.width, cfg.depth, cfg.heads, hidden=cfg.hidden, dropout=cfg.dropout)
    train = pairs.parts["train"]
    fit_token_standardizers(model, pairs.tokens, {m: r[train] for m, r in pairs.token_rows.items()}, cfg.seed)
    device = pick_device(cfg.device)

    def step_loss(idx: np.ndarray, epoch: int, k: int) -> torch.Tensor:
        image, text, fake, piece, positive = hammer_batch(pairs, idx)
        out = model(_to(image, device), _to(text, device))
        real = text.mask.to(device)
        token = F.binary_cross_entropy_with_logits(out["tokens"][real], piece.to(device)[real])
        mac = model.mac_loss(out["image_emb"], out["text_emb"], positive.to(device))
        return F.binary_cross_entropy_with_logits(out["fake"], fake.to(device)) + token + mac_weight * mac

    def validate(mod: nn.Module) -> float:
        idx = pairs.parts["val"]
        logits, words = hammer_outputs(mod, pairs, idx, device=device)
        f1 = precision_recall_f1(np.concatenate([w > 0.5 for w in words]), np.concatenate(pairs.word_labels(idx)))["f1"]
        return (binary_auc(logits, pairs.fake[idx]) + (0.0 if math.isnan(f1) else f1)) / 2

    return fit(model, pairs.parts["train"], step_loss, validate, cfg, log=log)


def hammer_scores(model: HammerLite, pairs: Pairs, device: torch.device | str = "cpu") -> dict[str, Any]:
    """HAMMER-lite on the ``test`` pairs, its probability Platt-calibrated on the ``val`` pairs (as the
    zero-shot detector's is), so accuracy at 1/2 and calibration compare like for like."""
    vidx, tidx = pairs.parts["val"], pairs.parts["test"]
    vlog, _ = hammer_outputs(model, pairs, vidx, device=device)
    a, b = fit_platt(vlog, pairs.fake[vidx])
    tlog, words = hammer_outputs(model, pairs, tidx, device=device)
    return {**consistency_scores(pairs, tidx, sigmoid(a * tlog + b), tlog, [w > 0.5 for w in words]),
            "calibration": {"a": a, "b": b}}


def consistency_scores(pairs: Pairs, idx: np.ndarray, p_fake: np.ndarray, score: np.ndarray,
                       flagged: Sequence[np.ndarray]) -> dict[str, Any]:
    """Detection (AUC of ``score``, accuracy of ``p_fake`` > 1/2, ECE of ``p_fake``), per manipulation type,
    and word grounding (precision / recall / F1 over all words; per type; words flagged in pairs whose
    caption is untouched)."""
    fake, kind = pairs.fake[idx], pairs.kind[idx]
    labels = pairs.word_labels(idx)
    pred = p_fake > 0.5
    out: dict[str, Any] = {"n": int(len(idx)), "fake_fraction": float(fake.mean()), "auc": binary_auc(score, fake),
                           "accuracy": float((pred == fake).mean()), "ece": expected_calibration_error(p_fake, fake),
                           "words": precision_recall_f1(np.concatenate(flagged), np.concatenate(labels)),
                           "by_type": {}}
    real = kind == "real"
    for k in KINDS:
        sel = kind == k
        if not sel.any():
            continue
        row: dict[str, Any] = {"n": int(sel.sum()), "accuracy": float((pred[sel] == fake[sel]).mean()),
                               "flagged_words": float(np.mean(np.concatenate([flagged[j] for j in np.flatnonzero(sel)])))}
        if k != "real":
            both = real | sel
            row["auc"] = binary_auc(score[both], fake[both])
            row["words"] = precision_recall_f1(np.concatenate([flagged[j] for j in np.flatnonzero(sel)]),
                                               np.concatenate([labels[j] for j in np.flatnonzero(sel)]))
        out["by_type"][k] = row
    return out


# -- the stage ---------------------------------------------------------------------------------------------
def load_pairs(model: AlignedModel, dataset: str, protocol: DataConfig, encoders: Mapping[str, str],
               extract: ExtractConfig, seed: int = 0, device: str = "auto", log: Log = print) -> tuple[Pairs, Cached]:
    """Manipulated pairs of the protocol's parts (:func:`build_manipulated`, ``seed``), the aligned
    model's raw features of them (``cache_features``) and the token stores HAMMER-lite reads (of
    ``encoders``: the image tokens are those of the records' images, shared with the fusion tasks)."""
    ds = load_dataset(dataset)
    splits = make_splits(ds, protocol)
    pairs_ds = build_manipulated(ds, {"train": splits.train, "val": splits.val, "test": splits.test}, seed)
    log(f"{pairs_ds.name}: {len(pairs_ds)} pairs {pairs_ds.meta['counts']}")
    cached = cache_features(pairs_ds, {m: model.encoders[m] for m in ("image", "text")}, model.layers, extract, log)
    stores = {}
    for m in ("image", "text"):
        enc = load_encoder(encoders[m], device=device, backend="torch")
        stores[m] = extract_tokens(pairs_ds.unique_items(m), enc, m, batch_size=extract.batch_size, log=log)
    return Pairs.build(pairs_ds, stores), cached


def run_consistency(model: AlignedModel, pairs: Pairs, cached: Cached, seeds: Sequence[int], cfg: FuseConfig,
                    calibrate: bool = True, log: Log = print,
                    after_seed: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """The zero-shot detector (deterministic) and HAMMER-lite trained once per seed (none: left out), on the
    test pairs. ``after_seed(result so far)`` is called after each seed (to save partial results); training
    stops early when it returns False."""
    out: dict[str, Any] = {"zero-shot (aligned space)": [zero_shot(model, cached, pairs, calibrate, log)]}
    meta: list[dict[str, Any]] = []
    result = {"results": out, "training": meta, "counts": pairs.dataset.meta["counts"]}
    for seed in seeds:
        t = train_hammer(pairs, cfg.model_copy(update={"seed": seed}))
        out.setdefault("HAMMER-lite", []).append(hammer_scores(t.model, pairs))
        meta.append({"seed": seed, "parameters": t.parameters, "seconds": round(t.seconds, 1), "epochs": t.epochs,
                     "best_epoch": t.best_epoch})
        log(f"HAMMER-lite seed {seed}: AUC {out['HAMMER-lite'][-1]['auc']:.3f}, word F1 "
            f"{out['HAMMER-lite'][-1]['words']['f1']:.3f} ({t.seconds:.0f}s, {t.parameters:,} parameters)")
        if after_seed is not None and after_seed(result) is False:
            break
    return result


__all__ = ["HammerLite", "Pairs", "aligned_similarity", "best_margin", "calibrate_match", "consistency_scores",
           "fit_platt", "hammer_outputs", "hammer_scores", "load_pairs", "occlusion_gains", "run_consistency", "train_hammer", "zero_shot"]
