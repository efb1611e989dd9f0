"""Pretrained weights: where they are cached and how an entry's state dict is obtained."""

from snzoo.weights.cache import cache_dir, cache_path
from snzoo.weights.resolve import cached_weights_file, load_entry_state_dict

__all__ = ["cache_dir", "cache_path", "cached_weights_file", "load_entry_state_dict"]
