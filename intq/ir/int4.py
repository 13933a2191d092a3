"""4-bit integers packed two per byte, as ONNX INT4/UINT4 tensors store them.

Element ``2k`` goes in the low nibble of byte ``k`` and element ``2k+1`` in the high nibble;
an odd count leaves the last high nibble 0. Signed values are two's complement in 4 bits
(``[-8, 7]``), unsigned ones ``[0, 15]``. In memory intq keeps one value per byte (``i8`` or
``u8`` with a 4-bit ``QuantParams``); only saved artifacts pack.
"""

from __future__ import annotations

import numpy as np

from intq.ir.types import TensorType


def fits_int4(array: np.ndarray, signed: bool) -> bool:
    """Whether every element of an integer ``array`` fits 4 bits."""
    if array.dtype.kind not in "iu":
        return False
    if array.size == 0:
        return True
    low, high = (-8, 7) if signed else (0, 15)
    return bool(array.min() >= low and array.max() <= high)


def packed_int4(t: TensorType) -> bool | None:
    """For a constant of type ``t``: ``True``/``False`` (signed/unsigned) when it is a 4-bit
    quantized tensor stored one per byte (``i8``/``u8`` with ``q(bits<=4)``), else ``None``."""
    q = t.quant
    if q is None or q.bits > 4 or t.dtype.numpy.itemsize != 1 or t.dtype.numpy.kind not in "iu":
        return None
    return t.dtype.numpy.kind == "i"


def pack_int4(array: np.ndarray) -> bytes:
    """The elements of ``array`` (each fitting 4 bits) packed two per byte."""
    nibbles = (array.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(raw: bytes, count: int, signed: bool) -> np.ndarray:
    """``count`` 4-bit values from ``raw`` (as :func:`pack_int4` wrote) as int8 or uint8.

    Raises ``ValueError`` when ``raw`` has the wrong length or a non-zero padding nibble.
    """
    if len(raw) != (count + 1) // 2:
        raise ValueError(f"{len(raw)} bytes hold {2 * len(raw)} 4-bit values, not {count}")
    data = np.frombuffer(raw, dtype=np.uint8)
    nibbles = np.empty(2 * data.size, np.uint8)
    nibbles[0::2] = data & 0xF
    nibbles[1::2] = data >> 4
    if count % 2 and nibbles[-1]:
        raise ValueError("the padding nibble after the last value is not 0")
    nibbles = nibbles[:count]
    if signed:
        return (nibbles.astype(np.int8) ^ 8) - 8  # sign-extend bit 3
    return nibbles


__all__ = ["fits_int4", "pack_int4", "packed_int4", "unpack_int4"]
