"""The weights manifest: reading, schema and semantic validation, and merging a user overlay.

The manifest (``weights_manifest.json``, shipped inside the package) lists every published checkpoint as an
entry named ``ARCH.TAG``. An overlay file of the same format adds entries or replaces top-level fields of
shipped ones (for example ``sources``, to point at a mirror). Every problem is reported as one line naming
the file, the entry and the field.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import jsonschema

from snzoo._io import PathLike
from snzoo._json_checks import expected, field_path, parse_json, read_text, show
from snzoo.errors import ManifestError, UnknownModelError
from snzoo.models.registry import ARCHITECTURES, unknown_name_message
from snzoo.zoo.entry import Entry

SCHEMA_VERSION = 1
_MANIFEST_FILE = "weights_manifest.json"
_SCHEMA_FILE = "manifest.schema.json"
_ENTRY_FIELDS = ("architecture", "default", "norm", "num_classes", "sources", "metrics", "eval", "recipe",
                 "provenance", "notes")
_SECTIONS = ("entries", "task_entries")  # classification entries; fine-tuned detectors and segmenters


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: entries in file order (shipped ones first, then those an overlay adds), and the task
    entries (fine-tuned detectors and segmenters, as snzoo.tasks reads them: validated dicts)."""

    entries: dict[str, Entry]
    path: Path
    overlay: Path | None = None
    task_entries: dict[str, dict] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def entries_for(self, architecture: str) -> list[Entry]:
        """The entries of one architecture, in file order."""
        return [e for e in self.entries.values() if e.architecture == architecture]

    def default_entry(self, architecture: str) -> Entry | None:
        """The default entry of an architecture, or None if it has no pretrained weights."""
        return next((e for e in self.entries.values() if e.architecture == architecture and e.default), None)

    def get_entry(self, name: str) -> Entry:
        """An entry by ``ARCH.TAG``, or the default entry of a bare ``ARCH``."""
        if name in self.entries:
            return self.entries[name]
        if "." in name:
            raise UnknownModelError(unknown_name_message("zoo entry", name, self.entries))
        entry = self.default_entry(name)
        if entry is not None:
            return entry
        archs = ARCHITECTURES
        with_weights = sorted({e.architecture for e in self.entries.values()})
        if name in archs:
            raise UnknownModelError(
                f"architecture {name!r} has no pretrained weights in the zoo; pretrained weights exist for: "
                f"{', '.join(with_weights)}")
        known = sorted(set(archs) | set(with_weights) | set(self.entries))
        raise UnknownModelError(unknown_name_message("model", name, known))

    def list_entries(self, pattern: str = "*") -> list[str]:
        """Sorted entry names where the pattern matches the entry name or its architecture."""
        pattern = pattern.lower()
        return sorted(n for n, e in self.entries.items()
                      if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(e.architecture, pattern))


# --------------------------------------------------------------------------------------------- loading


def load_manifest(path: PathLike | None = None, overlay: PathLike | None = None) -> Manifest:
    """Read and validate a manifest (default: the shipped one), optionally merged with an overlay file.

    An overlay adds entries, and for a name that already exists replaces the top-level fields it gives.
    Any problem raises :class:`ManifestError` with one line naming the file, the entry and the field.
    """
    if path is None:
        resource = resources.files("snzoo") / _MANIFEST_FILE
        label = _MANIFEST_FILE
        base_path = Path(str(resource))
        data = parse_json(read_text(resource, label, "manifest", ManifestError), label, "manifest", ManifestError)
    else:
        base_path = Path(path)
        label = str(path)
        data = parse_json(read_text(base_path, label, "manifest", ManifestError), label, "manifest", ManifestError)

    # Remember which file gave each entry and field, so an error names the file the user must edit.
    origins: dict[str, dict[str | None, str]] = {}
    _raise_first(_validator().iter_errors(data), data, origins, label)
    data.setdefault("task_entries", {})
    for section in _SECTIONS:
        for name in data[section]:
            origins[name] = {None: label}

    overlay_path = None
    if overlay is not None:
        overlay_path = Path(overlay)
        ov_label = str(overlay)
        ov = parse_json(read_text(overlay_path, ov_label, "manifest", ManifestError), ov_label, "manifest", ManifestError)
        _raise_first(_overlay_validator().iter_errors(ov), ov, {}, ov_label)
        for section in _SECTIONS:
            for name, fields in ov.get(section, {}).items():
                if name in data[section]:
                    for key, value in fields.items():
                        data[section][name][key] = value
                        origins[name][key] = ov_label
                else:
                    data[section][name] = fields
                    origins[name] = {None: ov_label}
        _raise_first(_validator().iter_errors(data), data, origins, label)

    _check_semantics(data["entries"], origins)
    _check_task_semantics(data["task_entries"], origins)
    entries = {name: Entry.from_dict(name, raw) for name, raw in data["entries"].items()}
    return Manifest(entries=entries, path=base_path, overlay=overlay_path, task_entries=dict(data["task_entries"]))


