"""Typed run configuration: every field has a default, and every bad value is reported by its dotted
name with what is accepted (``train.lr: expected a number, got 'fast'``).

A config file is YAML or TOML with the sections below; anything left out keeps its default.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .align.train import TrainConfig
from .errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "emoji"  # "emoji", a table (.csv/.jsonl/.parquet), an image folder, or a saved dataset
    # None: the dataset's default (emoji: train on google+twitter+openmoji, test on apple; others: all)
    train_styles: list[str] | None = None
    test_styles: list[str] | None = None
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train / val / test concepts
    split_seed: int = 0
    max_train_concepts: int | None = None  # low-data runs: keep only this many training concepts
    subset: str | None = None  # a subset file from `unialign curate`: train only on these dataset rows


@dataclass
class EncoderConfig:
    image: str = "effnet-lite0?image_size=128"
    text: str = "st:all-MiniLM-L6-v2"
    image_layers: list[str] = field(default_factory=lambda: ["final"])
    text_layers: list[str] = field(default_factory=lambda: ["final"])
    batch_size: int = 64
    dtype: str = "float16"
    num_workers: int | None = None
    strict: bool = False


@dataclass
class EvalConfig:
    templates: str = "emoji"
    fashion_mnist: bool = True
    fashion_templates: str = "photo"
    fashion_mnist_limit: int | None = None  # evaluate on a class-balanced subset of this many test images
    retrieval_ks: list[int] = field(default_factory=lambda: [1, 5, 10])


@dataclass
class RunConfig:
    name: str = "default"
    output: str = "runs/default"
    recipe: str = "unialign"
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's TrainConfig / aligner
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML/TOML (or nothing: the built-in default) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
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
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, last = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    cfg = from_dict(RunConfig, raw)
    validate_train_overrides(cfg.train)
    validate_choices(cfg)
    return cfg


def from_dict(cls: type, raw: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking names and types field by field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where + '.' if where else ''}{unknown[0]}: unknown option; accepted: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where + '.' if where else ''}{name}") for name, value in raw.items()}
    return cls(**kwargs)


# scalar type -> (accepted Python types, how the error names it); bools are never ints or floats here
_SCALARS: dict[type, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"), int: ((int,), "an integer"),
    float: ((int, float), "a number"), str: ((str,), "a string"),
}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_t = args[0] if args else Any
        return [_coerce(item_t, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        accepted, what = _SCALARS[tp]
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {what}, got {value!r}")
        return float(value) if tp is float else value
    return value


def validate_train_overrides(train: dict[str, Any]) -> None:
    """``train`` overrides either TrainConfig fields or closed-form parameters (``params``)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {"params"}
    unknown = sorted(set(train) - names)
    if unknown:
        raise ConfigError(f"train.{unknown[0]}: unknown option; accepted: {', '.join(sorted(names))}")


def validate_choices(cfg: RunConfig) -> None:
    """Check every option with a fixed set of values or a range, and the types of ``train`` overrides,
    before any data or model is loaded: a typo fails in a second, naming the option and what it accepts."""
    import re

    from .align.heads import HEADS
    from .align.losses import LOSSES
    from .align.recipes import RECIPES
    from .data.splits import _check_fractions
    from .evaluate.templates import TEMPLATES

    def one_of(name: str, value: Any, accepted: Any) -> None:
        if value not in accepted:
            raise ConfigError(f"{name}: {value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")

    def at_least(name: str, value: Any, low: int) -> None:
        if value is not None and value < low:
            raise ConfigError(f"{name}: expected an integer >= {low}, got {value!r}")

    one_of("recipe", cfg.recipe, list(RECIPES))
    if not isinstance(cfg.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"device: {cfg.device!r} is not accepted; accepted: auto, cpu, cuda, cuda:<n>, mps")
    one_of("encoders.dtype", cfg.encoders.dtype, ["float16", "float32"])
    at_least("encoders.batch_size", cfg.encoders.batch_size, 1)
    at_least("encoders.num_workers", cfg.encoders.num_workers, 0)
    at_least("data.max_train_concepts", cfg.data.max_train_concepts, 1)
    at_least("eval.fashion_mnist_limit", cfg.eval.fashion_mnist_limit, 1)
    for k in cfg.eval.retrieval_ks:
        at_least("eval.retrieval_ks", k, 1)
    one_of("eval.templates", cfg.eval.templates, sorted(TEMPLATES))
    one_of("eval.fashion_templates", cfg.eval.fashion_templates, sorted(TEMPLATES))
    try:
        _check_fractions(cfg.data.split)
    except ConfigError as e:
        raise ConfigError(f"data.split: {e}") from None
    tc = from_dict(TrainConfig, {k: v for k, v in cfg.train.items() if k != "params"}, "train")
    for name in ("head", "text_head"):
        if name in cfg.train and cfg.train[name] is not None:
            one_of(f"train.{name}", cfg.train[name], sorted(HEADS))
    if "loss" in cfg.train:
        one_of("train.loss", tc.loss, sorted(LOSSES))
    one_of("train.sampling", tc.sampling, ["global", "chunked"])
    one_of("train.distributed", tc.distributed, ["auto", "off"])
    for name in ("dim", "batch_size", "captions_per_step", "structure_levels", "chunk_size", "shuffle_chunks"):
        at_least(f"train.{name}", getattr(tc, name), 1)
    for name in ("epochs", "warmup_steps", "eval_every", "patience", "checkpoint_every"):
        at_least(f"train.{name}", getattr(tc, name), 0)
    at_least("train.max_steps", tc.max_steps, 1)
    if not tc.lr > 0:
        raise ConfigError(f"train.lr: expected a number > 0, got {tc.lr!r}")
    if "params" in cfg.train and not isinstance(cfg.train["params"], dict):
        raise ConfigError(f"train.params: expected a mapping, got {cfg.train['params']!r}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
