"""Fusion: supervised heads over two or more frozen encoders (late fusion, concat-MLP, ManagerTower
managers, BridgeTower bridges, MM-Lego blocks), and image-text consistency detection (DGM4 / HAMMER).

:mod:`.tokens` extracts token-level features (word pieces, feature-map positions) through the encoders'
own forward pass; :mod:`.data` prepares a target from the records' metadata; :mod:`.modules` holds the
fusion modules; :mod:`.train` the loop; :mod:`.run` trains every method on a task; :mod:`.consistency`
the zero-shot and trained manipulation detectors; :mod:`.tables` the result tables.
"""
from .consistency import HammerLite, Pairs, calibrate_match, fit_platt, load_pairs, run_consistency
from .data import FuseData, Target, leak_free_caption, prepare
from .modules import (Batch, Bridge, BridgeFusion, ConcatMLP, CrossLayer, LateFusion, LegoBlock, LegoFuse, LegoMerge,
                      ManagerFusion, merge_latents)
from .run import METHODS, load_fusion_data, run_methods
from .tables import consistency_by_type, consistency_table, fusion_table
from .tokens import TokenStore, extract_tokens
from .train import FuseConfig, evaluate, train_fusion

__all__ = ["Batch", "Bridge", "BridgeFusion", "ConcatMLP", "CrossLayer", "FuseConfig", "FuseData", "HammerLite",
           "LateFusion", "LegoBlock", "LegoFuse", "LegoMerge", "METHODS", "ManagerFusion", "Pairs", "Target", "TokenStore",
           "calibrate_match", "consistency_by_type", "consistency_table", "evaluate", "extract_tokens", "fit_platt",
           "fusion_table", "leak_free_caption", "load_fusion_data", "load_pairs", "merge_latents", "prepare",
           "run_consistency", "run_methods", "train_fusion"]
