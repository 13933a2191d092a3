"""Immutable, hashable types carried by every IR value.

A :class:`TensorType` is a dtype, a static shape and, once the value is
quantized, its :class:`QuantParams` (bits, signedness, scale or per-channel
scales). Real value ~= scale * integer value; the zero point is always 0.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from intq.errors import ShapeError


class DType(enum.Enum):
    """Element types the IR knows. The value is the short name used in the textual IR."""

    F32 = "f32"
    F64 = "f64"
    F16 = "f16"
    I8 = "i8"
    U8 = "u8"
    I16 = "i16"
    U16 = "u16"
    I32 = "i32"
    U32 = "u32"
    I64 = "i64"
    U64 = "u64"
    BOOL = "bool"

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype of this element type."""
        return np.dtype(_TO_NUMPY[self])

    @property
    def is_float(self) -> bool:
        """True for floating-point types."""
        return self in (DType.F16, DType.F32, DType.F64)

    @property
    def is_integer(self) -> bool:
        """True for signed and unsigned integer types (not bool)."""
        return not self.is_float and self is not DType.BOOL

    @property
    def is_signed(self) -> bool:
        """True for signed integer types and floats."""
        return self.is_float or self in (DType.I8, DType.I16, DType.I32, DType.I64)

    @property
    def bits(self) -> int:
        """Storage width in bits (bool counts as 8)."""
        return self.numpy.itemsize * 8

    @classmethod
    def from_numpy(cls, dtype: np.dtype | type) -> DType:
        """The IR dtype of a numpy dtype; raises :class:`ShapeError` for unsupported ones."""
        name = np.dtype(dtype).name
        try:
            return _FROM_NUMPY[name]
        except KeyError:
            raise ShapeError(f"unsupported element type {name}") from None

    def __repr__(self) -> str:
        return f"DType.{self.name}"


_TO_NUMPY = {
    DType.F32: "float32",
    DType.F64: "float64",
    DType.F16: "float16",
    DType.I8: "int8",
    DType.U8: "uint8",
    DType.I16: "int16",
    DType.U16: "uint16",
    DType.I32: "int32",
    DType.U32: "uint32",
    DType.I64: "int64",
    DType.U64: "uint64",
    DType.BOOL: "bool",
}
_FROM_NUMPY = {name: dtype for dtype, name in _TO_NUMPY.items()}


@dataclass(frozen=True)
class QuantParams:
    """How the integers of a quantized tensor map to reals: ``real = scale[c] * q``.

    ``bits`` is the logical width (4, 8, 16, 32...), which may be narrower
    than the storage dtype. ``signed`` values lie in ``[-2^(b-1), 2^(b-1)-1]``
    (``narrow`` drops the most negative value, as weights do), unsigned ones in
    ``[0, 2^b-1]``. ``axis`` is ``None`` for one per-tensor scale, else the
    channel axis of the per-channel ``scale`` tuple.
    """

    bits: int
    signed: bool
    scale: tuple[float, ...]
    axis: int | None = None
    narrow: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        if not 1 <= self.bits <= 64:
            raise ShapeError(f"quantization bits must be in [1, 64], got {self.bits}")
        if not self.scale:
            raise ShapeError("quantization needs at least one scale")
        if self.axis is None and len(self.scale) != 1:
            raise ShapeError(f"per-tensor quantization takes one scale, got {len(self.scale)}")
        for s in self.scale:
            if not (math.isfinite(s) and s > 0):
                raise ShapeError(f"quantization scales must be positive and finite, got {s}")
        if self.narrow and not self.signed:
            raise ShapeError("narrow range applies to signed values only")

    @property
    def qmin(self) -> int:
        """Smallest representable integer."""
        if not self.signed:
            return 0
        return -(1 << (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        """Largest representable integer."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def __str__(self) -> str:
        """The IR text form: ``q(bits=8, signed, narrow, axis=0, scale=[...])``; each scale
        is the shortest text that parses back to the same double."""
        parts = [f"bits={self.bits}", "signed" if self.signed else "unsigned"]
        if self.narrow:
            parts.append("narrow")
        if self.axis is not None:
            parts.append(f"axis={self.axis}")
            parts.append("scale=[" + ", ".join(repr(float(s)) for s in self.scale) + "]")
        else:
            parts.append(f"scale={float(self.scale[0])!r}")
        return "q(" + ", ".join(parts) + ")"


@dataclass(frozen=True)
class TensorType:
    """The type of an IR value: dtype, static shape, optional quantization."""

    dtype: DType
    shape: tuple[int, ...]
    quant: QuantParams | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 0 for d in self.shape):
            raise ShapeError(f"shape dimensions must be non-negative, got {self.shape}")
        q = self.quant
        if q is not None:
            if q.axis is not None and not 0 <= q.axis < len(self.shape):
                raise ShapeError(f"quantization axis {q.axis} out of range for shape {self.shape}")
            if q.axis is not None and len(q.scale) != self.shape[q.axis]:
                raise ShapeError(
                    f"{len(q.scale)} scales for axis {q.axis} of size {self.shape[q.axis]}"
                )

    @property
    def rank(self) -> int:
        """Number of dimensions."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in its storage dtype."""
        return self.size * self.dtype.numpy.itemsize

    def with_shape(self, shape: tuple[int, ...]) -> TensorType:
        """This type with another shape (and no per-channel quantization)."""
        return TensorType(self.dtype, shape, None)

    def with_quant(self, quant: QuantParams | None) -> TensorType:
        """This type with other quantization parameters."""
        return TensorType(self.dtype, self.shape, quant)

    @classmethod
    def of(cls, array: np.ndarray) -> TensorType:
        """The type of a numpy array."""
        return cls(DType.from_numpy(array.dtype), tuple(array.shape))

    def __str__(self) -> str:
        """The IR text form: ``i8[1,16,8,8] q(...)``."""
        text = f"{self.dtype.value}[{','.join(str(d) for d in self.shape)}]"
        return f"{text} {self.quant}" if self.quant is not None else text
