"""Data: modality presets and preprocessing, the preprocessed-volume cache, label splits, the demo dataset."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
