"""TIR schedules for the TVM backend's integer kernels on x86 (AVX2, VNNI) and other CPUs.

The kernels arrive as TE functions (:mod:`intq.backends.tvm_kernels`) whose compute
fixes the arithmetic; a schedule only reorders, tiles, vectorizes and
parallelizes it, so exactness does not depend on it (the tests compare every
scheduled model with the reference interpreter anyway).

- ``conv`` (NHWC) and ``dense``: the ``dot`` block reduces int16 channel pairs
  into 8 int32 output-channel lanes. Its two innermost loops (8 lanes x 2
  channels) are tensorized with :data:`AVX2_DOT_8x2` -- one ``vpmaddwd``, 16
  multiply-adds -- inside a register tile, accumulated in a local buffer: 4 output
  columns x 2 channel blocks (or up to 8 columns x 1, :func:`_conv_tile`) for the
  conv, visiting every output-channel block while the tile's input is in cache
  (weights larger than L2 are streamed once instead), and 4 rows x 3 blocks of 8
  columns for the dense. The conv's requantization epilogue
  runs per tile, right after its accumulators; the dense one's after the product.
  Kernels reducing 4 byte channels per lane use :data:`AVX2_DOT_8x4` (``vpmaddubsw``,
  weights that cannot saturate it) or, on targets with VNNI (:class:`Isa`),
  :data:`VNNI_DOT_8x4`: one ``vpdpbusd``, exact for any 8-bit weights.
  Without AVX2 (AArch64, plain x86) the same tiles use vector multiply-adds.
- ``depthwise`` (NHWC): up to 8 channels per vector x 8 output columns per tile
  (divisors: a predicated tail would be scalarized), the kxk taps unrolled, the
  epilogue per tile.
- ``pool`` (NHWC max/average pools): rows in parallel, the window's taps outside
  a vector of channels.
- ``conv_transpose`` (NHWC, one stride phase's taps): rows in parallel, up to 4 output
  columns x a vector of up to 16 output channels per tile, the epilogue per tile.
- ``elementwise`` and ``generic`` (grouped or unsigned 16-bit convs and matmuls,
  layout changes): the outer loops fused and parallel, the innermost vectorized where
  it is contiguous; a ``generic`` reduction runs its reduction loops outside the
  innermost output loop, vectorized (:func:`schedule_generic`).
- ``fused`` (Relax ops fused by ``FuseOps``/``FuseTIR``: the transformer kernels' int64
  arithmetic): one parallel loop over rows, every block computed inside it, vectorized
  (:func:`schedule_fused_rows`); ``fused-loops``, its fallback: each elementwise block's
  innermost loop vectorized.

Every kernel falls back to a plain parallel schedule, and then to TVM's
default loops, if its schedule cannot be applied (logged at debug level; the executable's
``fallbacks`` lists them and the build warns).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tvm import s_tir
from tvm.script import tirx as T

log = logging.getLogger(__name__)

# ----- the AVX2 dot-product intrinsics --------------------------------------------------------


def _dot_desc(depth: int, dtype: str) -> Any:
    """What the intrinsics compute: ``c[i] += sum_k a[k] * b[i, k]`` over 8 int32 lanes and
    ``depth`` activations ``a`` of ``dtype``, with int8 weights ``b``."""

    @T.prim_func(s_tir=True)
    def desc(
        a: T.Buffer((depth,), dtype, offset_factor=1),
        b: T.Buffer((8, depth), "int8", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:depth], b[0:8, 0:depth])
            T.writes(c[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, depth):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    return desc


@T.prim_func(s_tir=True)
def _dot_8x2_avx2(
    a: T.Buffer((2,), "int16", offset_factor=1),
    b: T.Buffer((8, 2), "int8", offset_factor=1),
    c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:8], a[0:2], b[0:8, 0:2])
        T.writes(c[0:8])
        pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
        both = T.reinterpret(T.broadcast(pair, 8), dtype="int16x16")
        c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            both,
            T.Cast("int16x16", b.vload([0, 0], dtype="int8x16")),
            dtype="int32x8",
        )


AVX2_DOT_8x2 = "intq_avx2_dot_8x2_i16i8i32"
"""``c[i] += a[0]*b[i,0] + a[1]*b[i,1]`` for 8 lanes: one ``vpmaddwd`` and one add (the
pair broadcast straight from memory: the kernels widen activations to int16 first; the
int8 weights widen as they load, one ``vpmovsxbw``, which halves their memory traffic:
measured 2-4% faster on EfficientNet-Lite0 and the ResNet than int16 weights)."""


@T.prim_func(s_tir=True)
def _dot_8x4_avx2(
    a: T.Buffer((4,), "uint8", offset_factor=1),
    b: T.Buffer((8, 4), "int8", offset_factor=1),
    c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(c[0:8], a[0:4], b[0:8, 0:4])
        T.writes(c[0:8])
        quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
        pairs = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
            T.reinterpret(T.broadcast(quad, 8), dtype="uint8x32"),
            b.vload([0, 0], dtype="int8x32"),
            dtype="int16x16",
        )
        c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            pairs,
            T.broadcast(T.int16(1), 16),
            dtype="int32x8",
        )


AVX2_DOT_8x4 = "intq_avx2_dot_8x4_u8i8i32"
"""``c[i] += a[0]*b[i,0] + ... + a[3]*b[i,3]`` for 8 lanes: ``vpmaddubsw`` (unsigned x
signed bytes, pairs added with int16 saturation, so only for weights that cannot saturate:
see ``intq.backends.tvm_kernels.reduction_depth``), ``vpmaddwd`` by ones, an add: 32
multiply-adds in three instructions, against 16 in two for :data:`AVX2_DOT_8x2`."""


def _dot_8x4_vnni(operands: str) -> Any:
    """``vpdpbusd`` on 8 int32 lanes, its two byte operands passed as ``operands``: LLVM 22
    (apache-tvm 0.27's) declares the intrinsic's operands ``<32 x i8>``, older LLVMs
    ``<8 x i32>`` (what TVM's own ``dot_16x4_vnni`` passes, and what LLVM 22's verifier
    rejects). A mismatch fails the compile loudly (an ``IntqError``), never silently."""

    @T.prim_func(s_tir=True)
    def impl(
        a: T.Buffer((4,), "uint8", offset_factor=1),
        b: T.Buffer((8, 4), "int8", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:4], b[0:8, 0:4])
            T.writes(c[0:8])
            quad = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
                c.vload([0], dtype="int32x8"),
                T.reinterpret(T.broadcast(quad, 8), dtype=operands),
                T.reinterpret(b.vload([0, 0], dtype="int8x32"), dtype=operands),
                dtype="int32x8",
            )

    return impl


def _vnni_operands() -> str:
    """The operand type of :func:`_dot_8x4_vnni` for the LLVM that TVM was built with."""
    from tvm.target import codegen

    return "int8x32" if codegen.llvm_version_major() >= 22 else "int32x8"


VNNI_DOT_8x4 = "intq_vnni_dot_8x4_u8i8i32"
"""``c[i] += a[0]*b[i,0] + ... + a[3]*b[i,3]`` for 8 lanes: one ``vpdpbusd`` (AVX512-VNNI
on 256 bits, or AVX-VNNI, which LLVM encodes from the same intrinsic). It multiplies
unsigned by signed bytes and adds all four products into the int32 lane with no
intermediate rounding or saturation (a product is at most ``255 * 128``; the four and the
lane add wrap modulo 2^32 like any int32 add), so it computes the description exactly for
full-range 8-bit weights: 32 multiply-adds in one instruction."""

INTRINSICS = {2: AVX2_DOT_8x2, 4: AVX2_DOT_8x4}
"""The tensorized dot product by input channels per lane (AVX2 without VNNI)."""

_registered = False


def register_intrinsics() -> None:
    """Register :data:`AVX2_DOT_8x2`, :data:`AVX2_DOT_8x4` and :data:`VNNI_DOT_8x4` with
    TVM (once per process)."""
    global _registered
    if not _registered:
        for name, desc, impl in (
            (AVX2_DOT_8x2, _dot_desc(2, "int16"), _dot_8x2_avx2),
            (AVX2_DOT_8x4, _dot_desc(4, "uint8"), _dot_8x4_avx2),
            (VNNI_DOT_8x4, _dot_desc(4, "uint8"), _dot_8x4_vnni(_vnni_operands())),
        ):
            s_tir.TensorIntrin.register(name, desc, impl, override=True)
        _registered = True


# ----- schedules ------------------------------------------------------------------------------

WEIGHTS_IN_CACHE = 512 * 1024
"""Packed int8 conv weights above this many bytes (one Zen 3 core's L2) stream from memory."""

Sch = Any


def _extent(sch: Sch, loop: Any) -> int:
    return int(sch.get(loop).extent)


def _divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit``."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _blocks(sch: Sch) -> dict[str, Any]:
    root = sch.get_sblock("root")
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(root)}


def _parallel_outer(sch: Sch, block: Any, keep: int = 1, vectorize: bool = False) -> None:
    """Fuse all but the ``keep`` innermost spatial loops of an unscheduled ``block``
    and run them in parallel; ``vectorize`` the innermost loop of an elementwise block
    (up to 16 lanes: int64 epilogues become 4-lane AVX2 ops)."""
    loops = sch.get_loops(block)
    spatial = loops[: sum(int(iv.iter_type) == 0 for iv in sch.get(block).iter_vars)]
    if len(spatial) > keep:
        outer = spatial[: len(spatial) - keep]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    elif spatial:
        sch.parallel(spatial[0])
    if vectorize and len(spatial) == len(loops) > 1:
        _vectorize_innermost(sch, loops[-1])


def _vectorize_innermost(sch: Sch, inner: Any) -> None:
    """Vectorize ``inner`` by its largest divisor up to 16 lanes (splitting it if that is
    less than its extent); nothing when that divisor is 1."""
    lanes = _divisor(_extent(sch, inner), 16)
    if lanes > 1:
        if lanes < _extent(sch, inner):
            _, inner = sch.split(inner, [None, lanes])
        sch.vectorize(inner)


def _epilogue(sch: Sch, producer: str, parallel: bool = True) -> Any | None:
    """Inline every block after ``producer`` into the last one (bias, index maps, the
    requantization) and parallelize it if asked; returns it (``None`` if ``producer`` is last)."""
    blocks = _blocks(sch)
    order = list(blocks)
    after = order[order.index(producer) + 1 :]
    for name in after[:-1]:
        sch.compute_inline(blocks[name])
    if not after:
        return None
    last = _blocks(sch)[after[-1]]
    if parallel:
        _parallel_outer(sch, last, keep=1, vectorize=True)
    return last


def _cpu_features(target: Any) -> frozenset[str]:
    """The LLVM CPU features of an ``llvm`` ``target`` (its ``mcpu`` and ``mattr``), else none."""
    if target is None or target.kind.name != "llvm":
        return frozenset()
    from tvm.target import codegen

    return frozenset(codegen.llvm_get_cpu_features(target))


@dataclass(frozen=True)
class Isa:
    """The x86 dot-product instructions the kernels of a target may use, read from the LLVM
    target's features at compile time (never from the machine compiling it)."""

    avx2: bool = False
    """``vpmaddwd`` and ``vpmaddubsw`` on 256 bits."""
    vnni: bool = False
    """``vpdpbusd`` on 256 bits: AVX512-VNNI with AVX512-VL (``znver4``, ``cascadelake``,
    ``+avx512vnni,+avx512vl``) or AVX-VNNI (``alderlake``, ``+avxvnni``)."""
    registers: int = 16
    """x86 vector registers: 32 with AVX-512 (``avx512f``), room for wider register tiles
    (16 otherwise, and for other ISAs, which no tile here reads it for)."""

    @staticmethod
    def of(target: Any) -> Isa:
        """What ``target`` (a ``tvm.target.Target``, or None) has."""
        features = _cpu_features(target)
        avx2 = "avx2" in features
        evex = {"avx512vnni", "avx512vl"} <= features
        vnni = avx2 and (evex or "avxvnni" in features)
        return Isa(avx2=avx2, vnni=vnni, registers=32 if "avx512f" in features else 16)


KERNEL_PATHS = ("vnni", "byte", "vpmaddwd", "vector", "fallback")
"""What a conv or dense kernel's inner product ran as: ``vpdpbusd``; ``vpmaddubsw``;
``vpmaddwd`` on int16; plain vector multiply-adds (no x86 dot product: AArch64, x86
without AVX2); or a plainer schedule, its own having failed (see :func:`schedule_module`)."""


def _lanes(sch: Sch, dot: Any, reduction: Any, lanes: Any, pair: Any, isa: Isa) -> str:
    """The 8 lanes x 2 (or 4) channel loops of ``dot``: one ``vpmaddwd``, ``vpdpbusd`` (VNNI)
    or ``vpmaddubsw`` and ``vpmaddwd`` with AVX2, else a vector of 8 int32 multiply-adds per
    channel (what other ISAs vectorize). Returns the kernel path (:data:`KERNEL_PATHS`)."""
    depth = _extent(sch, pair)
    if isa.avx2:
        init = sch.decompose_reduction(dot, reduction)
        sch.vectorize(sch.get_loops(init)[-1])
        if depth == 4 and isa.vnni:
            sch.tensorize(lanes, VNNI_DOT_8x4)
            return "vnni"
        sch.tensorize(lanes, INTRINSICS[depth])
        return "byte" if depth == 4 else "vpmaddwd"
    sch.reorder(pair, lanes)
    sch.vectorize(lanes)
    sch.unroll(pair)
    init = sch.decompose_reduction(dot, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    return "vector"


def _pad(sch: Sch) -> None:
    """A kernel's ``pad`` block (if any): rows in parallel, channels vectorized, and an
    NHWC pad's columns a plain loop between them. (Columns fused into the parallel loop cost
    a division per pixel to recover the row: measured in-process, interleaved, one thread,
    the ResNet's convs went from 8.15 to 7.10 ms, EfficientNet-Lite0's 3x3 stem from 0.43
    to 0.33 ms.)"""
    pad = _blocks(sch).get("pad")
    if pad is not None:
        _parallel_outer(sch, pad, keep=2, vectorize=True)


def schedule_conv(sch: Sch, isa: Isa) -> str:
    """NHWC ``[pad] -> dot`` (tensorized, register tile over output columns) -> epilogue;
    returns the kernel path."""
    epilogue = _epilogue(sch, "dot", parallel=False)
    _pad(sch)
    dot = _blocks(sch)["dot"]
    n, i, j, ko, ki, ry, rx, rc, rt = sch.get_loops(dot)
    taps = _extent(sch, ry) * _extent(sch, rx)
    weight_bytes = _extent(sch, ko) * _extent(sch, ki) * taps * _extent(sch, rc) * _extent(sch, rt)
    wide = isa.vnni and isa.registers == 32 and _extent(sch, rt) == 4
    columns, blocks = _conv_tile(_extent(sch, j), _extent(sch, ko), wide)
    jo, ji = sch.split(j, [None, columns])
    koo, koi = sch.split(ko, [None, blocks])
    if taps > 1 and weight_bytes > WEIGHTS_IN_CACHE:  # int8 weights
        # Weights larger than L2 (ResNet's 3x3 convs at 7x7 and 4x4): each block of
        # output channels visits every output pixel, so the weights stream in once rather
        # than once per output row. Measured with cold caches, as in a model: 512
        # channels at 4x4 1.06 -> 0.74 ms, 256 at 7x7 0.62 -> 0.54 ms; 1x1 convs gained
        # nothing.
        sch.reorder(n, koo, i, jo, ry, rx, rc, ji, koi, ki, rt)
        sch.parallel(sch.fuse(n, koo))
        tile = jo
    else:
        # Each tile of output columns through every output-channel block, while its input
        # rows are in cache (measured here: as fast or faster than channel blocks
        # outermost for every ResNet-18 and EfficientNet-Lite0 shape with weights in
        # cache, up to 1.5x for 1x1 convs).
        sch.reorder(n, i, jo, koo, ry, rx, rc, ji, koi, ki, rt)
        sch.parallel(sch.fuse(n, i))
        tile = koo
    local = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(local, tile)
    path = _lanes(sch, dot, ry, ki, rt, isa)
    sch.unroll(ji)
    sch.unroll(koi)
    sch.vectorize(sch.get_loops(local)[-1])
    if epilogue is not None:
        # The requantization of each tile right after its accumulators: the int32
        # tensor never leaves the cache.
        sch.reverse_compute_at(epilogue, tile)
        sch.vectorize(sch.get_loops(epilogue)[-1])
    return path


def _conv_tile(width: int, channel_blocks: int, wide: bool = False) -> tuple[int, int]:
    """The conv's register tile: (output columns, blocks of 8 output channels).

    4 columns x 2 blocks when they divide the row and the channels (8 accumulators, each
    broadcast pair feeding two ``vpmaddwd``), else up to 8 columns of one block (a
    predicated tail would be scalarized). Measured here, interleaved, one thread: 3x3
    convs at 56x56 and 28x28 (64 and 128 channels) 105 -> 126 and 97 -> 124 GOPS; 1x1
    convs about the same; 3 blocks or 6 columns were slower on EfficientNet's expand convs.

    ``wide`` (the ``vpdpbusd`` kernel with 32 vector registers, AVX-512) doubles the blocks
    where the channels allow: 4 x 4, or up to 8 columns x 2 blocks (up to 16 accumulators,
    enough independent ``vpdpbusd`` chains to hide their latency). Measured on a Zen 4,
    interleaved, one thread, G multiply-adds/s: ResNet's 3x3 convs 171 -> 192 (64 channels
    at 28x28), 182 -> 214 (128 at 14x14), 176 -> 211 (256 at 7x7), 189 -> 190 (512 at
    4x4); 1x1 convs at 14x14 and 7x7 (96-960 channels) 109-173 -> 137-205.
    """
    if wide and channel_blocks % 2 == 0:
        if width % 4 == 0:
            return 4, 4 if channel_blocks % 4 == 0 else 2
        return _divisor(width, 8), 2
    if width % 4 == 0 and channel_blocks % 2 == 0:
        return 4, 2
    return _divisor(width, 8), 1


def schedule_dense(sch: Sch, isa: Isa) -> str:
    """``pad -> dot`` (tensorized; a tile of up to 4 rows x 3 blocks of 8 columns: 12
    accumulators, the weights of a block loaded once per row; 6 blocks on AVX-512 targets)
    -> epilogue; returns the kernel path."""
    _epilogue(sch, "dot")
    _pad(sch)
    dot = _blocks(sch)["dot"]
    r, jo, ji, rk, rt = sch.get_loops(dot)
    # With 32 vector registers (AVX-512), 4 rows x 6 blocks: 24 accumulators, 6 weight
    # vectors loaded per 4 broadcasts. Measured on a Zen 4 (MiniLM's projections, one
    # thread, CPU time under load): 4.9 -> 3.7 ms per run with vpmaddwd on its 16-bit
    # activations; 8 x 3 and 2 x 8 were about as fast as 4 x 6.
    wide = isa.avx2 and isa.registers == 32
    ro, ri = sch.split(r, [None, _divisor(_extent(sch, r), 4)])
    joo, joi = sch.split(jo, [None, _divisor(_extent(sch, jo), 6 if wide else 3)])
    sch.reorder(ro, joo, rk, ri, joi, ji, rt)
    outer = sch.fuse(ro, joo)
    sch.parallel(outer)
    local = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(local, outer)
    path = _lanes(sch, dot, rk, ji, rt, isa)
    sch.unroll(ri)
    sch.unroll(joi)
    sch.vectorize(sch.get_loops(local)[-1])
    return path


def schedule_depthwise(sch: Sch, isa: Isa) -> None:
    """NHWC: up to 8 channels per vector x 8 output columns per tile (neighbouring columns
    share input vectors), taps unrolled, the epilogue per tile. Measured against 16 x 4,
    interleaved, on EfficientNet-Lite0's depthwise shapes: as fast or faster on all but
    one (96 channels at 112x112, stride 2: 0.27 -> 0.30 ms), up to 1.8x on the 5x5 ones
    (1152 channels at 7x7: 0.111 -> 0.062 ms)."""
    epilogue = _epilogue(sch, "acc", parallel=False)
    _pad(sch)
    acc = _blocks(sch)["acc"]
    b, i, j, k, ry, rx = sch.get_loops(acc)
    # Divisors: a predicated tail would be scalarized.
    ko, ki = sch.split(k, [None, _divisor(_extent(sch, k), 8)])
    jo, ji = sch.split(j, [None, _divisor(_extent(sch, j), 8)])
    sch.reorder(b, i, jo, ko, ry, rx, ji, ki)
    sch.parallel(sch.fuse(b, i))
    local = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(local, ko)
    sch.vectorize(ki)
    sch.unroll(ji)
    sch.unroll(rx)
    sch.unroll(ry)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(local)[-1])
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, ko)
        sch.vectorize(sch.get_loops(epilogue)[-1])


