"""Schemas for what intq reads from disk: every field's type, range, size and nesting depth.

A schema is a tree of *checks*, each a function ``check(value, at) -> value`` that returns the
value (as the reader will use it) or raises :class:`Invalid` with the dotted path of the field
(``inputs[0].shape[2]``) and what is wrong with it. :func:`parse_json` reads a JSON document
against a schema with limits applied before Python's parser sees it (size, UTF-8, nesting
depth, integer digits, NaN/Infinity, duplicate keys), and :func:`parse_fields` a line of
``key=value`` fields; both turn every failure into the caller's :class:`~intq.errors.IntqError`
subclass naming the file and the field, so that no ``KeyError``, ``TypeError`` or
``RecursionError`` escapes a reader fed a hostile file.

    LAYER = obj({"layer": string(), "op": string()})
    rows = parse_json(data, path, "layer table", list_of(LAYER, 10_000))
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from intq.errors import ArtifactError, IntqError

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON document may have (intq writes at most 6)."""

MAX_JSON_BYTES = 16 << 20
"""Largest JSON document read (16 MiB): a manifest of a large model is a few hundred KiB."""

MAX_INT_DIGITS = 20
"""Longest integer literal accepted in JSON (an int64 has 19 digits)."""

MAX_STRING = 4096
"""Default longest string field."""


class Invalid(Exception):
    """A field that does not fit its schema: where (``at``) and why."""

    def __init__(self, at: str, reason: str):
        super().__init__(f"{at}: {reason}")
        self.at = at
        self.reason = reason


Check = Callable[[Any, str], Any]
"""``check(value, at)``: the value as the reader uses it, or :class:`Invalid`."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), "null" if value is None else "a number"
    )


def integer(low: int = -(2**63), high: int = 2**63 - 1) -> Check:
    """An integer (not a boolean) in ``[low, high]``."""

    def check(value: Any, at: str) -> int:
        if type(value) is not int or not low <= value <= high:
            raise Invalid(at, f"must be an integer in [{low}, {high}], not {_shown(value)}")
        return value

    return check


def decimal(low: int, high: int) -> Check:
    """A string of decimal digits (a header field) naming an integer in ``[low, high]``;
    its length is checked before it is converted."""
    digits = re.compile(f"[0-9]{{1,{len(str(high))}}}")

    def check(value: Any, at: str) -> int:
        if not isinstance(value, str) or not digits.fullmatch(value):
            raise Invalid(at, f"must be a decimal integer in [{low}, {high}], not {_shown(value)}")
        if not low <= int(value) <= high:
            raise Invalid(at, f"must be in [{low}, {high}], not {value}")
        return int(value)

    return check


def number(low: float = -math.inf, high: float = math.inf) -> Check:
    """A finite number (an integer or a float, not a boolean) in ``[low, high]``, as a float."""

    def check(value: Any, at: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
            raise Invalid(at, f"must be a finite number in [{low}, {high}], not {_shown(value)}")
        return float(value)

    return check


def string(
    max_len: int = MAX_STRING, pattern: str | None = None, choices: tuple[str, ...] = ()
) -> Check:
    """A string of at most ``max_len`` characters, matching ``pattern`` (a full match) and
    one of ``choices`` when given; no NUL and no lone surrogates (they cannot be encoded)."""
    compiled = re.compile(pattern) if pattern is not None else None

    def check(value: Any, at: str) -> str:
        if not isinstance(value, str):
            raise Invalid(at, f"must be a string, not {_kind(value)}")
        if len(value) > max_len:
            raise Invalid(at, f"is {len(value)} characters long, more than {max_len}")
        if "\0" in value:
            raise Invalid(at, "holds a NUL character")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise Invalid(at, "holds a lone surrogate (not UTF-8 text)") from None
        if compiled is not None and not compiled.fullmatch(value):
            raise Invalid(at, f"{_shown(value)} is not of the form {pattern}")
        if choices and value not in choices:
            raise Invalid(at, f"must be one of {', '.join(choices)}, not {_shown(value)}")
        return value

    return check


def boolean(value: Any, at: str) -> bool:
    """A boolean."""
    if not isinstance(value, bool):
        raise Invalid(at, f"must be true or false, not {_shown(value)}")
    return value


def null(value: Any, at: str) -> None:
    """``null``."""
    if value is not None:
        raise Invalid(at, f"must be null, not {_shown(value)}")


def equal(expected: Any) -> Check:
    """Exactly ``expected`` (a format name, a version)."""

    def check(value: Any, at: str) -> Any:
        if type(value) is not type(expected) or value != expected:
            raise Invalid(at, f"must be {expected!r}, not {_shown(value)}")
        return value

    return check


def list_of(item: Check, max_len: int, min_len: int = 0) -> Check:
    """An array of ``min_len`` to ``max_len`` elements, each checked by ``item``."""

    def check(value: Any, at: str) -> list[Any]:
        if not isinstance(value, list):
            raise Invalid(at, f"must be an array, not {_kind(value)}")
        if not min_len <= len(value) <= max_len:
            raise Invalid(at, f"has {len(value)} elements, not {min_len} to {max_len}")
        return [item(v, f"{at}[{i}]") for i, v in enumerate(value)]

    return check


def mapping(key: Check, value: Check, max_len: int) -> Check:
    """An object of at most ``max_len`` entries, with keys and values checked."""

    def check(data: Any, at: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise Invalid(at, f"must be an object, not {_kind(data)}")
        if len(data) > max_len:
            raise Invalid(at, f"has {len(data)} entries, more than {max_len}")
        return {key(k, f"{at} key"): value(v, f"{at}.{k}") for k, v in data.items()}

    return check


def obj(
    required: Mapping[str, Check],
    optional: Mapping[str, Check] | None = None,
    extra: Check | None = None,
) -> Check:
    """An object with the ``required`` fields and any of the ``optional`` ones, each checked;
    other keys are refused unless ``extra`` checks their values."""
    optional = dict(optional or {})

    def check(data: Any, at: str) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise Invalid(at, f"must be an object, not {_kind(data)}")
        missing = [k for k in required if k not in data]
        if missing:
            raise Invalid(_join(at, missing[0]), "is missing")
        out = {}
        for k, v in data.items():
            rule = required.get(k) or optional.get(k)
            if rule is None:
                if extra is None:
                    known = ", ".join([*required, *optional])
                    raise Invalid(_join(at, _shown(k)), f"is not a known field ({known})")
                rule = extra
            out[k] = rule(v, _join(at, k))
        return out

    return check


def _join(at: str, key: str) -> str:
    return f"{at}.{key}" if at else key


def one_of(*checks: Check, what: str) -> Check:
    """The first of ``checks`` that accepts the value; ``what`` says what all of them take."""

    def check(value: Any, at: str) -> Any:
        for rule in checks:
            try:
                return rule(value, at)
            except Invalid:
                continue
        raise Invalid(at, f"must be {what}, not {_shown(value)}")

    return check


def optional(rule: Check, what: str) -> Check:
    """``null`` or what ``rule`` takes (``what``)."""
    return one_of(null, rule, what=f"null or {what}")


# ----- documents ----------------------------------------------------------------------------

# A JSON string (escapes included) or one bracket: what the depth scan steps through.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, without parsing it: a linear
    scan that skips strings, so that ``json.loads`` never meets a document deep enough to
    overflow its recursion."""
    depth = deepest = 0
    for token in _TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif bracket in "]}":
            depth -= 1
    return deepest


