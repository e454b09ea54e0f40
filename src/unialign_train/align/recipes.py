"""Named recipes: the published methods and unialign's own default, as data files (``recipes/*.yaml``).

A recipe is either a set of :class:`~unialign_train.align.loop.TrainConfig` overrides (a head, a loss,
a schedule) trained by the one loop, or a closed-form aligner with its parameters. Users override any
field on top (``--set train.lr=0.002``, ``--set train.k=200``), and those overrides are validated
against what the recipe is: loop hyper-parameters for trained recipes, the aligner's parameters for
closed-form ones. A new recipe is a new YAML file, not code.
"""
from __future__ import annotations

import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from unialign.errors import ConfigError

from ..validate import describe
from .closed_form import CLOSED_FORM, ClosedFormConfigError, make_closed_form
from .hybrid import AnchorInput, Fuse
from .loop import TrainConfig
from .unpaired import Unpaired

RECIPE_DIR = Path(__file__).parent / "recipes"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig overrides (trained recipes)")
    closed_form: str | None = Field(None, description="aligner name (training-free recipes)")
    params: dict[str, Any] = Field(default_factory=dict, description="aligner parameters")
    anchor_input: AnchorInput | None = Field(None, description="trained recipes: heads read this closed-form map's "
                                                              "outputs (hybrid.py)")
    fuse: Fuse | None = Field(None, description="trained recipes: score fusion with a closed-form recipe, weight "
                                                "chosen on validation (hybrid.py)")
    unpaired: Unpaired | None = Field(None, description="closed-form recipes: pseudo-pairs from unpaired data refine "
                                                        "the map (unpaired.py)")

    @property
    def trained(self) -> bool:
        return self.closed_form is None

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        if self.closed_form is not None:
            if self.closed_form not in CLOSED_FORM:
                raise ValueError(f"closed_form {self.closed_form!r} is not one of {', '.join(CLOSED_FORM)}")
            if self.train:
                raise ValueError("a closed-form recipe has params, not train settings")
            if self.anchor_input is not None or self.fuse is not None:
                raise ValueError("anchor_input and fuse combine a *trained* recipe with a closed-form map")
            make_closed_form(self.closed_form, **self.params)
        else:
            if self.unpaired is not None:
                raise ValueError("unpaired refines a closed-form map; this recipe is trained")
            if self.params:
                raise ValueError("a trained recipe has train settings, not params")
            TrainConfig.model_validate(self.train)
        return self


@lru_cache(maxsize=1)
def _load_recipes() -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for f in sorted(RECIPE_DIR.glob("*.yaml"), key=lambda p: (p.stem != "unialign", p.stem)):
        try:
            r = Recipe.model_validate(yaml.safe_load(f.read_text(encoding="utf-8")))
        except (ValidationError, ClosedFormConfigError, yaml.YAMLError) as e:
            raise ConfigError(f"recipe file {f.name} is invalid: {' '.join(str(e).split())}") from None
        if r.name != f.stem:
            raise ConfigError(f"recipe file {f.name} names itself {r.name!r}; a recipe's name is its file name")
        out[r.name] = r
    return out


RECIPES: dict[str, Recipe] = _load_recipes()


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"recipe: unknown recipe {name!r}; accepted: {', '.join(RECIPES)}")
    return RECIPES[name]


def train_config(recipe: Recipe, overrides: dict[str, Any] | None = None, **fixed: Any) -> TrainConfig:
    """The recipe's TrainConfig with user overrides and fixed fields applied, validated."""
    try:
        return TrainConfig.model_validate({**recipe.train, **(overrides or {}), **fixed})
    except ValidationError as e:
        raise ConfigError(describe(e, "train")) from None


def closed_form_params(recipe: Recipe, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe's aligner parameters with user overrides, checked by the aligner itself."""
    params = {**recipe.params, **(overrides or {})}
    accepted = [p for p in inspect.signature(CLOSED_FORM[recipe.closed_form].__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"train.{unknown[0]}: not a parameter of {recipe.closed_form} (recipe {recipe.name}); "
                          f"accepted: {', '.join(accepted)}")
    for key in [k for k in params if k in (overrides or {})] or [None]:  # blame the override that breaks it
        try:
            make_closed_form(recipe.closed_form, **({**recipe.params, key: params[key]} if key else params))
        except ClosedFormConfigError as e:
            raise ConfigError(f"train{'.' + key if key else ''}: {e}") from None
    return params


__all__ = ["RECIPES", "Recipe", "closed_form_params", "get_recipe", "train_config"]