# --------------------------------------------------------------------------------------------- schema


_validators: dict[str, jsonschema.Draft202012Validator] = {}


def manifest_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (a fresh copy; model folders' config.json reuses its definitions)."""
    text = (resources.files("snzoo.zoo") / _SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _validator() -> jsonschema.Draft202012Validator:
    if "manifest" not in _validators:
        _validators["manifest"] = jsonschema.Draft202012Validator(manifest_schema())
    return _validators["manifest"]


def _overlay_validator() -> jsonschema.Draft202012Validator:
    # An overlay's entries may be partial (only the fields they replace); the merged result gets the full schema.
    if "overlay" not in _validators:
        schema = manifest_schema()
        _validators["overlay"] = jsonschema.Draft202012Validator({
            "type": "object",
            "required": ["schema_version", "entries"],
            "additionalProperties": False,
            "properties": {
                "schema_version": schema["properties"]["schema_version"],
                "entries": {
                    "type": "object",
                    "propertyNames": schema["properties"]["entries"]["propertyNames"],
                    "additionalProperties": {
                        "type": "object",
                        "properties": {k: True for k in _ENTRY_FIELDS},
                        "additionalProperties": False,
                    },
                },
                "task_entries": {
                    "type": "object",
                    "propertyNames": schema["properties"]["task_entries"]["propertyNames"],
                    "additionalProperties": {
                        "type": "object",
                        "properties": {k: True for k in schema["$defs"]["task_entry"]["properties"]},
                        "additionalProperties": False,
                    },
                },
            },
        })
    return _validators["overlay"]


def _where(path: list[Any], origins: Mapping[str, Mapping[str | None, str]], label: str) -> tuple[str, str]:
    """The file to blame and the 'entry ..., field ...' words for a path into the manifest."""
    if len(path) >= 2 and path[0] in _SECTIONS:
        name, rest = path[1], path[2:]
        files = origins.get(name, {})
        blamed = files.get(rest[0] if rest else None, files.get(None, label))
        where = f"entry {name!r}" + (f", field {field_path(rest)!r}" if rest else "")
        return blamed, where
    if path:
        return label, f"field {field_path(path)!r}"
    return label, "the top level"


def _message(error: jsonschema.ValidationError, origins: Mapping[str, Mapping[str | None, str]], label: str) -> str:
    path = list(error.absolute_path)
    v = error.validator
    if "propertyNames" in error.absolute_schema_path:
        # A key (not a value) is wrong; error.instance is the key itself.
        if len(path) == 1 and path[0] in _SECTIONS:
            return f"{label}: entry name {show(error.instance)} is not valid (expected {expected(error)})"
        blamed, where = _where(path, origins, label)
        return f"{blamed}: {where}: key {show(error.instance)} is not valid (expected {expected(error)})"
    if v == "required" and isinstance(error.instance, dict):
        missing = next((k for k in error.validator_value if k not in error.instance), error.validator_value[0])
        blamed, where = _where(path + [missing], origins, label)
        return f"{blamed}: {where} is missing"
    if v == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        extra = next((k for k in error.instance if k not in known), "?")
        blamed, where = _where(path + [extra], origins, label)
        return f"{blamed}: {where} is not a known field (known: {', '.join(known)})"
    blamed, where = _where(path, origins, label)
    return f"{blamed}: {where}: {show(error.instance)} is not valid (expected {expected(error)})"


def _raise_first(errors: Any, data: Any, origins: Mapping[str, Mapping[str | None, str]], label: str) -> None:
    errors = list(errors)
    if not errors:
        return
    order = {name: i for i, name in enumerate(data.get("entries", {}))} if isinstance(data, dict) \
        and isinstance(data.get("entries"), dict) else {}

    def key(error: jsonschema.ValidationError) -> tuple:
        # File order of entries, then path order, so the reported error is the first a reader would meet.
        parts: list[tuple] = []
        for i, p in enumerate(error.absolute_path):
            if i == 1 and parts == [(1, "entries")] and p in order:
                parts.append((0, order[p]))
            else:
                parts.append((0, p) if isinstance(p, int) else (1, p))
        return tuple(parts)

    first = min(errors, key=key)
    raise ManifestError(" ".join(_message(first, origins, label).splitlines()))


# --------------------------------------------------------------------------------------------- semantics


def _norm_of(architecture: str) -> str | None:
    spec = ARCHITECTURES.get(architecture)
    return None if spec is None else spec.norm


def _bad_file_name(name: str) -> bool:
    # The name is joined to the cache directory: it must not leave it or name a drive or stream.
    return (any(c in name for c in "/\\:\0") or ".." in name or name.startswith("~")
            or os.path.isabs(name) or name.strip() != name or name in (".", ""))


def _check_semantics(entries: Mapping[str, Any], origins: Mapping[str, Mapping[str | None, str]]) -> None:
    def fail(name: str, field_parts: list[Any], problem: str) -> None:
        blamed, where = _where(["entries", name, *field_parts], origins, "")
        raise ManifestError(f"{blamed}: {where}: {problem}")

    defaults: dict[str, str] = {}
    first_of: dict[str, str] = {}
    for name, raw in entries.items():
        arch = raw["architecture"]
        prefix = name.split(".", 1)[0]
        if arch != prefix:
            fail(name, ["architecture"],
                 f"{show(arch)} is not valid (expected {prefix!r}, the part of the entry name before the dot)")
        if arch not in ARCHITECTURES:
            fail(name, ["architecture"], unknown_name_message("architecture", arch, ARCHITECTURES))
        norm = _norm_of(arch)
        if norm is not None and raw["norm"]["type"] != norm:
            fail(name, ["norm", "type"],
                 f"{show(raw['norm']['type'])} is not valid (expected {norm!r}, the norm of {arch!r})")
        for i, source in enumerate(raw["sources"]):
            if _bad_file_name(source["file_name"]):
                fail(name, ["sources", i, "file_name"],
                     f"{show(source['file_name'])} is not valid (expected a plain file name: no directories, "
                     f"no '..', not absolute)")
        ev = raw["eval"]
        if ev["crop"] > ev["resize"]:
            fail(name, ["eval", "crop"], f"{ev['crop']} is not valid (expected at most resize, {ev['resize']})")
        first_of.setdefault(arch, name)
        if raw["default"]:
            if arch in defaults:
                fail(name, ["default"],
                     f"true is not valid ({defaults[arch]!r} is already the default of {arch!r}; "
                     f"exactly one entry per architecture is the default)")
            defaults[arch] = name
    for arch, name in first_of.items():
        if arch not in defaults:
            fail(name, ["default"],
                 f"architecture {arch!r} has no default entry (set \"default\": true on exactly one of its entries)")


def _check_task_semantics(entries: Mapping[str, Any], origins: Mapping[str, Mapping[str | None, str]]) -> None:
    """What the schema cannot say about task entries (the builder's name itself is checked where it is built,
    by snzoo.tasks, which the zoo does not import)."""
    def fail(name: str, field_parts: list[Any], problem: str) -> None:
        blamed, where = _where(["task_entries", name, *field_parts], origins, "")
        raise ManifestError(f"{blamed}: {where}: {problem}")

    for name, raw in entries.items():
        prefix = name.split(".", 1)[0]
        if raw["model"] != prefix:
            fail(name, ["model"], f"{show(raw['model'])} is not valid (expected {prefix!r}, the part of the entry "
                                  "name before the dot)")
        if raw["backbone_architecture"] not in ARCHITECTURES:
            fail(name, ["backbone_architecture"],
                 unknown_name_message("architecture", raw["backbone_architecture"], ARCHITECTURES))
        if raw["model_kwargs"]["num_classes"] != raw["num_classes"]:
            fail(name, ["model_kwargs", "num_classes"],
                 f"{raw['model_kwargs']['num_classes']} is not valid (expected {raw['num_classes']}, num_classes)")
        for i, source in enumerate(raw["sources"]):
            if _bad_file_name(source["file_name"]):
                fail(name, ["sources", i, "file_name"],
                     f"{show(source['file_name'])} is not valid (expected a plain file name)")
