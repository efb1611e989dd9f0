"""Pretrained weights: sources, download, verification, conversion and the cache."""

from snzoo.weights.cache import cache_dir, cache_path
from snzoo.weights.fetch import UnpinnedWeightsWarning, fetch_weights, find_cached
from snzoo.weights.resolve import load_entry_state_dict

__all__ = ["cache_dir", "cache_path", "fetch_weights", "find_cached", "load_entry_state_dict", "UnpinnedWeightsWarning"]
