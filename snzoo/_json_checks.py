"""Reading JSON documents users edit (manifests, model configs) and naming their first schema error in words."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from snzoo.errors import SnzooError


def read_text(resource: Any, label: str, what: str, error: type[SnzooError]) -> str:
    """The UTF-8 text of a file or package resource; any problem is one `error` line naming `label`."""
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{label}: no such {what} file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{label}: cannot read the {what} ({exc.strerror or exc})") from None


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


def parse_json(text: str, label: str, what: str, error: type[SnzooError], invalid: str = "invalid JSON") -> Any:
    """Parse JSON strictly (no repeated keys, no NaN or Infinity); any problem is one `error` line."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise error(f"{label}: {invalid} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise error(f"{label}: invalid {what}: the key {exc.args[0]!r} appears twice in one object") from None
    except ValueError as exc:
        raise error(f"{label}: invalid JSON: {exc}") from None


_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "object": "an object", "array": "a list", "null": "null"}


def show(value: Any) -> str:
    """A value as a reader would write it, cut to 60 characters."""
    if isinstance(value, str):
        text = repr(value)
    else:
        text = json.dumps(value, separators=(", ", ": "), default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def expected(error: jsonschema.ValidationError) -> str:
    """What the schema wanted where a value failed, in words (a schema's "x-expected" wins)."""
    if isinstance(error.schema, dict) and "x-expected" in error.schema:
        return error.schema["x-expected"]
    v, value = error.validator, error.validator_value
    if v == "type":
        types = [value] if isinstance(value, str) else list(value)
        return " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    if v == "enum":
        return "one of " + ", ".join(show(x) for x in value)
    if v == "const":
        return show(value)
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


def field_path(parts: list[Any]) -> str:
    """A JSON path as `a.b[2].c`."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
