"""The feature store: each frozen encoder runs once over a dataset's items into sharded, memory-mapped,
checksummed, resumable stores (:mod:`.extract`, :mod:`.store`, the Ray executor), and :mod:`.cache`
indexes them by record and modality for the stages after it."""
from .cache import Cached, ExtractConfig, Features, ModalityFeatures, cache_features
from .extract import default_store_path, extract
from .store import FeatureStore

__all__ = ["Cached", "ExtractConfig", "FeatureStore", "Features", "ModalityFeatures", "cache_features",
           "default_store_path", "extract"]