def schedule_conv_transpose(sch: Sch, isa: Isa) -> None:
    """An NHWC transposed conv (``acc`` over one stride phase's taps and the input channels,
    then maybe an epilogue): output rows in parallel, a register tile of up to 4 output
    columns x a vector of up to 16 output channels (the weights of one tap and input channel
    are contiguous over them, the input a broadcast), the epilogue per tile. The corpus UNet
    (two stride-2 upsampling layers, 64 -> 32 and 32 -> 16 channels, 64x64 output), one
    thread, loaded 2-core Zen 4 VM: 20.3 ms a run with the generic NCHW kernel (its two
    transposed convs 20 ms of it), 1.7 ms with this one."""
    epilogue = _epilogue(sch, "acc", parallel=False)
    acc = _blocks(sch)["acc"]
    b, i, j, k, ry, rx, rc = sch.get_loops(acc)
    # Divisors: a predicated tail would be scalarized.
    ko, ki = sch.split(k, [None, _divisor(_extent(sch, k), 16)])
    jo, ji = sch.split(j, [None, _divisor(_extent(sch, j), 4)])
    sch.reorder(b, i, jo, ko, ry, rx, rc, ji, ki)
    sch.parallel(sch.fuse(b, i))
    local = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(local, ko)
    _vectorize_lanes(sch, ki)
    sch.unroll(ji)
    init = sch.decompose_reduction(acc, ry)
    _vectorize_lanes(sch, sch.get_loops(init)[-1])
    _vectorize_lanes(sch, sch.get_loops(local)[-1])
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, ko)
        _vectorize_lanes(sch, sch.get_loops(epilogue)[-1])