def _int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(literal)} digits (at most {MAX_INT_DIGITS})")
    return int(literal)


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {_shown(key)} appears twice in one object")
        out[key] = value
    return out


def decode_text(data: bytes, path: Path, what: str, error: type[IntqError]) -> str:
    """``data`` as UTF-8 text, or ``error`` naming the offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: the {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset"
            f" {err.start})"
        ) from None


def parse_json(
    data: bytes,
    path: Path,
    what: str,
    schema: Check,
    *,
    error: type[IntqError] = ArtifactError,
    hint: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
) -> Any:
    """The JSON document ``data`` (the ``what`` of the file ``path``) checked by ``schema``;
    any failure is ``error`` naming the file, the field and ``hint``."""
    if len(data) > max_bytes:
        raise error(f"{path}: the {what} is {len(data)} bytes, more than {max_bytes}", hint=hint)
    text = decode_text(data, path, what, error)
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{path}: the {what} nests more than {MAX_DEPTH} levels deep", hint=hint)
    try:
        value = json.loads(text, parse_int=_int, parse_constant=_constant, object_pairs_hook=_pairs)
    except json.JSONDecodeError as err:
        raise error(f"{path}: the {what} is not valid JSON ({err})", hint=hint) from None
    except ValueError as err:  # raised by the hooks above
        raise error(f"{path}: the {what} is not valid JSON: {err}", hint=hint) from None
    return validate(value, path, what, schema, error=error, hint=hint)


def validate(
    value: Any,
    path: Path,
    what: str,
    schema: Check,
    *,
    error: type[IntqError] = ArtifactError,
    hint: str | None = None,
) -> Any:
    """``value`` (already parsed from ``path``) checked by ``schema``."""
    try:
        return schema(value, "")
    except Invalid as err:
        field = f" field {err.at}" if err.at else ""
        raise error(f"{path}: {what}{field} {err.reason}", hint=hint) from None


def parse_fields(
    line: str,
    path: Path,
    what: str,
    fields: Mapping[str, Check],
    *,
    error: type[IntqError] = ArtifactError,
    hint: str | None = None,
) -> dict[str, Any]:
    """``key=value`` fields separated by single spaces: each key once, every one of
    ``fields`` present and no other, each value (a string) checked by its rule."""
    found: dict[str, str] = {}
    for item in line.split(" "):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise error(f"{path}: {what}: {_shown(item)} is not a key=value field", hint=hint)
        if key not in fields:
            raise error(
                f"{path}: {what}: unknown field {_shown(key)} (the fields are {', '.join(fields)})",
                hint=hint,
            )
        if key in found:
            raise error(f"{path}: {what}: the field {key} appears twice", hint=hint)
        found[key] = value
    missing = [k for k in fields if k not in found]
    if missing:
        raise error(f"{path}: {what}: the field {missing[0]} is missing", hint=hint)
    out = {}
    for key, rule in fields.items():
        try:
            out[key] = rule(found[key], key)
        except Invalid as err:
            raise error(f"{path}: {what} field {err.at} {err.reason}", hint=hint) from None
    return out


__all__ = [
    "MAX_DEPTH",
    "MAX_INT_DIGITS",
    "MAX_JSON_BYTES",
    "Check",
    "Invalid",
    "boolean",
    "decimal",
    "decode_text",
    "equal",
    "integer",
    "list_of",
    "mapping",
    "null",
    "number",
    "obj",
    "one_of",
    "optional",
    "parse_fields",
    "parse_json",
    "string",
    "validate",
]
