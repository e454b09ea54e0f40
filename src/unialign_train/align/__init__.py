"""Alignment: training pairs, the training loop and its losses, closed-form aligners, named recipes,
and :func:`fit`, which turns a recipe into one projection module per modality."""
from .closed_form import CLOSED_FORM, ClosedFormAligner, make_closed_form
from .fit import Fitted, fit
from .layer_weights import check_weight_names
from .loop import TrainConfig, TrainResult, train
from .losses import LOSSES, make_loss
from .pairs import Pairs, make_pairs
from .recipes import RECIPES, Recipe, get_recipe, train_config
from .unpaired import unpaired_rows

__all__ = ["CLOSED_FORM", "ClosedFormAligner", "Fitted", "LOSSES", "Pairs", "RECIPES", "Recipe", "TrainConfig",
           "TrainResult", "check_weight_names", "fit", "get_recipe", "make_closed_form", "make_loss", "make_pairs",
           "train", "train_config", "unpaired_rows"]