def _vectorize_lanes(sch: Sch, loop: Any) -> None:
    """Vectorize ``loop`` unless it has one iteration (a single output channel)."""
    if _extent(sch, loop) > 1:
        sch.vectorize(loop)


def schedule_pool(sch: Sch, isa: Isa) -> None:
    """An NHWC pool (``maxpool``/``pool`` block, then maybe an epilogue): output rows in
    parallel, the window's taps outside a vector of up to 16 channels."""
    blocks = _blocks(sch)
    pool = blocks.get("maxpool", blocks.get("pool"))
    n, i, j, c, *taps = sch.get_loops(pool)
    co, ci = sch.split(c, [None, _divisor(_extent(sch, c), 16)])
    sch.reorder(n, i, j, co, *taps, ci)
    sch.parallel(sch.fuse(n, i))
    later = list(blocks)[list(blocks).index(sch.get(pool).name_hint) + 1 :]
    if taps:
        # Reduce into registers (a reduction vectorizes only into a local buffer).
        local = sch.cache_write(pool, 0, "local")
        sch.reverse_compute_at(local, co)
        sch.vectorize(ci)
        init = sch.decompose_reduction(pool, taps[0])
        sch.vectorize(sch.get_loops(init)[-1])
        sch.vectorize(sch.get_loops(local)[-1])
    else:
        sch.vectorize(ci)
    for name in later:
        _parallel_outer(sch, _blocks(sch)[name], keep=1, vectorize=True)


