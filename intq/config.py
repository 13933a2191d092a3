"""``QuantConfig`` as a TOML file, for ``intq compile --config cfg.toml``.

    weight_bits = 8
    activation_bits = 8
    calibration = "auto"           # auto | minmax | percentile | mse
    percentile = 99.99
    bias_correction = true         # every layer's rounding shift out (default "auto": under 8 bits)
    rounding = "auto"              # auto | nearest | learned (auto: layers under 8 bits)
    wide_bits = 8                  # transformers: 8-bit residual stream, LayerNorm/GELU outputs
    smooth = "layernorm"           # off | layernorm (SmoothQuant migration before calibration)
    smooth_alpha = 0.5

    [layer_bits."layer3.1.conv2"]  # by original node name, as `intq inspect --ir` prints
    weights = 4
    activations = 8

    [kernels]                      # transformer kernel variants (the others keep defaults)
    softmax = "shift"

    [mixed_precision]              # 4 or 8 weight bits per layer within a budget
    size_mb = 2.5
    sensitivity = "hessian"        # hessian | direct
    activation_bits = [8, 16]      # also choose each layer's input width (default: fixed)

The keys are :class:`~intq.quantization.QuantConfig`'s fields (read from the dataclass, so a
new field is a new key). The file is checked against that schema before anything is built:
it must be UTF-8 TOML nesting at most :data:`MAX_DEPTH` levels; an unknown key, a value of
the wrong type or out of range (:data:`RANGES`) is an error naming the file and the field,
``cfg.toml: [mixed_precision] size_mb: expected a number, got "big"``, with an example of
a right value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from intq.distillation import DistillConfig
from intq.errors import IntqError
from intq.mixed_precision import MixedPrecision
from intq.passes.integerize import kernel_specs
from intq.passes.precision import ACTIVATION_BITS, WEIGHT_BITS, WIDE_BITS, LayerBits
from intq.quantization import QuantConfig

_NOT_IN_FILES = {"progress"}
"""QuantConfig fields that are run-time choices (``--quiet``), not part of a config file."""
_TABLES = ("layer_bits", "kernels", "mixed_precision", "distill")
"""QuantConfig fields written as TOML tables."""

MAX_DEPTH = 4
"""How deeply a config file may nest tables and arrays: ``[layer_bits."name"] weights`` is
3 levels, ``[mixed_precision] candidates = [4, 8]`` 3."""


def config_keys() -> dict[str, Any]:
    """Key -> expected Python type of every key a config file may set."""
    hints = typing.get_type_hints(QuantConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(QuantConfig)
        if f.name not in _NOT_IN_FILES and f.name not in _TABLES
    } | dict.fromkeys(_TABLES, dict)


# ----- the schema: what each type hint takes in TOML --------------------------------------


@dataclasses.dataclass(frozen=True)
class _Kind:
    """What a field takes: ``what`` for messages, ``example`` for hints, ``read`` the check
    (returns the value as the dataclass takes it, or None when it does not fit)."""

    what: str
    example: str
    read: Callable[[Any], Any]


def _integer(value: Any) -> Any:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _string(value: Any) -> Any:
    return value if isinstance(value, str) else None


def _boolean(value: Any) -> Any:
    return value if isinstance(value, bool) else None


def _switch(value: Any) -> Any:
    return value if isinstance(value, bool) or value == "auto" else None


def _integers(value: Any) -> Any:
    if not isinstance(value, list) or any(_integer(v) is None for v in value):
        return None
    return tuple(value)


def _strings(value: Any) -> Any:
    if not isinstance(value, list) or any(not isinstance(v, str) for v in value):
        return None
    return tuple(value)


def _integer_table(value: Any) -> Any:
    if not isinstance(value, dict) or any(_integer(v) is None for v in value.values()):
        return None
    return dict(value)


def _path(value: Any) -> Any:
    return value if isinstance(value, str) and value and "\x00" not in value else None


_INTEGER = _Kind("an integer", "8", _integer)
_NUMBER = _Kind("a number", "2.5", _number)
_STRING = _Kind("a string", '"minmax"', _string)
_BOOLEAN = _Kind("true or false", "true", _boolean)
_SWITCH = _Kind('true, false or "auto"', '"auto"', _switch)
_INTEGERS = _Kind("an array of integers", "[4, 8]", _integers)
_STRINGS = _Kind("an array of strings", '["weights", "scales"]', _strings)
_INTEGER_TABLE = _Kind("a table of integers", '{ "layer.name" = 8 }', _integer_table)
_PATH = _Kind("a path (a non-empty string)", '"table.json"', _path)


def _kind(hint: Any) -> _Kind:
    """The TOML kind of a dataclass field's type hint (``float | None``: a number; TOML has
    no null, so leaving the key out is how a file says None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if hint is int or args == [int]:
        return _INTEGER
    if hint is float or args == [float]:
        return _NUMBER
    if hint is str:
        return _STRING
    if hint is bool:
        return _BOOLEAN
    if set(args) == {bool, str}:
        return _SWITCH
    if origin is tuple:
        return _STRINGS if typing.get_args(hint)[0] is str else _INTEGERS
    if origin is Mapping and typing.get_args(hint) == (str, int):
        return _INTEGER_TABLE
    if Path in args:
        return _PATH
    raise TypeError(f"no TOML kind for {hint!r}")  # a new field type: add its kind here


