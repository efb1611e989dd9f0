"""Pretrained weights as bytes and state dicts: sources, downloads, checksums, the cache, canonical files.

This package knows zoo entries (where a file comes from, what it must hash to) but imports nothing from
`snzoo.models`: a fetched state dict is checked against its architecture through `Entry.check_state_dict`.
"""

from snzoo.errors import UnpinnedWeightsWarning
from snzoo.weights.cache import cache_dir, cache_files, cache_path, clean_cache
from snzoo.weights.convert import read_record, write_safetensors
from snzoo.weights.download import Digests, hash_file
from snzoo.weights.files import fetch_file
from snzoo.weights.layouts import (
    DETECTRON,
    detectron_to_snzoo,
    is_detectron_layout,
    save_detectron_checkpoint,
    snzoo_to_detectron,
)
from snzoo.weights.fetch import cached_canonical, fetch_weights, find_cached, require_pinned_default
from snzoo.weights.pins import check_digests, is_pinned
from snzoo.weights.sources import hub_download, offline_mode, parse_hub_repo
from snzoo.weights.state_dict import CHECKPOINT_SUFFIXES, MODEL_FOLDER_PREFIXES, names_a_file, read_state_dict, strip_prefix

__all__ = [
    "CHECKPOINT_SUFFIXES", "DETECTRON", "MODEL_FOLDER_PREFIXES", "detectron_to_snzoo", "is_detectron_layout", "names_a_file",
    "save_detectron_checkpoint", "snzoo_to_detectron", "Digests", "UnpinnedWeightsWarning", "cache_dir", "cache_files", "cache_path",
    "cached_canonical", "check_digests", "clean_cache", "fetch_file", "fetch_weights", "find_cached", "hash_file",
    "hub_download", "is_pinned", "offline_mode", "parse_hub_repo", "read_record", "read_state_dict",
    "require_pinned_default", "strip_prefix", "write_safetensors",
]