def schedule_fused(sch: Sch, isa: Isa) -> None:
    """Relax ops fused into one prim func, where :func:`schedule_fused_rows` does not apply:
    the innermost loop of every elementwise block vectorized, serially. Measured on MiniLM, one
    thread: 18 -> 15 ms. Inlining the blocks into each other instead repeats shared
    subexpressions at every use (LLVM did not finish), and a parallel region per block
    cost more than it saved."""
    for block in _blocks(sch).values():
        loops = sch.get_loops(block)
        iters = sch.get(block).iter_vars
        if not loops or len(loops) != len(iters) or any(int(iv.iter_type) != 0 for iv in iters):
            continue  # a reduction, or loops around more than this block
        _vectorize_innermost(sch, loops[-1])


CHUNK = 64
"""Elements per step of a fused elementwise chain (:func:`schedule_fused_rows`): every
intermediate int64 buffer is then 512 bytes, and a 40-block chain's stay in L1."""


def schedule_fused_rows(sch: Sch, isa: Isa) -> None:
    """Relax ops fused into one prim func (the transformer kernels' int64 arithmetic), one
    row at a time: the last block's outer loops fused into one parallel loop of rows (one
    parallel region per kernel), and every other block computed inside it, its innermost
    loop vectorized. A chain without reductions (GELU, requantizations) steps through each
    row in chunks of :data:`CHUNK` elements; one with reductions (LayerNorm's sums,
    softmax's maximum and sum) computes whole rows, so that no reduction runs twice.
    Each intermediate then holds one row or chunk instead of the whole tensor (MiniLM's
    GELU: 42 int64 tensors of 393 KB each; TVM allocates each buffer where it is used and
    shrinks it to what that loop touches), so the chain runs in cache. Raises (and
    :func:`schedule_module` falls back to :func:`schedule_fused`) where a block cannot be
    moved into the row, such as a block no later block reads."""
    blocks = list(_blocks(sch).values())
    last = blocks[-1]
    loops = sch.get_loops(last)
    kinds = [int(iv.iter_type) for iv in sch.get(last).iter_vars]
    spatial = next((i for i, kind in enumerate(kinds) if kind), len(kinds))  # leading loops
    if not loops or len(loops) != len(kinds) or spatial == 0 or not all(kinds[spatial:]):
        raise ValueError("the last block has no spatial loops of its own to run by rows")
    reducing = any(int(iv.iter_type) != 0 for block in blocks for iv in sch.get(block).iter_vars)
    if spatial == len(kinds) == 1:
        loops = list(sch.split(loops[0], [None, _divisor(_extent(sch, loops[0]), CHUNK)]))
        kinds, spatial = [0, 0], 2
    outer = loops[: max(spatial - 1, 1)]
    rows = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    anchor = rows
    if not reducing and _extent(sch, loops[-1]) > CHUNK:
        anchor, _ = sch.split(loops[-1], [None, _divisor(_extent(sch, loops[-1]), CHUNK)])
    for block in reversed(blocks[:-1]):
        sch.compute_at(block, anchor, preserve_unit_loops=True)
    sch.parallel(rows)
    for block in blocks:
        own = sch.get_loops(block)
        block_kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
        if block is last:
            block_kinds = kinds[len(outer) :]
        if all(kind == 0 for kind in block_kinds):
            if len(own) > 1 and not sch.get(own[-1]).same_as(sch.get(anchor)):
                _vectorize_innermost(sch, own[-1])
        elif block_kinds:
            _vectorize_reduction(sch, block, own[-len(block_kinds) :], block_kinds)


