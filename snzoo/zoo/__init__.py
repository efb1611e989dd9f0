"""The zoo: every published checkpoint as a typed entry, read from the weights manifest, and lookups of names.

The manifest is the shipped `weights_manifest.json` plus an optional user overlay (`set_overlay`, the CLI's
`--manifest`, or `SNZOO_MANIFEST`).
"""

from snzoo.zoo._lookups import MANIFEST_ENV, get_entry, list_models, manifest, set_overlay
from snzoo.zoo._manifest import SCHEMA_VERSION, Manifest, load_manifest, manifest_schema
from snzoo.zoo.entry import Entry, EvalConfig, Metrics, NormConfig, Source
from snzoo.zoo.tables import zoo_table_markdown

__all__ = [
    "MANIFEST_ENV", "SCHEMA_VERSION", "Entry", "EvalConfig", "Manifest", "Metrics", "NormConfig", "Source",
    "get_entry", "list_models", "load_manifest", "manifest", "manifest_schema", "set_overlay", "zoo_table_markdown",
]
