"""The run configuration: data, validated by pydantic, with one source of defaults.

The built-in default is the data file ``configs/default.yaml`` inside this package (the emoji job). A
user's YAML or TOML file is merged onto it field by field (mappings merge key by key, ``{}`` empties a
mapping, a ``null`` value inside one such as ``eval.zero_shot_sets`` removes that key; ``layer_weights``
is one value, which a file replaces whole, while ``--set layer_weights.block15=3`` sets one weight), then
``--set a.b=value`` overrides, then everything is validated: types, ranges and choices from the registries
of encoders' modalities, recipes, heads, losses and templates. Every error names the dotted field and what
it accepts (``train.lr: Input should be greater than 0 (got -1)``), in one line, before any data or model
is loaded.

Sections: ``align`` (the two modalities to align), ``data`` (:class:`DataConfig`), ``encoders`` (a spec
per modality), ``layers`` (per modality; ``[final]`` when absent), ``layer_weights`` (how several layers
are joined), ``extract`` (:class:`ExtractConfig`), ``recipe`` + ``train`` (the recipe's settings to
override: loop hyper-parameters of a trained recipe, aligner parameters of a closed-form one), ``eval``
(:class:`EvalConfig`).
"""
from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, field_validator, model_validator

from unialign.encoders.base import FINAL, MODALITIES
from unialign.errors import ConfigError

from .align.recipes import RECIPES, closed_form_params, get_recipe, train_config
from .data.protocol import DataConfig
from .evaluate.tasks import EvalConfig
from .features.cache import ExtractConfig
from .validate import describe, one_of

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class RunConfig(BaseModel):
    """A whole job (``unialign run``); see the module doc for the sections."""

    model_config = ConfigDict(extra="forbid")

    name: str
    output: str
    recipe: Annotated[str, one_of(RECIPES, "recipe", ordered=True)]
    device: str = Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    align: tuple[str, str]
    data: DataConfig
    encoders: dict[str, str]
    layers: dict[str, list[str]]
    # several layers of one modality: each balanced to the same mean centred norm, then these weights
    # (by layer name, others 1); None: raw concatenation (align/layer_weights.py)
    layer_weights: dict[str, PositiveFloat] | None = None
    extract: ExtractConfig
    train: dict[str, Any]
    eval: EvalConfig

    @field_validator("layers", mode="before")
    @classmethod
    def _layer_lists(cls, v: Any) -> Any:
        """``image: auto`` or ``image: last-4,final`` (a string, as ``--set`` gives it) is a one-item or
        comma-separated list; names such as ``last-4`` and ``auto`` are resolved once the encoder is
        loaded (:mod:`unialign_train.select.layer_names`)."""
        if isinstance(v, dict):
            return {m: [s.strip() for s in x.split(",") if s.strip()] if isinstance(x, str) else x for m, x in v.items()}
        return v

    @field_validator("align")
    @classmethod
    def _align(cls, v: tuple[str, str]) -> tuple[str, str]:
        bad = [m for m in v if m not in MODALITIES]
        if bad or v[0] == v[1]:
            raise ValueError(f"two different modalities of {', '.join(MODALITIES)}, e.g. [image, text]")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        for m in self.align:
            if not self.encoders.get(m):
                raise ConfigError(f"encoders.{m}: required, since align is {list(self.align)}")
        for m, layers in self.layers.items():
            if not layers:
                raise ConfigError(f"layers.{m}: give at least one layer, e.g. [final] (got [])")
            if "auto" in layers and len(layers) > 1:
                raise ConfigError(f"layers.{m}: auto (chosen on validation) stands alone, got {layers}")
        recipe = get_recipe(self.recipe)
        if recipe.trained:
            train_config(recipe, self.train)
        else:
            closed_form_params(recipe, self.train)
        return self

    def layers_of(self, modality: str) -> list[str]:
        return list(self.layers.get(modality) or [FINAL])


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or TOML file as a mapping, or one clear error."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        raw = tomllib.loads(text) if p.suffix == ".toml" else (yaml.safe_load(text) or {})
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # YAML messages span lines: keep where and what
        why = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}" if mark is not None else " ".join(str(e).split())
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'YAML'}: {why}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return raw


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` onto ``base``: mappings merge key by key, except that an empty mapping replaces (``{}``
    means none); a ``None`` inside a merged mapping deletes the key."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and v and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        elif v is None and isinstance(out.get(k), dict):
            del out[k]
        else:
            out[k] = copy.deepcopy(v)
    return out


# Top-level fields a user's file replaces instead of merging into: a file's ``layer_weights: {block15: 3}``
# means exactly those weights, not those added to the default's ``{final: 2}``.
WHOLE = ("layer_weights",)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The packaged default, then the YAML/TOML file at ``path``, then dotted ``overrides``, validated."""
    raw = read_config_file(DEFAULT_CONFIG)
    if path is not None:
        user = read_config_file(path)
        raw = merge(raw, user)
        raw.update({k: copy.deepcopy(user[k]) for k in WHOLE if k in user})
    for dotted, value in (overrides or {}).items():
        if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", dotted):
            raise ConfigError(f"--set {dotted}: not a dotted field name such as train.lr")
        *parents, last = dotted.split(".")
        node = raw
        for k in parents:
            if not isinstance(node.get(k, {}), dict):
                raise ConfigError(f"--set {dotted}: {k} is not a section")
            node = node.setdefault(k, {})
        if value is None and isinstance(node.get(last), dict):
            del node[last]
        else:
            node[last] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe(e)) from None


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """A configuration as plain JSON-able data (what run.json and a saved model record)."""
    return cfg.model_dump(mode="json")


__all__ = ["DEFAULT_CONFIG", "RunConfig", "load_config", "merge", "read_config_file", "to_dict"]