def _vectorize_reduction(sch: Sch, block: Any, own: list[Any], kinds: list[int]) -> None:
    """A reduction block's own loops (``own``, one per iter var of ``kinds``) with its
    innermost spatial loop, if longer than 1, moved inside the reductions and vectorized
    (attention's row of products: 16 lanes of ``Q K^T`` reduced over the head's width, not
    16 serial dot products of 32 strided reads). Row sums keep their loops: LLVM
    vectorizes an integer sum itself."""
    spatial = [loop for loop, kind in zip(own, kinds) if kind == 0]
    reductions = [loop for loop, kind in zip(own, kinds) if kind != 0]
    if not spatial or _extent(sch, spatial[-1]) == 1 or kinds[-1] == 0:
        return
    sch.reorder(*reductions, spatial[-1])
    _vectorize_innermost(sch, spatial[-1])  # while the block is a reduction (with its init)
    init = sch.decompose_reduction(block, reductions[0])
    _vectorize_innermost(sch, sch.get_loops(init)[-1])


def schedule_elementwise(sch: Sch, isa: Isa) -> None:
    """Every block: outer loops fused and parallel."""
    for block in _blocks(sch).values():
        _parallel_outer(sch, block, keep=1, vectorize=True)


def schedule_generic(sch: Sch, isa: Isa) -> None:
    """Every block as :func:`schedule_elementwise` does, but a reduction block (a grouped
    conv, a 16-bit or generic matmul) with its reduction loops moved outside its innermost
    spatial loop, which is vectorized: a vector of outputs accumulates per step instead of
    one output over the whole reduction at a time (SqueezeBERT's grouped 1x1 convs over 16
    tokens ran at ~2 GOPS)."""
    for block in _blocks(sch).values():
        if not _vectorize_over_reduction(sch, block):
            _parallel_outer(sch, block, keep=1, vectorize=True)


