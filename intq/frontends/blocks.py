"""``nn.Unfold`` and ``nn.Fold`` (ONNX Col2Im, ATen ``im2col`` / ``col2im``) as IR ops, for
both frontends.

Blocks that tile the image (stride = block, no dilation or padding: MobileViT-V2's patches)
are a Reshape and a Transpose each way, exact and free. Otherwise unfolding is a convolution
and folding a transposed convolution, grouped per channel, whose one-hot kernel moves each
block element to or from its offset: where folded blocks overlap, their sums are the integer
path's accumulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from intq.errors import ShapeError, UnsupportedOpError
from intq.ir.graph import Value


class Emit(Protocol):
    """Adds one IR node for the source op; ``suffix`` names an intermediate output ("" for
    the source op's own output)."""

    def __call__(self, op: str, inputs: Sequence[Value | None], suffix: str, **attrs) -> Value: ...


class Constant(Protocol):
    """Adds a constant named after the source op plus ``suffix``."""

    def __call__(self, array: np.ndarray, suffix: str) -> Value: ...


@dataclass(frozen=True)
class Blocks:
    """The sliding blocks of an image: ``block`` values apart by ``strides``, ``dilations``
    inside a block, the image padded by ``pads`` (ONNX order: all begins, then all ends)."""

    image: tuple[int, ...]
    block: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]

    def check(self, node: str) -> None:
        """Refuse a geometry with no blocks or mismatched lengths, naming ``node``."""
        d = len(self.block)
        lengths = {len(self.image), len(self.strides), len(self.dilations), len(self.pads) / 2}
        positive = self.image + self.block + self.strides + self.dilations
        if d < 1 or lengths != {d} or min(positive) < 1 or min(self.pads) < 0:
            raise ShapeError(
                f"blocks {list(self.block)} over the image {list(self.image)} with strides"
                f" {list(self.strides)}, dilations {list(self.dilations)} and pads"
                f" {list(self.pads)}: every size must be >= 1 and every pad >= 0",
                node=node,
            )
        if min(self.counts) < 1:
            raise ShapeError(
                f"blocks {list(self.block)} do not fit in the padded image {list(self.image)}",
                node=node,
            )

    @property
    def reach(self) -> tuple[int, ...]:
        """A block's extent in the image, dilation included."""
        return tuple(d * (k - 1) + 1 for d, k in zip(self.dilations, self.block))

    @property
    def counts(self) -> tuple[int, ...]:
        """Blocks along each axis."""
        d = len(self.block)
        return tuple(
            (self.image[i] + self.pads[i] + self.pads[d + i] - self.reach[i]) // self.strides[i] + 1
            for i in range(d)
        )

    @property
    def size(self) -> int:
        """Values in one block."""
        return int(np.prod(self.block))

    @property
    def tiles(self) -> bool:
        """Whether the blocks cover the image exactly once (a pure data movement)."""
        return (
            self.strides == self.block
            and set(self.dilations) == {1}
            and set(self.pads) == {0}
            and all(c * k == n for c, k, n in zip(self.counts, self.block, self.image))
        )

    def require_float(self, x: Value, node: str) -> None:
        """Overlapping blocks are a (transposed) convolution: float values only."""
        if not self.tiles and not x.type.dtype.is_float:
            raise UnsupportedOpError(
                f"overlapping blocks of {x.type.dtype.name} values (only float ones)", node=node
            )

    def one_hot(self, channels: int, dtype: np.dtype) -> np.ndarray:
        """The grouped kernel ``[channels * size, 1, *block]`` with a 1 at each block
        element's offset: block element ``m`` of channel ``c`` is channel ``c * size + m``."""
        kernel = np.zeros((channels, self.size, *self.block), dtype)
        for m, offset in enumerate(np.ndindex(*self.block)):
            kernel[(slice(None), m, *offset)] = 1
        return kernel.reshape(channels * self.size, 1, *self.block)

    def _interleave(self, d: int) -> list[int]:
        """``[N, C, k1..kd, L1..Ld]`` -> ``[N, C, L1, k1, ..., Ld, kd]``."""
        return [0, 1, *(a for i in range(d) for a in (2 + d + i, 2 + i))]


def fold(emit: Emit, constant: Constant, x: Value, blocks: Blocks, node: str) -> Value:
    """``[N, C * size, L]`` blocks summed into ``[N, C, *image]``."""
    blocks.check(node)
    d, counts = len(blocks.block), blocks.counts
    if x.type.rank != 3 or x.type.shape[1] % blocks.size or x.type.shape[2] != np.prod(counts):
        raise ShapeError(
            f"folding {list(blocks.block)} blocks over the image {list(blocks.image)} needs"
            f" [N, C*{blocks.size}, {int(np.prod(counts))}], got {list(x.type.shape)}",
            node=node,
        )
    blocks.require_float(x, node)
    n, stacked = x.type.shape[:2]
    channels = stacked // blocks.size
    if blocks.tiles:
        split = emit("Reshape", [x], ".blocks", shape=(n, channels, *blocks.block, *counts))
        moved = emit("Transpose", [split], ".moved", perm=tuple(blocks._interleave(d)))
        return emit("Reshape", [moved], "", shape=(n, channels, *blocks.image))
    weight = constant(blocks.one_hot(channels, x.type.dtype.numpy), ".one_hot")
    grid = emit("Reshape", [x], ".grid", shape=(n, stacked, *counts))
    # What the floor division of ``counts`` left over at the end of each axis.
    extra = tuple(
        blocks.image[i]
        + blocks.pads[i]
        + blocks.pads[d + i]
        - (counts[i] - 1) * blocks.strides[i]
        - blocks.reach[i]
        for i in range(d)
    )
    return emit(
        "ConvTranspose",
        [grid, weight, None],
        "",
        strides=blocks.strides,
        pads=blocks.pads,
        dilations=blocks.dilations,
        output_padding=extra,
        group=channels,
    )


def unfold(emit: Emit, constant: Constant, x: Value, blocks: Blocks, node: str) -> Value:
    """``[N, C, *image]`` as its blocks ``[N, C * size, L]``."""
    blocks.check(node)
    d, counts = len(blocks.block), blocks.counts
    if x.type.rank != 2 + d or tuple(x.type.shape[2:]) != blocks.image:
        raise ShapeError(
            f"unfolding {list(blocks.block)} blocks needs [N, C, *{list(blocks.image)}], got"
            f" {list(x.type.shape)}",
            node=node,
        )
    blocks.require_float(x, node)
    n, channels = x.type.shape[:2]
    flat = (n, channels * blocks.size, int(np.prod(counts)))
    if blocks.tiles:
        split = emit(
            "Reshape", [x], ".blocks",
            shape=(n, channels, *(a for c, k in zip(counts, blocks.block) for a in (c, k))),
        )  # fmt: skip
        # [N, C, L1, k1, ..., Ld, kd] -> [N, C, k1..kd, L1..Ld]: the inverse of fold's perm.
        inverse = np.argsort(blocks._interleave(d)).tolist()
        moved = emit("Transpose", [split], ".moved", perm=tuple(inverse))
        return emit("Reshape", [moved], "", shape=flat)
    weight = constant(blocks.one_hot(channels, x.type.dtype.numpy), ".one_hot")
    grid = emit(
        "Conv", [x, weight, None], ".grid",
        strides=blocks.strides, pads=blocks.pads, dilations=blocks.dilations, group=channels,
    )  # fmt: skip
    return emit("Reshape", [grid], "", shape=flat)


__all__ = ["Blocks", "fold", "unfold"]
