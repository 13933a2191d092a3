"""``QuantConfig`` as a TOML file, for ``intq compile --config cfg.toml``.

    weight_bits = 8
    activation_bits = 8
    calibration = "auto"           # auto | minmax | percentile | mse
    percentile = 99.99
    bias_correction = true         # remove the mean output shift of weight rounding

    [layer_bits."layer3.1.conv2"]  # by original node name, as `intq inspect --ir` prints
    weights = 4
    activations = 8

    [kernels]                      # transformer kernel variants (the others keep defaults)
    softmax = "shift"

    [mixed_precision]              # 4 or 8 weight bits per layer within a budget
    size_mb = 2.5
    sensitivity = "hessian"        # hessian | direct

The keys are :class:`~intq.quantization.QuantConfig`'s fields (read from the dataclass, so a
new field is a new key). An unknown key, a wrong type or a bad value is an error naming the
key and listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from intq.distillation import DistillConfig
from intq.errors import IntqError
from intq.mixed_precision import MixedPrecision
from intq.passes.integerize import kernel_specs
from intq.passes.precision import LayerBits
from intq.quantization import QuantConfig

_NOT_IN_FILES = {"progress"}
"""QuantConfig fields that are run-time choices (``--quiet``), not part of a config file."""
_TABLES = ("layer_bits", "kernels", "mixed_precision", "distill")
"""QuantConfig fields written as TOML tables."""


def config_keys() -> dict[str, Any]:
    """Key -> expected Python type of every key a config file may set."""
    hints = typing.get_type_hints(QuantConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(QuantConfig)
        if f.name not in _NOT_IN_FILES and f.name not in _TABLES
    } | dict.fromkeys(_TABLES, dict)


def _check_type(key: str, value: Any, expected: Any, path: Path) -> Any:
    origin = typing.get_origin(expected)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is None and isinstance(expected, type):
        if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
            return value
        raise IntqError(
            f"{path}: key {key!r} must be a {expected.__name__}, got {value!r}",
            hint=f"write e.g. {key} = {_example(expected)}",
        )
    return value  # unions and generics: QuantConfig's own checks judge the value


def _example(kind: type) -> str:
    return {int: "8", float: "99.99", str: '"minmax"', bool: "true"}.get(kind, "...")


def _mixed_precision(table: Any, path: Path) -> MixedPrecision:
    if not isinstance(table, dict):
        raise IntqError(
            f"{path}: mixed_precision must be a table",
            hint="write [mixed_precision] followed by size_mb = 2.5 (or bops, latency_ms)",
        )
    hints = typing.get_type_hints(MixedPrecision)
    valid = sorted(f.name for f in dataclasses.fields(MixedPrecision))
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise IntqError(
            f"{path}: unknown key {unknown[0]!r} in mixed_precision",
            hint=f"the valid keys are: {', '.join(valid)}",
        )
    values = {k: _check_type(f"mixed_precision.{k}", v, hints[k], path) for k, v in table.items()}
    if "candidates" in values:
        values["candidates"] = tuple(values["candidates"])
    return MixedPrecision(**values)


def _distill(table: Any, path: Path) -> DistillConfig:
    if not isinstance(table, dict):
        raise IntqError(
            f"{path}: distill must be a table",
            hint="write [distill] followed by steps = 200 (and lr, loss, train...)",
        )
    hints = typing.get_type_hints(DistillConfig)
    valid = sorted(f.name for f in dataclasses.fields(DistillConfig) if f.name != "progress")
    unknown = sorted(set(table) - set(valid))
    if unknown:
        raise IntqError(
            f"{path}: unknown key {unknown[0]!r} in distill",
            hint=f"the valid keys are: {', '.join(valid)}",
        )
    values = {k: _check_type(f"distill.{k}", v, hints[k], path) for k, v in table.items()}
    if "train" in values:
        values["train"] = tuple(values["train"])
    try:
        return DistillConfig(**values)
    except IntqError as err:
        raise IntqError(f"{path}: distill: {err.message}", hint=err.hint) from None


def _kernels(table: Any, path: Path) -> dict[str, str]:
    specs = kernel_specs()
    if not isinstance(table, dict):
        raise IntqError(
            f"{path}: kernels must be a table",
            hint='write [kernels] followed by softmax = "shift" (kernels: '
            + ", ".join(sorted(specs))
            + ")",
        )
    for key, value in table.items():
        if key not in specs:
            raise IntqError(
                f"{path}: unknown kernel {key!r} in kernels",
                hint=f"the kernels are: {', '.join(sorted(specs))}",
            )
        if not isinstance(value, str):
            raise IntqError(
                f"{path}: kernels.{key} must be a string, got {value!r}",
                hint=f"write {key} = {specs[key].default!r}: one of"
                f" {', '.join(specs[key].variants)}",
            )
    return dict(table)


def _layer_bits(table: Any, path: Path) -> dict[str, LayerBits]:
    if not isinstance(table, dict):
        raise IntqError(
            f"{path}: layer_bits must be a table of layers",
            hint='write [layer_bits."layer.name"] followed by weights = 4 / activations = 8',
        )
    valid = [f.name for f in dataclasses.fields(LayerBits)]
    result = {}
    for layer, entry in table.items():
        if not isinstance(entry, dict):
            raise IntqError(
                f"{path}: layer_bits.{layer!r} must be a table",
                hint=f'write [layer_bits."{layer}"] with keys {", ".join(valid)}',
            )
        unknown = sorted(set(entry) - set(valid))
        if unknown:
            raise IntqError(
                f"{path}: unknown key {unknown[0]!r} in layer_bits.{layer!r}",
                hint=f"the valid keys are: {', '.join(valid)}",
            )
        for key, value in entry.items():
            _check_type(f"layer_bits.{layer}.{key}", value, int, path)
        result[str(layer)] = LayerBits(**entry)
    return result


def load_config(path: str | Path, **overrides: Any) -> QuantConfig:
    """The :class:`QuantConfig` a TOML file describes; ``overrides`` (not None) win."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise IntqError(f"cannot read config {path}: {err.strerror or err}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise IntqError(f"{path} is not valid TOML: {err}") from None
    keys = config_keys()
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise IntqError(
            f"{path}: unknown config key {unknown[0]!r}",
            hint=f"the valid keys are: {', '.join(sorted(keys))}",
        )
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "layer_bits":
            values[key] = _layer_bits(value, path)
        elif key == "kernels":
            values[key] = _kernels(value, path)
        elif key == "mixed_precision":
            values[key] = _mixed_precision(value, path)
        elif key == "distill":
            values[key] = _distill(value, path)
        else:
            values[key] = _check_type(key, value, keys[key], path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return QuantConfig(**values)
    except IntqError as err:
        raise IntqError(f"{path}: {err.message}", hint=err.hint) from None


__all__ = ["config_keys", "load_config"]