def _vectorize_over_reduction(sch: Sch, block: Any) -> bool:
    """Schedule a reduction ``block`` (spatial loops, then reduction loops) as
    :func:`schedule_generic` says; False, and nothing changed, for any other block or an
    innermost spatial loop no vector width divides."""
    loops = sch.get_loops(block)
    kinds = [int(iv.iter_type) for iv in sch.get(block).iter_vars]
    spatial = next((i for i, kind in enumerate(kinds) if kind), len(kinds))
    if len(loops) != len(kinds) or spatial < 2 or spatial == len(kinds) or not all(kinds[spatial:]):
        return False
    inner = loops[spatial - 1]
    if _divisor(_extent(sch, inner), 16) == 1:
        return False
    outer = loops[: spatial - 1]
    sch.reorder(*loops[spatial:], inner)
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    # Vectorized while the block still has its init (a block without one is no reduction
    # block to TVM, and refuses); the init then moves out, and is vectorized on its own.
    _vectorize_innermost(sch, inner)
    init = sch.decompose_reduction(block, loops[spatial])
    _vectorize_innermost(sch, sch.get_loops(init)[-1])
    return True


SCHEDULES: dict[str, Callable[[Sch, Isa], str | None]] = {
    "conv": schedule_conv,
    "dense": schedule_dense,
    "depthwise": schedule_depthwise,
    "elementwise": schedule_elementwise,
    "pool": schedule_pool,
    "conv_transpose": schedule_conv_transpose,
    "fused": schedule_fused_rows,
    "fused-loops": schedule_fused,
    "generic": schedule_generic,
}
"""Kernel kind -> the function scheduling its prim func (returning the kernel path of a conv
or dense, :data:`KERNEL_PATHS`)."""


