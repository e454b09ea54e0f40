"""Named recipes: the published methods and unialign's own default, as data.

A recipe is either a set of TrainConfig overrides (a head, a loss, a schedule) trained by the one loop
in ``train.py``, or a closed-form aligner with its parameters. Users override any field on top.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigError
from .train import TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (trained recipes)
    closed_form: str | None = None  # aligner name (training-free recipes)
    params: dict[str, Any] = field(default_factory=dict)  # aligner parameters

    @property
    def trained(self) -> bool:
        return self.closed_form is None


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    # Chosen on validation concepts in a held-out *training* style (train on two of google/twitter/openmoji,
    # score the validation concepts in the third, average the three rotations; benchmarks/tune_unialign.py,
    # docs/recipes.md) by the early-stopping score, mean of top-1 and top-5: anchor representations
    # generalised to an unseen style far better than every trained head tried (17-20% vs 10-13% top-1), and
    # projecting images off the directions in which one concept's images differ across styles added 1-3
    # points top-1 and 3-5 top-5 at every (k, p) tried. Test numbers played no part in the choice.
    Recipe("unialign", "unialign's default: centred ASIF anchor representations over every training "
           "(image, caption) pair (k=400, p=4) after projecting images off the 32 directions in which "
           "images of one concept differ (drawing style), chosen on style-held-out validation",
           closed_form="asif", params={"k": 400, "p": 4.0, "center": True, "nuisance_rank": 32}),
    Recipe("linear", "LiT-style linear heads + symmetric InfoNCE (learnable temperature)",
           {"head": "linear", "loss": "infonce"}),
    Recipe("mlp", "two-layer GELU MLP heads + InfoNCE", {"head": "mlp", "loss": "infonce"}),
    Recipe("sail", "SAIL: gated star/GLU heads (8x), SigLIP loss (scale 20, bias -10), multi-positive captions",
           {"head": "star", "loss": "siglip", "captions_per_step": 2, "dim": 512, "weight_decay": 1e-4,
            "betas": (0.9, 0.95)}),
    Recipe("structure", "STRUCTURE: linear heads + InfoNCE + neighbourhood-geometry regulariser (lambda 10, L=1)",
           {"head": "linear", "loss": "infonce", "dim": 512, "structure_lambda": 10.0, "structure_levels": 1,
            "structure_tau": 0.05, "structure_warmup": 1000, "weight_decay": 1e-4, "betas": (0.9, 0.95)}),
    Recipe("freeze-align", "Freeze-Align: residual LayerNorm/GELU projector + InfoNCE, AdamW lr 1e-3 wd 0.02",
           {"head": "residual", "loss": "infonce", "dim": 512, "lr": 1e-3, "weight_decay": 0.02}),
    Recipe("layermix", "ManagerTower-style layer mixing of several extracted layers, linear inner head",
           {"head": "layermix", "text_head": "linear", "loss": "infonce"}),
    Recipe("asif", "ASIF: training-free relative representations over anchor pairs (k=800, p=8, centred)",
           closed_form="asif", params={"k": 800, "p": 8.0, "center": True}),
    Recipe("relative", "relative representations (ASIF without sparsification)", closed_form="relative"),
    Recipe("procrustes", "orthogonal Procrustes after PCA to a common dimension", closed_form="procrustes"),
    Recipe("lstsq", "ridge least squares from image to text space", closed_form="lstsq"),
    Recipe("cca", "regularised canonical correlation analysis", closed_form="cca"),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return RECIPES[name]


def train_config(recipe: Recipe, overrides: dict[str, Any] | None = None, **fixed: Any) -> TrainConfig:
    """The recipe's TrainConfig with user overrides (``params`` excluded) and fixed fields applied."""
    valid = {f.name for f in fields(TrainConfig)}
    merged = {**recipe.train, **{k: v for k, v in (overrides or {}).items() if k != "params"}, **fixed}
    bad = sorted(set(merged) - valid)
    if bad:
        raise ConfigError(f"train.{bad[0]}: unknown option; accepted: {', '.join(sorted(valid))}")
    if "betas" in merged:
        merged["betas"] = tuple(merged["betas"])
    return replace(TrainConfig(), **merged)
