"""config.json of a Hugging Face model folder: what to build and how the weights were evaluated.

Written by `export_config` from a zoo entry; read back by `read_config`, which checks it against a JSON Schema
made of the manifest's own definitions of `norm` and `eval`, so a folder and the zoo agree on every field.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Optional

import jsonschema

from snzoo._io import PathLike
from snzoo._json_checks import expected, field_path, parse_json, read_text, show
from snzoo.errors import ModelConfigError, UnknownModelError
from snzoo.models import get_architecture
from snzoo.version import __version__
from snzoo.zoo import Entry, NormConfig, manifest_schema

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
LIBRARY_NAME = "snzoo"

# Licence ids the Hub recognises in a model card; anything else is published as "other" with its name.
_HF_LICENSES = frozenset({
    "apache-2.0", "mit", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0",
    "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cdla-sharing-1.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0", "eupl-1.1",
    "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "isc", "mpl-2.0",
    "odc-by", "odbl", "openrail", "osl-3.0", "postgresql", "ofl-1.1", "ncsa", "unlicense", "zlib", "pddl",
})
def hf_license(license_id: Optional[str]) -> str:
    """The Hub's licence id for an SPDX-style id (`CC-BY-NC-4.0` -> `cc-by-nc-4.0`); `other` or `unknown` else."""
    if not license_id:
        return "unknown"
    lowered = license_id.strip().lower()
    return lowered if lowered in _HF_LICENSES else "other"


def export_config(entry: Entry) -> dict[str, Any]:
    """The config.json of an entry's model folder."""
    ev = entry.eval
    return {
        "library_name": LIBRARY_NAME,
        "architecture": entry.architecture,
        "entry": entry.name,
        "norm": entry.norm.to_dict(),
        "num_classes": entry.num_classes,
        "pretrained_cfg": {"dataset": ev.dataset, "resize": ev.resize, "crop": ev.crop, "crop_pct": ev.crop_pct,
                           "interpolation": ev.interpolation, "mean": list(ev.mean), "std": list(ev.std)},
        "metrics": {k: m.to_dict() for k, m in entry.metrics.items()},
        "license": hf_license(entry.provenance.get("license")),
        "provenance": dict(entry.provenance),
        "snzoo_version": __version__,
    }



_validator: Optional[jsonschema.Draft202012Validator] = None


def _config_validator() -> jsonschema.Draft202012Validator:
    global _validator
    if _validator is None:
        defs = manifest_schema()["$defs"]
        data = copy.deepcopy(defs["eval"])
        data["required"] = ["resize", "crop", "interpolation", "mean", "std"]
        data["properties"]["crop_pct"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 1,
                                          "x-expected": "a number in (0, 1]"}
        _validator = jsonschema.Draft202012Validator({
            "type": "object",
            "required": ["library_name", "architecture", "norm", "num_classes", "pretrained_cfg"],
            "properties": {
                "library_name": {"const": LIBRARY_NAME},
                "architecture": {"type": "string", "x-expected": "an architecture name"},
                "entry": {"type": "string", "x-expected": "a zoo entry name"},
                "norm": defs["norm"],
                "num_classes": {"type": "integer", "minimum": 1, "x-expected": "a positive integer"},
                "pretrained_cfg": data,
                "metrics": {"type": "object"},
                "provenance": {"type": "object"},
            },
        })
    return _validator


def _schema_message(error: jsonschema.ValidationError, where: str) -> str:
    path = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = next((k for k in error.validator_value if k not in error.instance), error.validator_value[0])
        return f"{where}: {CONFIG_NAME} lacks the field '{field_path(path + [missing])}'"
    if path == ["library_name"]:
        return (f"{where}: {CONFIG_NAME} field 'library_name' is {show(error.instance)}, not \"{LIBRARY_NAME}\"; "
                "not an snzoo model folder")
    return f"{where}: {CONFIG_NAME} field '{field_path(path)}' must be {expected(error)}, got {show(error.instance)}"


def read_config(path: PathLike, where: Optional[str] = None) -> dict[str, Any]:
    """Read and check a model folder's config.json; any problem is one ModelConfigError line naming the field."""
    path = Path(path)
    where = where or str(path.parent)
    if not path.is_file():
        raise ModelConfigError(f"{where}: no {CONFIG_NAME}; not an snzoo model folder")
    label = f"{where}: {CONFIG_NAME}"
    config = parse_json(read_text(path, label, "model config", ModelConfigError), label, "model config",
                        ModelConfigError, invalid="is not valid JSON")
    if not isinstance(config, dict):
        raise ModelConfigError(f"{label} holds a {type(config).__name__}, not a JSON object")
    errors = sorted(_config_validator().iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ModelConfigError(_schema_message(errors[0], where))
    try:
        spec = get_architecture(config["architecture"])
    except UnknownModelError as exc:
        raise ModelConfigError(f"{where}: {CONFIG_NAME} field 'architecture': {exc}") from None
    if config["norm"]["type"] != spec.norm:
        raise ModelConfigError(f"{where}: {CONFIG_NAME} field 'norm.type' must be \"{spec.norm}\" for architecture "
                               f"{spec.name}, got {show(config['norm']['type'])}")
    return config


def model_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The builder arguments a checked config describes."""
    return {"num_classes": config["num_classes"], **NormConfig.from_dict(config["norm"]).model_kwargs()}


def pretrained_cfg(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A model's pretrained_cfg from a checked config: keyed like a zoo entry's, plus where it came from."""
    data = dict(config["pretrained_cfg"])
    data.setdefault("crop_pct", data["crop"] / data["resize"])
    return {
        "name": config.get("entry", config["architecture"]),
        "architecture": config["architecture"],
        "norm": dict(config["norm"]),
        "num_classes": config["num_classes"],
        "eval": data,
        "metrics": dict(config.get("metrics") or {}),
        "license": config.get("license"),
        "provenance": dict(config.get("provenance") or {}),
        "source": where,
    }