def _finite(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not (isinstance(value, float) and not math.isfinite(value)) and low <= value <= high:
            return None
        return f"expected a value in [{_bound(low)}, {_bound(high)}], got {_shown(value)}"

    return check


def _bound(x: float) -> str:
    return str(int(x)) if x == int(x) and abs(x) < 1e19 else f"{x:g}"


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if low < value < high:
            return None
        return f"expected a value between {low:g} and {high:g} (exclusive), got {_shown(value)}"

    return check


def _one_of(choices: tuple[int, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"expected one of {', '.join(map(str, choices))}, got {_shown(value)}"

    return check


RANGES: dict[str, Callable[[Any], str | None]] = {
    "weight_bits": _one_of(WEIGHT_BITS),
    "activation_bits": _one_of(ACTIVATION_BITS),
    "wide_bits": _one_of(WIDE_BITS),
    "layer_bits.weights": _one_of(WEIGHT_BITS),
    "layer_bits.activations": _one_of(ACTIVATION_BITS),
    "percentile": _finite(1e-9, 100),
    "smooth_alpha": _finite(0, 1),
    "mixed_precision.size_mb": _finite(0, 1e12),
    "mixed_precision.bops": _finite(0, 1e30),
    "mixed_precision.latency_ms": _finite(0, 1e12),
    "mixed_precision.tol": _between(0, 1),
    "mixed_precision.max_iterations": _finite(1, 100_000),
    "mixed_precision.seed": _finite(0, 2**63 - 1),
}
"""Value ranges of numeric keys (``table.key``) beyond what their type says; names (methods,
kernels, layers) are judged by QuantConfig and MixedPrecision, whose messages list them."""


def _shown(value: Any) -> str:
    """A TOML value as a message shows it: strings quoted, tables and arrays by kind."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"an array of {len(value)}"
    if isinstance(value, str):
        text = json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
        return text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:40] + "..."
    return f"a {type(value).__name__}"  # a date or time


class _Reader:
    """Reads one config file, every error naming it and the field."""

    def __init__(self, path: Path):
        self.path = path

    def error(self, field: str, message: str, hint: str | None = None) -> IntqError:
        return IntqError(f"{self.path}: {field}: {message}", hint=hint)

    def value(self, field: str, key: str, value: Any, kind: _Kind, where: str) -> Any:
        read = kind.read(value)
        if read is None:
            raise self.error(
                field,
                f"expected {kind.what}, got {_shown(value)}",
                hint=f"write e.g. {key} = {kind.example}",
            )
        check = RANGES.get(where)
        why = check(read) if check is not None else None
        if why is not None:
            raise self.error(field, why)
        return read

    def table(self, name: str, value: Any, hint: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(name, f"expected a table, got {_shown(value)}", hint=hint)
        return value

    def unknown(self, field: str, key: str, valid: list[str]) -> IntqError:
        return self.error(
            field, f"unknown key {key!r}", hint=f"the valid keys are: {', '.join(valid)}"
        )


def _options(reader: _Reader, value: Any, name: str, kind: type, hint: str) -> Any:
    """A table of ``kind``'s (a dataclass) fields: ``[mixed_precision]``, ``[distill]``."""
    where = f"[{name}]"
    table = reader.table(where, value, hint)
    hints = typing.get_type_hints(kind)
    valid = sorted(f.name for f in dataclasses.fields(kind) if f.name not in _NOT_IN_FILES)
    values = {}
    for key, item in table.items():
        if key not in valid:
            raise reader.unknown(where, key, valid)
        values[key] = reader.value(f"{where} {key}", key, item, _kind(hints[key]), f"{name}.{key}")
    try:
        return kind(**values)
    except IntqError as err:
        raise reader.error(where, err.message, err.hint) from None


def _kernels(reader: _Reader, value: Any) -> dict[str, str]:
    specs = kernel_specs()
    table = reader.table(
        "[kernels]",
        value,
        'write [kernels] followed by softmax = "shift" (kernels: ' + ", ".join(sorted(specs)) + ")",
    )
    for key, item in table.items():
        if key not in specs:
            raise reader.error(
                "[kernels]",
                f"unknown kernel {key!r}",
                hint=f"the kernels are: {', '.join(sorted(specs))}",
            )
        if not isinstance(item, str):
            raise reader.error(
                f"[kernels] {key}",
                f"expected a string, got {_shown(item)}",
                hint=f"write {key} = {specs[key].default!r}: one of"
                f" {', '.join(specs[key].variants)}",
            )
    return dict(table)


def _layer_bits(reader: _Reader, value: Any) -> dict[str, LayerBits]:
    hint = 'write [layer_bits."layer.name"] followed by weights = 4 / activations = 8'
    table = reader.table("[layer_bits]", value, hint)
    valid = [f.name for f in dataclasses.fields(LayerBits)]
    result = {}
    for layer, entry in table.items():
        where = f"[layer_bits.{json.dumps(layer)}]"
        entry = reader.table(where, entry, hint)
        for key, item in entry.items():
            if key not in valid:
                raise reader.unknown(where, key, valid)
            reader.value(f"{where} {key}", key, item, _INTEGER, f"layer_bits.{key}")
        result[str(layer)] = LayerBits(**entry)
    return result


def _read_text(path: Path) -> str:
    """The file's text: UTF-8, as TOML is."""
    try:
        data = path.read_bytes()
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise IntqError(f"cannot read config {path}: {reason}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise IntqError(
            f"{path} is not UTF-8 text (byte {err.start} is {data[err.start : err.start + 1]!r})",
            hint="TOML files are UTF-8: save the file as UTF-8",
        ) from None


def _depth(tree: Any) -> tuple[int, str]:
    """How deeply ``tree`` (parsed TOML) nests, and the path to its deepest part; without
    recursion, so a hostile file cannot exhaust the stack here either."""
    deepest, where = 0, ""
    stack: list[tuple[Any, int, str]] = [(tree, 0, "")]
    while stack:
        node, level, path = stack.pop()
        if level > deepest:
            deepest, where = level, path
        if level > MAX_DEPTH:
            break  # deep enough to refuse: the rest need not be walked
        if isinstance(node, dict):
            stack += [(v, level + 1, f"{path}.{k}" if path else str(k)) for k, v in node.items()]
        elif isinstance(node, list):
            stack += [(v, level + 1, f"{path}[{i}]") for i, v in enumerate(node)]
    return deepest, where


def load_config(path: str | Path, **overrides: Any) -> QuantConfig:
    """The :class:`QuantConfig` a TOML file describes; ``overrides`` (not None) win."""
    path = Path(path)
    reader = _Reader(path)
    text = _read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise IntqError(f"{path} is not valid TOML: {err}") from None
    except RecursionError:  # tomllib recurses once per level of nesting
        raise IntqError(
            f"{path}: arrays or inline tables nest too deeply to read (a config nests at"
            f" most {MAX_DEPTH} levels)"
        ) from None
    depth, where = _depth(raw)
    if depth > MAX_DEPTH:
        raise reader.error(
            where[:80] + ("..." if len(where) > 80 else ""),
            f"nests deeper than {MAX_DEPTH} levels, the most a config nests",
        )
    keys = config_keys()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in keys:
            raise IntqError(
                f"{path}: unknown config key {key!r}",
                hint=f"the valid keys are: {', '.join(sorted(keys))}",
            )
        if key == "layer_bits":
            values[key] = _layer_bits(reader, value)
        elif key == "kernels":
            values[key] = _kernels(reader, value)
        elif key == "mixed_precision":
            hint = "write [mixed_precision] followed by size_mb = 2.5"
            values[key] = _options(reader, value, key, MixedPrecision, hint)
        elif key == "distill":
            hint = "write [distill] followed by steps = 200 (and lr, loss, train...)"
            values[key] = _options(reader, value, key, DistillConfig, hint)
        else:
            values[key] = reader.value(key, key, value, _kind(keys[key]), key)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return QuantConfig(**values)
    except IntqError as err:
        raise IntqError(f"{path}: {err.message}", hint=err.hint) from None


__all__ = ["config_keys", "load_config"]