def schedule_module(
    mod: Any,
    kernels: Mapping[str, Any],
    target: Any,
    report: dict[str, str] | None = None,
    paths: dict[str, str] | None = None,
) -> Any:
    """Return ``mod`` with each kernel's prim func scheduled; a kernel whose schedule does
    not apply falls back to the elementwise one (not a fused one), then to TVM's default
    loops. ``report`` receives prim func name -> the schedule that applied (``"none"`` for
    the default); ``paths`` prim func name -> the kernel path of each conv and dense
    (:data:`KERNEL_PATHS`)."""
    register_intrinsics()
    isa = Isa.of(target)
    for gv in mod.get_global_vars():
        kernel = kernels.get(gv.name_hint)
        if kernel is None:
            continue
        func, applied, path = mod[gv], "none", None
        # A fused chain of Relax ops that cannot run row by row keeps TVM's loops rather
        # than a parallel region per block.
        fallback = "fused-loops" if kernel.kind == "fused" else "elementwise"
        for kind in (kernel.kind, fallback):
            sch = s_tir.Schedule(func)
            try:
                path = SCHEDULES[kind](sch, isa)
            except Exception as err:  # a schedule primitive refused: try the next one
                log.debug("%s %s: %s schedule failed: %s", gv.name_hint, kernel.nodes, kind, err)
                continue
            func, applied = sch.mod["main"], kind
            break
        if report is not None:
            report[gv.name_hint] = applied
        if paths is not None and kernel.kind in ("conv", "dense"):
            paths[gv.name_hint] = path if applied == kernel.kind and path else "fallback"
        mod.update_func(gv, func)
    return mod
