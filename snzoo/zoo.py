"""The zoo: the weights manifest, its validation, and lookups of architectures and pretrained entries.

The manifest (``weights_manifest.json``, shipped inside the package) lists every published checkpoint as an
entry named ``ARCH.TAG``. A user overlay file of the same format can add entries or replace top-level fields
of shipped ones (for example ``sources``, to point at a mirror); it is chosen with :func:`set_overlay` or the
``SNZOO_MANIFEST`` environment variable.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Union

import jsonschema

from snzoo.errors import ManifestError, UnknownModelError

__all__ = [
    "MANIFEST_ENV",
    "SCHEMA_VERSION",
    "Source",
    "NormConfig",
    "Metrics",
    "EvalConfig",
    "Entry",
    "Manifest",
    "load_manifest",
    "manifest",
    "set_overlay",
    "list_models",
    "get_entry",
    "zoo_table_markdown",
]

PathLike = Union[str, "os.PathLike[str]"]

MANIFEST_ENV = "SNZOO_MANIFEST"
SCHEMA_VERSION = 1
_MANIFEST_FILE = "weights_manifest.json"
_SCHEMA_FILE = "manifest.schema.json"
_ENTRY_FIELDS = ("architecture", "default", "norm", "num_classes", "sources", "metrics", "eval", "recipe",
                 "provenance", "notes")


# --------------------------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class Source:
    """One place a checkpoint can be fetched from, with what is known to verify it."""

    url: str
    kind: str
    format: str
    file_name: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"url": self.url, "kind": self.kind, "format": self.format, "file_name": self.file_name,
                "sha256": self.sha256, "md5": self.md5, "size": self.size}


@dataclass(frozen=True)
class NormConfig:
    """The normalization layer a checkpoint was trained with, and its constructor arguments."""

    type: str
    using_bn: bool
    using_moving_average: bool
    momentum: float
    last_gamma: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"type": self.type, "using_bn": self.using_bn, "using_moving_average": self.using_moving_average,
                "momentum": self.momentum, "last_gamma": self.last_gamma}


@dataclass(frozen=True)
class Metrics:
    """Published accuracy in percent; None where it was not published."""

    top1: float | None
    top5: float | None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"top1": self.top1, "top5": self.top5}


@dataclass(frozen=True)
class EvalConfig:
    """The 1-crop evaluation the published metrics were measured with."""

    dataset: str
    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def crop_pct(self) -> float:
        """The centre-crop fraction (crop / resize), e.g. 0.875 for 224 out of 256."""
        return self.crop / self.resize

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as in the manifest."""
        return {"dataset": self.dataset, "resize": self.resize, "crop": self.crop,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Entry:
    """One published checkpoint: what to build, where to get it, how it scores and how it was trained."""

    name: str
    architecture: str
    tag: str
    default: bool
    norm: NormConfig
    num_classes: int
    sources: tuple[Source, ...]
    metrics: dict[str, Metrics]
    eval: EvalConfig
    recipe: dict[str, Any]
    provenance: dict[str, Any]
    notes: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> Entry:
        """Build an entry from its manifest JSON (already validated)."""
        arch, _, tag = name.partition(".")
        norm = data["norm"]
        ev = data["eval"]
        return cls(
            name=name,
            architecture=data["architecture"],
            tag=tag,
            default=bool(data["default"]),
            norm=NormConfig(type=norm["type"], using_bn=norm["using_bn"],
                            using_moving_average=norm["using_moving_average"],
                            momentum=float(norm["momentum"]), last_gamma=norm["last_gamma"]),
            # JSON Schema counts 1000.0 as an integer; builders want a real int.
            num_classes=int(data["num_classes"]),
            sources=tuple(Source(url=s["url"], kind=s["kind"], format=s["format"], file_name=s["file_name"],
                                 sha256=s["sha256"], md5=s["md5"],
                                 size=None if s["size"] is None else int(s["size"]))
                          for s in data["sources"]),
            metrics={k: Metrics(top1=v["top1"], top5=v["top5"]) for k, v in data["metrics"].items()},
            eval=EvalConfig(dataset=ev["dataset"], resize=int(ev["resize"]), crop=int(ev["crop"]),
                            interpolation=ev["interpolation"], mean=tuple(ev["mean"]), std=tuple(ev["std"])),
            recipe=copy.deepcopy(dict(data["recipe"])),
            provenance=copy.deepcopy(dict(data["provenance"])),
            notes=tuple(data.get("notes", ())),
        )

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the architecture's builder that reproduce the trained model."""
        return {"num_classes": self.num_classes, "using_bn": self.norm.using_bn,
                "using_moving_average": self.norm.using_moving_average, "momentum": self.norm.momentum,
                "last_gamma": self.norm.last_gamma}

    def learning_rate(self) -> float:
        """The recipe's peak learning rate: base * devices * per_device / reference_batch."""
        batch, lr = self.recipe["batch"], self.recipe["lr"]
        return lr["base"] * batch["devices"] * batch["per_device"] / lr["reference_batch"]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the manifest entry plus its "name"."""
        return {
            "name": self.name,
            "architecture": self.architecture,
            "default": self.default,
            "norm": self.norm.to_dict(),
            "num_classes": self.num_classes,
            "sources": [s.to_dict() for s in self.sources],
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
            "eval": self.eval.to_dict(),
            "recipe": copy.deepcopy(self.recipe),
            "provenance": copy.deepcopy(self.provenance),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: entries in file order (shipped ones first, then those an overlay adds)."""

    entries: dict[str, Entry]
    path: Path
    overlay: Path | None = None

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
        from snzoo.models.registry import unknown_name_message

        if name in self.entries:
            return self.entries[name]
        if "." in name:
            raise UnknownModelError(unknown_name_message("zoo entry", name, self.entries))
        entry = self.default_entry(name)
        if entry is not None:
            return entry
        archs = _architectures()
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
        data = _parse_json(_read_text(resource, label), label)
    else:
        base_path = Path(path)
        label = str(path)
        data = _parse_json(_read_text(base_path, label), label)

    # Remember which file gave each entry and field, so an error names the file the user must edit.
    origins: dict[str, dict[str | None, str]] = {}
    _raise_first(_validator().iter_errors(data), data, origins, label)
    for name in data["entries"]:
        origins[name] = {None: label}

    overlay_path = None
    if overlay is not None:
        overlay_path = Path(overlay)
        ov_label = str(overlay)
        ov = _parse_json(_read_text(overlay_path, ov_label), ov_label)
        _raise_first(_overlay_validator().iter_errors(ov), ov, {}, ov_label)
        for name, fields in ov["entries"].items():
            if name in data["entries"]:
                for key, value in fields.items():
                    data["entries"][name][key] = value
                    origins[name][key] = ov_label
            else:
                data["entries"][name] = fields
                origins[name] = {None: ov_label}
        _raise_first(_validator().iter_errors(data), data, origins, label)

    _check_semantics(data["entries"], origins)
    entries = {name: Entry.from_dict(name, raw) for name, raw in data["entries"].items()}
    return Manifest(entries=entries, path=base_path, overlay=overlay_path)


def _read_text(resource: Any, label: str) -> str:
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{label}: no such manifest file") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ManifestError(f"{label}: cannot read the manifest ({exc.strerror or exc})") from None


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal keys silently: a copy-pasted entry would hide the one above it.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    # NaN passes every numeric bound in JSON Schema, so it must not get that far.
    raise ValueError(f"{name} is not a valid JSON number")


def _parse_json(text: str, label: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{label}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise ManifestError(f"{label}: invalid manifest: the key {exc.args[0]!r} appears twice in one object") from None
    except ValueError as exc:
        raise ManifestError(f"{label}: invalid JSON: {exc}") from None


# --------------------------------------------------------------------------------------------- schema


_validators: dict[str, jsonschema.Draft202012Validator] = {}


def _schema() -> dict[str, Any]:
    text = (resources.files("snzoo") / _SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _validator() -> jsonschema.Draft202012Validator:
    if "manifest" not in _validators:
        _validators["manifest"] = jsonschema.Draft202012Validator(_schema())
    return _validators["manifest"]


def _overlay_validator() -> jsonschema.Draft202012Validator:
    # An overlay's entries may be partial (only the fields they replace); the merged result gets the full schema.
    if "overlay" not in _validators:
        schema = _schema()
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
            },
        })
    return _validators["overlay"]


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "object": "an object", "array": "a list", "null": "null"}


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = repr(value)
    else:
        text = json.dumps(value, separators=(", ", ": "), default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected(error: jsonschema.ValidationError) -> str:
    if isinstance(error.schema, dict) and "x-expected" in error.schema:
        return error.schema["x-expected"]
    v, value = error.validator, error.validator_value
    if v == "type":
        types = [value] if isinstance(value, str) else list(value)
        return " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    if v == "enum":
        return "one of " + ", ".join(_show(x) for x in value)
    if v == "const":
        return _show(value)
    bounds = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if v in bounds:
        return f"a number {bounds[v]} {value}"
    if v == "minItems":
        return f"at least {value} item{'s' if value != 1 else ''}"
    if v == "maxItems":
        return f"at most {value} item{'s' if value != 1 else ''}"
    if v == "minLength":
        return "a non-empty string" if value == 1 else f"at least {value} characters"
    if v == "pattern":
        return f"a string matching {value}"
    return error.message


def _field_path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _where(path: list[Any], origins: Mapping[str, Mapping[str | None, str]], label: str) -> tuple[str, str]:
    """The file to blame and the 'entry ..., field ...' words for a path into the manifest."""
    if len(path) >= 2 and path[0] == "entries":
        name, rest = path[1], path[2:]
        files = origins.get(name, {})
        blamed = files.get(rest[0] if rest else None, files.get(None, label))
        where = f"entry {name!r}" + (f", field {_field_path(rest)!r}" if rest else "")
        return blamed, where
    if path:
        return label, f"field {_field_path(path)!r}"
    return label, "the top level"


def _message(error: jsonschema.ValidationError, origins: Mapping[str, Mapping[str | None, str]], label: str) -> str:
    path = list(error.absolute_path)
    v = error.validator
    if "propertyNames" in error.absolute_schema_path:
        # A key (not a value) is wrong; error.instance is the key itself.
        if path == ["entries"]:
            return f"{label}: entry name {_show(error.instance)} is not valid (expected {_expected(error)})"
        blamed, where = _where(path, origins, label)
        return f"{blamed}: {where}: key {_show(error.instance)} is not valid (expected {_expected(error)})"
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
    return f"{blamed}: {where}: {_show(error.instance)} is not valid (expected {_expected(error)})"


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


def _architectures() -> Mapping[str, Any]:
    """The registered architectures; empty when the models package cannot be imported."""
    try:
        import snzoo.models  # noqa: F401  (importing it registers the architectures)
        from snzoo.models import registry
    except ImportError:
        return {}
    return registry.ARCHITECTURES


def _norm_of(architecture: str, archs: Mapping[str, Any]) -> str | None:
    spec = archs.get(architecture)
    if spec is not None:
        return spec.norm
    suffix = architecture.rsplit("_", 1)[-1]
    return suffix if suffix in ("sn", "ssn", "bn", "gn") else None


def _bad_file_name(name: str) -> bool:
    # The name is joined to the cache directory: it must not leave it or name a drive or stream.
    return (any(c in name for c in "/\\:\0") or ".." in name or name.startswith("~")
            or os.path.isabs(name) or name.strip() != name or name in (".", ""))


def _check_semantics(entries: Mapping[str, Any], origins: Mapping[str, Mapping[str | None, str]]) -> None:
    from snzoo.models.registry import unknown_name_message

    archs = _architectures()

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
                 f"{_show(arch)} is not valid (expected {prefix!r}, the part of the entry name before the dot)")
        if archs and arch not in archs:
            fail(name, ["architecture"], unknown_name_message("architecture", arch, archs))
        norm = _norm_of(arch, archs)
        if norm is not None and raw["norm"]["type"] != norm:
            fail(name, ["norm", "type"],
                 f"{_show(raw['norm']['type'])} is not valid (expected {norm!r}, the norm of {arch!r})")
        for i, source in enumerate(raw["sources"]):
            if _bad_file_name(source["file_name"]):
                fail(name, ["sources", i, "file_name"],
                     f"{_show(source['file_name'])} is not valid (expected a plain file name: no directories, "
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


# --------------------------------------------------------------------------------------------- current manifest


_lock = threading.RLock()
_explicit_overlay: Path | None = None
_cache: tuple[tuple, Manifest] | None = None


def _overlay_key(overlay: Path | None) -> tuple:
    if overlay is None:
        return (None,)
    try:
        st = overlay.stat()
    except OSError:
        return (str(overlay), None)
    # An edited overlay file is picked up without restarting.
    return (str(overlay), st.st_mtime_ns, st.st_size)


def _active_overlay() -> Path | None:
    if _explicit_overlay is not None:
        return _explicit_overlay
    env = os.environ.get(MANIFEST_ENV, "").strip()
    return Path(env) if env else None


def manifest() -> Manifest:
    """The current manifest: the shipped one plus the overlay of :func:`set_overlay` or ``SNZOO_MANIFEST``."""
    global _cache
    with _lock:
        overlay = _active_overlay()
        key = _overlay_key(overlay)
        if _cache is None or _cache[0] != key:
            _cache = (key, load_manifest(overlay=overlay))
        return _cache[1]


def set_overlay(path: PathLike | None) -> None:
    """Merge an overlay manifest into the current one (validated now); None clears it.

    An overlay set here wins over ``SNZOO_MANIFEST``; after ``set_overlay(None)`` the variable applies again.
    """
    global _explicit_overlay, _cache
    with _lock:
        if path is None:
            _explicit_overlay = None
            _cache = None
            return
        overlay = Path(path)
        loaded = load_manifest(overlay=overlay)
        _explicit_overlay = overlay
        _cache = (_overlay_key(overlay), loaded)


# --------------------------------------------------------------------------------------------- lookups


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Sorted names matching an fnmatch pattern.

    Without ``pretrained``: architecture names (anything :func:`snzoo.create_model` can build).
    With ``pretrained``: ``ARCH.TAG`` zoo entries whose name or architecture matches.
    """
    if pretrained:
        return manifest().list_entries(pattern)
    pattern = pattern.lower()
    return sorted(a for a in _architectures() if fnmatch.fnmatchcase(a, pattern))


def get_entry(name: str) -> Entry:
    """The zoo entry ``ARCH.TAG``, or for a bare ``ARCH`` its default entry."""
    return manifest().get_entry(name)


def _schedule_words(recipe: Mapping[str, Any]) -> str:
    sched = recipe["schedule"]
    warm = f"warmup {sched['warmup_epochs']} + " if sched.get("warmup_epochs") else ""
    if sched["type"] == "step":
        return f"{recipe['epochs']}, {warm}step {'/'.join(str(m) for m in sched['milestones'])}"
    return f"{recipe['epochs']}, {warm}{sched['type']}"


def _checksum_kind(entry: Entry) -> str:
    if any(s.sha256 for s in entry.sources):
        return "sha256"
    if any(s.md5 for s in entry.sources):
        return "md5"
    return "none"


def zoo_table_markdown(manifest: Manifest | None = None) -> str:
    """The zoo as a Markdown table, one row per entry in manifest order (the README's table)."""
    m = manifest if manifest is not None else _current_manifest()

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = ["| Entry | Architecture | Batch | Top-1 | Top-5 | Epochs, schedule | Checksum |",
            "|---|---|---|---:|---:|---|---|"]
    for entry in m.entries.values():
        metrics = entry.metrics.get(entry.eval.dataset) or next(iter(entry.metrics.values()), Metrics(None, None))
        batch = entry.recipe["batch"]
        name = f"`{entry.name}`" + (" (default)" if entry.default else "")
        rows.append(f"| {name} | {entry.architecture} | {batch['devices']}x{batch['per_device']} | "
                    f"{pct(metrics.top1)} | {pct(metrics.top5)} | {_schedule_words(entry.recipe)} | "
                    f"{_checksum_kind(entry)} |")
    return "\n".join(rows) + "\n"


_current_manifest = manifest
