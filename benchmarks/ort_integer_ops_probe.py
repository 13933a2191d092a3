"""Probe what ONNX Runtime's CPUExecutionProvider does with standard-domain integer ops.

Every fact is checked by running tiny single-node (or few-node) models in ORT and comparing
with a numpy reference (exact equality for integers, bitwise equality for floats). Each
correctness probe runs twice, with graph optimizations disabled and with ORT_ENABLE_ALL, and
flags any difference between the two.

Run from the repository root::

    .venv/bin/python -m benchmarks.ort_integer_ops_probe          # about 10-15 s on 2 cores

Sections: 1 ConvInteger, 2 MatMulInteger, 3 integer arithmetic / tensor ops, 4 QuantizeLinear,
5 DequantizeLinear (int32, per-axis), 6 graph-optimizer effects on multi-node integer graphs.
"""

# The probe closures below are called at once inside their loops, so capturing loop
# variables is intended.
# ruff: noqa: B023

from __future__ import annotations

import platform
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)
OPT_LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
U8, S8, U16, S16, U32, S32, U64, S64, F32 = (
    np.uint8,
    np.int8,
    np.uint16,
    np.int16,
    np.uint32,
    np.int32,
    np.uint64,
    np.int64,
    np.float32,
)
TNAME = {
    U8: "u8",
    S8: "s8",
    U16: "u16",
    S16: "s16",
    U32: "u32",
    S32: "s32",
    U64: "u64",
    S64: "s64",
    F32: "f32",
}
OPT_DIFFS: list[str] = []  # probes whose result changed between optimization levels


# --------------------------------------------------------------------------- model helpers
def ir_version_for(opset: int) -> int:
    return 9 if opset <= 20 else 10


def make_model(nodes, inputs, outputs, inits=(), opset=21) -> bytes:
    graph = helper.make_graph(nodes, "probe", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version_for(opset)  # onnx 1.23 stamps IR 14, which ORT 1.31 refuses
    return model.SerializeToString()


def session(model: bytes, opt="off", threads=0) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[opt]
    so.intra_op_num_threads = threads
    so.log_severity_level = 4
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def tproto(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def node_model(op, inputs, out_types, attrs=None, opset=21, consts=()):
    """inputs: list of (name, array) or None (omitted optional input). Names in ``consts``
    become initializers; the rest become graph inputs with their array's shape."""
    in_names, gin, inits, feeds = [], [], [], {}
    for item in inputs:
        if item is None:
            in_names.append("")
            continue
        name, arr = item
        arr = np.asarray(arr)
        in_names.append(name)
        if name in consts:
            inits.append(numpy_helper.from_array(arr, name))
        else:
            gin.append(helper.make_tensor_value_info(name, tproto(arr.dtype), arr.shape))
            feeds[name] = arr
    outs = [f"y{i}" for i in range(len(out_types))]
    node = helper.make_node(op, in_names, outs, **(attrs or {}))
    gout = [
        helper.make_tensor_value_info(o, t if isinstance(t, int) else tproto(t), None)
        for o, t in zip(outs, out_types)
    ]
    return make_model([node], gin, gout, inits, opset), feeds


def short_err(e: Exception) -> str:
    s = str(e).replace("\n", " ")
    if "Status Message:" in s:  # runtime failure: keep the end of the message
        return "runtime error: ..." + s.strip()[-95:]
    for key in (
        "NOT_IMPLEMENTED",
        "Could not find an implementation",
        "Type Error",
        "INVALID_GRAPH",
        "INVALID_ARGUMENT",
        "FAIL",
    ):
        if key in s:
            i = s.find(key)
            return s[i : i + 110]
    return s[:110]


def run_model(model: bytes, feeds, opt="off"):
    return session(model, opt).run(None, feeds)


def run_both(model: bytes, feeds, label=""):
    """Run with optimizations off and on; returns the 'off' outputs (raises on failure)."""
    a = run_model(model, feeds, "off")
    b = run_model(model, feeds, "all")
    for x, y in zip(a, b):
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            OPT_DIFFS.append(label)
            break
    return a


def run_node(op, inputs, out_types, attrs=None, opset=21, consts=(), label=""):
    model, feeds = node_model(op, inputs, out_types, attrs, opset, consts)
    return run_both(model, feeds, label or op)


def exact(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(
        a.astype(np.int64) if a.dtype.kind in "iu" else a,
        b.astype(np.int64) if b.dtype.kind in "iu" else b,
    )


def bitexact(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def verdict(fn) -> str:
    """fn() -> (ok: bool, detail: str). Returns 'exact', 'MISMATCH ...' or 'unsupported: ...'"""
    try:
        ok, detail = fn()
    except Exception as e:
        return "unsupported: " + short_err(e)
    return ("exact" if ok else "MISMATCH") + (f" ({detail})" if detail else "")


def median_ms(sess, feeds, runs=20) -> float:
    for _ in range(3):
        sess.run(None, feeds)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def bench(model: bytes, feeds, ops: int):
    """Median ms with 1 intra-op thread and with ORT's default thread count (all cores).
    Returns (text, session) where text = 'ms GOPS | ms GOPS'."""
    cells = []
    sess = None
    for threads in (1, 0):
        sess = session(model, "all", threads=threads)
        ms = median_ms(sess, feeds)
        cells.append(f"{ms:7.2f} ms {ops / ms / 1e6:6.1f}")
    return " | ".join(cells), sess


def header(title: str):
    print("\n" + "=" * 100 + f"\n{title}\n" + "=" * 100)


def rand_int(dtype, shape, lo=None, hi=None):
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    hi = info.max if hi is None else hi
    return RNG.integers(lo, hi, size=shape, dtype=dtype, endpoint=True)


# --------------------------------------------------------------------------- references
def conv_ref(
    x, w, xzp=0, wzp=0, pads=(0, 0, 0, 0), strides=(1, 1), dil=(1, 1), group=1, pad_value_is_zp=True
):
    """Integer conv in int64. Padding is 'zero after zero-point subtraction' (pad_value_is_zp)
    or 'raw 0 before subtraction'."""
    x = x.astype(np.int64)
    w = w.astype(np.int64)
    wzp = np.asarray(wzp, np.int64).reshape(-1, 1, 1, 1) if np.ndim(wzp) else np.int64(wzp)
    w = w - wzp
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    pt, pl, pb, pr = pads
    pad_val = int(xzp) if pad_value_is_zp else 0
    xp = np.full((n, c, h + pt + pb, wd + pl + pr), pad_val, np.int64)
    xp[:, :, pt : pt + h, pl : pl + wd] = x
    xp = xp - int(xzp)
    oh = (h + pt + pb - dil[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (wd + pl + pr - dil[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, m, oh, ow), np.int64)
    mg = m // group
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                patch = xs[
                    :,
                    :,
                    i * dil[0] : i * dil[0] + strides[0] * (oh - 1) + 1 : strides[0],
                    j * dil[1] : j * dil[1] + strides[1] * (ow - 1) + 1 : strides[1],
                ]
                out[:, g * mg : (g + 1) * mg] += np.einsum(
                    "mc,nchw->nmhw", w[g * mg : (g + 1) * mg, :, i, j], patch
                )
    return out


def matmul_ref(a, b, azp=0, bzp=0):
    a = a.astype(np.int64) - np.asarray(azp, np.int64)
    b = b.astype(np.int64) - np.asarray(bzp, np.int64)
    return np.matmul(a, b)


PAIRS = [(U8, U8), (U8, S8), (S8, S8), (S8, U8)]


def pair_name(p):
    return f"{TNAME[p[0]]}x{TNAME[p[1]]}"


def extreme(dtype, sign=+1):
    info = np.iinfo(dtype)
    return info.max if sign > 0 else info.min


SWEEP_GRID = [(255, 64), (255, 65), (255, 128), (128, 128), (129, 128), (127, 128)]


def range_sweep(kind: str):
    """Saturation map of the mixed-sign pairs: the unsigned operand in [0, U], the signed one in
    [-S, min(S, 127)]. 'const' = every element at the extreme (u = U, s = -S and s = +S);
    'rand' = uniform random in the ranges."""
    if kind == "conv":
        pairs = [(S8, U8), (U8, S8)]
        shapes = ((1, 32, 12, 12), (32, 32, 3, 3))

        def op(x, w):
            return conv_integer(x, w, label="conv sweep"), conv_ref(x, w)
    else:
        pairs = [(U8, S8), (S8, U8)]
        shapes = ((64, 256), (256, 96))

        def op(a, b):
            return matmul_integer(a, b, label="mm sweep"), matmul_ref(a, b)

    name = "ConvInteger (x, w)" if kind == "conv" else "MatMulInteger (A, B)"
    print(
        f"\nRange sweep, {name}: unsigned operand in [0,U], signed operand in [-S,min(S,127)]; "
        "cell = const-extremes/random ('SAT' = wrong result)"
    )
    print(f"  {'pair':<8} " + " ".join(f"{f'U={u},S={s_}':<14}" for u, s_ in SWEEP_GRID))
    for t0, t1 in pairs:
        cells = []
        for ub, sb in SWEEP_GRID:
            res = []
            for mode in ("const", "rand"):
                ok = True
                for sv in (-sb, min(sb, 127)) if mode == "const" else (None,):
                    ops_ = []
                    for t, shp in zip((t0, t1), shapes):
                        if t == U8:
                            ops_.append(
                                np.full(shp, ub, U8)
                                if mode == "const"
                                else rand_int(U8, shp, 0, ub)
                            )
                        else:
                            ops_.append(
                                np.full(shp, sv, S8)
                                if mode == "const"
                                else rand_int(S8, shp, -sb, min(sb, 127))
                            )
                    try:
                        y, ref = op(*ops_)
                        ok &= exact(y, ref)
                    except Exception:
                        ok = None
                        break
                res.append("n/a" if ok is None else ("ok" if ok else "SAT"))
            cells.append("/".join(res))
        print(f"  {pair_name((t0, t1)):<8} " + " ".join(f"{c:<14}" for c in cells))


# --------------------------------------------------------------------------- 1. ConvInteger
def conv_integer(x, w, xzp=None, wzp=None, attrs=None, w_const=True, label="ConvInteger"):
    inputs = [
        ("x", x),
        ("w", w),
        None if xzp is None else ("xzp", np.asarray(xzp, x.dtype)),
        None if wzp is None else ("wzp", np.asarray(wzp, w.dtype)),
    ]
    while inputs and inputs[-1] is None:
        inputs.pop()
    consts = ("w", "wzp", "xzp") if w_const else ("xzp", "wzp")
    return run_node("ConvInteger", inputs, [S32], attrs, opset=10, consts=consts, label=label)[0]


def section_conv():
    header(
        "1. ConvInteger (opset 10), CPUExecutionProvider; x 1x32x12x12, w 32x32x3x3 unless "
        "noted; reference = int64 numpy"
    )
    shape_x, shape_w = (1, 32, 12, 12), (32, 32, 3, 3)
    p1 = {"pads": [1, 1, 1, 1]}
    rows = []
    for xt, wt in PAIRS:
        pn = pair_name((xt, wt))
        res = {}
        x = rand_int(xt, shape_x)
        w = rand_int(wt, shape_w)

        def rnd():
            y = conv_integer(x, w, attrs=p1, label=f"conv {pn} rnd")
            ref = conv_ref(x, w, pads=(1, 1, 1, 1))
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["random full-range, no zp"] = verdict(rnd)

        def rnd_in():
            y = conv_integer(x, w, attrs=p1, w_const=False, label=f"conv {pn} rnd w-input")
            ref = conv_ref(x, w, pads=(1, 1, 1, 1))
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["same, w as graph input (not initializer)"] = verdict(rnd_in)

        # worst case: x at the extreme that maximises |x*w| pairs
        xe = np.full(shape_x, extreme(xt, +1) if xt == U8 else extreme(xt, -1), xt)
        for wval_name, wval in [("w=min", extreme(wt, -1)), ("w=max", extreme(wt, +1))]:
            we = np.full(shape_w, wval, wt)

            def ext(xe=xe, we=we, wv=wval_name):
                y = conv_integer(xe, we, label=f"conv {pn} extreme {wv}")
                ref = conv_ref(xe, we)
                return exact(y, ref), f"got {int(y.flat[0])}, want {int(ref.flat[0])}"

            res[f"x={int(xe.flat[0])} all, {wval_name}={int(wval)} all"] = verdict(ext)

        xzp_v = 128 if xt == U8 else -5
        wzp_v = 3 if wt == U8 else -3

        def zp():
            y = conv_integer(x, w, xzp_v, wzp_v, attrs=p1, label=f"conv {pn} zp")
            ref = conv_ref(x, w, xzp_v, wzp_v, pads=(1, 1, 1, 1))
            alt = conv_ref(x, w, xzp_v, wzp_v, pads=(1, 1, 1, 1), pad_value_is_zp=False)
            pad = (
                "padding = x_zero_point"
                if exact(y, ref)
                else "padding = raw 0"
                if exact(y, alt)
                else f"max|err|={np.abs(y - ref).max()}"
            )
            return exact(y, ref), pad

        res[f"scalar zp given (xzp={xzp_v}, wzp={wzp_v}), pads 1"] = verdict(zp)

        # moderate values (no saturation possible) to isolate zp handling
        xm = rand_int(xt, shape_x, 0 if xt == U8 else -64, 100 if xt == U8 else 63)
        wm = rand_int(wt, shape_w, 0 if wt == U8 else -30, 60 if wt == U8 else 30)

        def zp_small():
            y = conv_integer(xm, wm, xzp_v, wzp_v, attrs=p1, label=f"conv {pn} zp small")
            ref = conv_ref(xm, wm, xzp_v, wzp_v, pads=(1, 1, 1, 1))
            return exact(y, ref), ""

        res["scalar zp given, small-range values"] = verdict(zp_small)

        wzp_vec = rand_int(wt, (shape_w[0],), 0 if wt == U8 else -8, 8)

        def zp_vec():
            y = conv_integer(xm, wm, xzp_v, wzp_vec, attrs=p1, label=f"conv {pn} zp vec")
            ref = conv_ref(xm, wm, xzp_v, wzp_vec, pads=(1, 1, 1, 1))
            return exact(y, ref), ""

        res["per-output-channel w_zero_point [M]"] = verdict(zp_vec)

        xd = rand_int(xt, (1, 16, 11, 11))
        wd = rand_int(wt, (16, 1, 3, 3))
        at = {"group": 16, "pads": [2, 1, 0, 2], "strides": [2, 1], "dilations": [2, 2]}

        def dw():
            y = conv_integer(xd, wd, attrs=at, label=f"conv {pn} depthwise")
            ref = conv_ref(xd, wd, pads=(2, 1, 0, 2), strides=(2, 1), dil=(2, 2), group=16)
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["depthwise group=16, asym pads, strides 2x1, dil 2, full range"] = verdict(dw)

        wg = rand_int(wt, (32, 8, 3, 3))

        def grp():
            y = conv_integer(
                x,
                wg,
                attrs={"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]},
                label=f"conv {pn} group4",
            )
            ref = conv_ref(x, wg, pads=(1, 1, 1, 1), strides=(2, 2), group=4)
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["group=4, stride 2, full range"] = verdict(grp)
        w1 = rand_int(wt, (24, 32, 1, 1))

        def pw():
            y = conv_integer(x, w1, label=f"conv {pn} 1x1")
            ref = conv_ref(x, w1)
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["1x1 pointwise (no im2col), full range"] = verdict(pw)
        rows.append((pn, res))

    for pn, res in rows:
        print(f"\n[{pn}]")
        for k, v in res.items():
            print(f"  {k:<62} {v}")

    range_sweep("conv")

    # speed
    print(
        "\nSpeed: x 1x64x56x56, w 64x64x3x3 (initializer), pads 1, ORT_ENABLE_ALL; median of 20 "
        f"runs ({2 * 64 * 64 * 9 * 56 * 56 / 1e6:.0f} Mop); GOPS = 2*MACs/time"
    )
    print(f"  {'':<31} {'1 thread':<18} | {'default threads':<18}")
    xs_shape, ws_shape = (1, 64, 56, 56), (64, 64, 3, 3)
    ops = 2 * 64 * 64 * 9 * 56 * 56
    for xt, wt, zp in [(*pr, None) for pr in PAIRS] + [(U8, U8, 128)]:
        x = rand_int(xt, xs_shape)
        w = rand_int(wt, ws_shape)
        ins = [("x", x), ("w", w)]
        if zp is not None:
            ins += [("xzp", np.array(zp, xt)), ("wzp", np.array(zp, wt))]
        model, feeds = node_model(
            "ConvInteger", ins, [S32], p1, opset=10, consts=("w", "xzp", "wzp")
        )
        name = pair_name((xt, wt)) + ("" if zp is None else f" zp={zp},{zp}")
        try:
            text, sess = bench(model, feeds, ops)
            ref = conv_ref(x, w, zp or 0, zp or 0, pads=(1, 1, 1, 1))
            ok = exact(sess.run(None, feeds)[0], ref)
            print(f"  ConvInteger {name:<18} {text} GOPS   full-range random output exact: {ok}")
        except Exception as e:
            print(f"  ConvInteger {name:<18} unsupported: {short_err(e)}")
    x = RNG.standard_normal(xs_shape).astype(F32)
    w = RNG.standard_normal(ws_shape).astype(F32)
    model, feeds = node_model("Conv", [("x", x), ("w", w)], [F32], p1, opset=13, consts=("w",))
    print(f"  Conv float32                   {bench(model, feeds, ops)[0]} GFLOPS")


# --------------------------------------------------------------------------- 2. MatMulInteger
def matmul_integer(a, b, azp=None, bzp=None, b_const=True, label="MatMulInteger"):
    inputs = [
        ("a", a),
        ("b", b),
        None if azp is None else ("azp", np.asarray(azp, a.dtype)),
        None if bzp is None else ("bzp", np.asarray(bzp, b.dtype)),
    ]
    while inputs and inputs[-1] is None:
        inputs.pop()
    consts = ("b", "azp", "bzp") if b_const else ("azp", "bzp")
    return run_node("MatMulInteger", inputs, [S32], opset=10, consts=consts, label=label)[0]


def section_matmul():
    header("2. MatMulInteger (opset 10); A 64x256, B 256x96 unless noted")
    M, K, N = 64, 256, 96
    rows = []
    for at, bt in PAIRS:
        pn = pair_name((at, bt))
        res = {}
        a = rand_int(at, (M, K))
        b = rand_int(bt, (K, N))
        for b_const in (True, False):

            def rnd(b_const=b_const):
                y = matmul_integer(a, b, b_const=b_const, label=f"mm {pn} rnd")
                ref = matmul_ref(a, b)
                return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

            res[f"random full-range, B {'initializer' if b_const else 'graph input'}"] = verdict(
                rnd
            )
        ae = np.full((M, K), 255 if at == U8 else -128, at)
        for name, bv in [("B=min", extreme(bt, -1)), ("B=max", extreme(bt, +1))]:
            be = np.full((K, N), bv, bt)

            def ext(be=be, name=name):
                y = matmul_integer(ae, be, label=f"mm {pn} extreme {name}")
                ref = matmul_ref(ae, be)
                return exact(y, ref), f"got {int(y.flat[0])}, want {int(ref.flat[0])}"

            res[f"A={int(ae.flat[0])} all, {name}={int(bv)} all"] = verdict(ext)
        b7 = rand_int(bt, (K, N), 0 if bt == U8 else -64, 127 if bt == U8 else 63)

        def w7():
            y = matmul_integer(a, b7, label=f"mm {pn} 7bit")
            ref = matmul_ref(a, b7)
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["random full-range A, 7-bit B ([-64,63] s8 / [0,127] u8)"] = verdict(w7)
        azp_v = 128 if at == U8 else -7
        bzp_v = 5 if bt == U8 else -2

        def zp():
            y = matmul_integer(a, b, azp_v, bzp_v, label=f"mm {pn} zp")
            ref = matmul_ref(a, b, azp_v, bzp_v)
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res[f"scalar zp (azp={azp_v}, bzp={bzp_v}), full range"] = verdict(zp)
        bzp_vec = rand_int(bt, (N,), 0 if bt == U8 else -8, 8)

        def zp_vec():
            y = matmul_integer(a, b7, azp_v, bzp_vec, label=f"mm {pn} zp vec")
            ref = matmul_ref(a, b7, azp_v, bzp_vec)
            return exact(y, ref), f"max|err|={np.abs(y - ref).max()}"

        res["per-column b_zero_point [N] (7-bit B)"] = verdict(zp_vec)
        a3 = rand_int(at, (3, 5, K))

        def batch_a():
            y = matmul_integer(a3, b7, label=f"mm {pn} 3D A")
            return exact(y, matmul_ref(a3, b7)), f"shape {y.shape}"

        res["3-D A [3,5,K] @ 2-D B"] = verdict(batch_a)
        b3 = rand_int(bt, (3, K, 7), 0 if bt == U8 else -64, 127 if bt == U8 else 63)

        def batch_ab():
            y = matmul_integer(a3, b3, label=f"mm {pn} 3D AB")
            return exact(y, matmul_ref(a3, b3)), f"shape {y.shape}"

        res["3-D A [3,5,K] @ 3-D B [3,K,7]"] = verdict(batch_ab)
        rows.append((pn, res))
    for pn, res in rows:
        print(f"\n[{pn}]")
        for k, v in res.items():
            print(f"  {k:<62} {v}")

    range_sweep("matmul")

    print("\nSpeed: [128x768] @ [768x768] (B initializer), ORT_ENABLE_ALL; median of 20 runs")
    print(f"  {'':<33} {'1 thread':<18} | {'default threads':<18}")
    ops = 2 * 128 * 768 * 768
    for at, bt, zp in [(*pr, None) for pr in PAIRS] + [(U8, U8, 128)]:
        a = rand_int(at, (128, 768))
        b = rand_int(bt, (768, 768))
        ins = [("a", a), ("b", b)]
        if zp is not None:
            ins += [("azp", np.array(zp, at)), ("bzp", np.array(zp, bt))]
        model, feeds = node_model("MatMulInteger", ins, [S32], opset=10, consts=("b", "azp", "bzp"))
        name = pair_name((at, bt)) + ("" if zp is None else f" zp={zp},{zp}")
        try:
            text, sess = bench(model, feeds, ops)
            ok = exact(sess.run(None, feeds)[0], matmul_ref(a, b, zp or 0, zp or 0))
            print(f"  MatMulInteger {name:<18} {text} GOPS   full-range random output exact: {ok}")
        except Exception as e:
            print(f"  MatMulInteger {name:<18} unsupported: {short_err(e)}")
    a = RNG.standard_normal((128, 768)).astype(F32)
    b = RNG.standard_normal((768, 768)).astype(F32)
    model, feeds = node_model("MatMul", [("a", a), ("b", b)], [F32], opset=13, consts=("b",))
    print(f"  MatMul float32                   {bench(model, feeds, ops)[0]} GFLOPS")


# --------------------------------------------------------------------------- 3. integer ops
def section_int_ops():
    header("3. Integer arithmetic / tensor ops (opset 21 unless noted); 'exact' = equals numpy")
    lines: list[tuple[str, str]] = []

    def rec(name, fn):
        lines.append((name, verdict(fn)))

    # Add / Sub / Mul
    for op, f in (("Add", np.add), ("Sub", np.subtract), ("Mul", np.multiply)):
        for dt in (S8, U8, S16, S32, S64, U32, U64):
            a = rand_int(dt, (4, 5))
            b = rand_int(dt, (5,))

            def fn(op=op, f=f, a=a, b=b, dt=dt):
                y = run_node(op, [("a", a), ("b", b)], [dt], label=f"{op} {TNAME[dt]}")[0]
                with np.errstate(over="ignore"):
                    ref = f(a, b)  # numpy wraps modulo 2^bits
                return bitexact(y, ref), "wraps mod 2^n like numpy"

            rec(f"{op} {TNAME[dt]} (full range, broadcast)", fn)

    def mul_ovf():
        a = np.array([2**62, -(2**62), 3037000500, 2**63 - 1], S64)
        b = np.array([4, 3, 3037000500, 2], S64)
        y = run_node("Mul", [("a", a), ("b", b)], [S64], label="Mul s64 ovf")[0]
        with np.errstate(over="ignore"):
            ref = a * b
        return bitexact(y, ref), f"got {y.tolist()}"

    rec("Mul s64 overflow (2^62*4, ...) wraps?", mul_ovf)

    def add_ovf32():
        a = np.array([2**31 - 1, -(2**31)], S32)
        b = np.array([1, -1], S32)
        y = run_node("Add", [("a", a), ("b", b)], [S32], label="Add s32 ovf")[0]
        return y.tolist() == [-(2**31), 2**31 - 1], f"got {y.tolist()}"

    rec("Add s32 overflow wraps?", add_ovf32)

    # BitShift
    for dt in (U8, U16, U32, U64):
        bits = np.iinfo(dt).bits
        x = rand_int(dt, (2, 3, 4, 5))
        for direction in ("RIGHT", "LEFT"):
            sh = RNG.integers(0, bits, size=(3, 1, 1)).astype(dt)

            def fn(dt=dt, x=x, sh=sh, direction=direction):
                y = run_node(
                    "BitShift",
                    [("x", x), ("s", sh)],
                    [dt],
                    {"direction": direction},
                    label=f"BitShift {TNAME[dt]} {direction}",
                )[0]
                ref = (x >> sh) if direction == "RIGHT" else (x << sh)
                return bitexact(y, ref.astype(dt)), ""

            rec(f"BitShift {TNAME[dt]} {direction}, shifts [3,1,1] bcast to [2,3,4,5]", fn)

    def shift_big():
        out, ok = [], True
        for reps in (1, 1000):
            x = np.tile(np.array([0xFFFFFFFF, 0xFFFFFFFF, 0x80000000, 0xFFFFFFFF], U32), reps)
            s = np.tile(np.array([31, 32, 33, 64], U32), reps)
            for d in ("RIGHT", "LEFT"):
                y = run_node(
                    "BitShift", [("x", x), ("s", s)], [U32], {"direction": d}, label="BitShift big"
                )[0]
                out.append(f"{d} n={x.size}: {y[:4].tolist()}")
                ok &= bool((y.reshape(-1, 4)[:, 1:] == 0).all())
        return (
            True,
            "u32 0xFFFFFFFF,0xFFFFFFFF,0x80000000,0xFFFFFFFF by [31,32,33,64]: " + "; ".join(out),
        )

    rec("BitShift u32 shift >= bit width -> 0?", shift_big)

    # Cast
    def cast(x, to, label):
        return run_node("Cast", [("x", x)], [to], {"to": tproto(to)}, label=label)[0]

    def c1():
        x = np.array([-1, -(2**31), 2**31 - 1, 0], S32)
        y = cast(x, S64, "Cast s32->s64")
        return bitexact(y, x.astype(S64)), f"{y.tolist()}"

    rec("Cast int32->int64 (negatives sign-extend)", c1)

    def c2():
        x = np.array([-1, -(2**63), -5, 7], S64)
        y = cast(x, U64, "Cast s64->u64")
        return bitexact(y, x.astype(U64)), f"{y.tolist()} (= x mod 2^64)"

    rec("Cast int64->uint64 of negatives wraps mod 2^64?", c2)

    def c3():
        x = np.array([2**63, 2**64 - 1, 2**63 + 5, 3], U64)
        y = cast(x, S64, "Cast u64->s64")
        return bitexact(y, x.astype(S64)), f"{y.tolist()}"

    rec("Cast uint64->int64 of values >= 2^63 wraps?", c3)

    def c4():
        x = np.array([2**31, 2**32 + 7, -(2**31) - 1, -1], S64)
        y = cast(x, S32, "Cast s64->s32")
        return bitexact(y, x.astype(S32)), f"{y.tolist()} (keeps low 32 bits)"

    rec("Cast int64->int32 out of range (truncate bits?)", c4)

    def c5():
        x = np.array([128, 255, 256, -129, 300, -1], S32)
        y8 = cast(x, S8, "Cast s32->s8")
        yu = cast(x, U8, "Cast s32->u8")
        ok = bitexact(y8, x.astype(S8)) and bitexact(yu, x.astype(U8))
        return ok, f"s8 {y8.tolist()}, u8 {yu.tolist()} (wrap, no saturation)"

    rec("Cast int32->int8/uint8 out of range", c5)

    # Clip
    for dt in (S8, U8, S32, S64, U64):
        x = rand_int(dt, (50,))
        lo, hi = (
            (np.array(-20, dt), np.array(90, dt))
            if dt not in (U8, U64)
            else (np.array(10, dt), np.array(200, dt))
        )

        def fn(dt=dt, x=x, lo=lo, hi=hi):
            y = run_node(
                "Clip",
                [("x", x), ("lo", lo), ("hi", hi)],
                [dt],
                opset=13,
                label=f"Clip {TNAME[dt]}",
            )[0]
            return bitexact(y, np.clip(x, lo, hi).astype(dt)), ""

        rec(f"Clip {TNAME[dt]} (min/max inputs of same type, opset 13)", fn)

    # Max / Min
    for op, f in (("Max", np.maximum), ("Min", np.minimum)):
        for dt in (S8, U8, S16, S32, S64, U32, U64):
            a = rand_int(dt, (4, 6))
            b = rand_int(dt, (6,))

            def fn(op=op, f=f, a=a, b=b, dt=dt):
                y = run_node(op, [("a", a), ("b", b)], [dt], opset=13, label=f"{op} {TNAME[dt]}")[0]
                return bitexact(y, f(a, b)), ""

            rec(f"{op} {TNAME[dt]} (broadcast, opset 13)", fn)

    # Where
    for dt in (S8, U8, S32, S64, U64):
        c = RNG.integers(0, 2, size=(4, 6)).astype(bool)
        a = rand_int(dt, (4, 6))
        b = rand_int(dt, (6,))

        def fn(dt=dt, c=c, a=a, b=b):
            y = run_node(
                "Where", [("c", c), ("a", a), ("b", b)], [dt], opset=16, label=f"Where {TNAME[dt]}"
            )[0]
            return bitexact(y, np.where(c, a, b)), ""

        rec(f"Where {TNAME[dt]} (opset 16)", fn)

    # Div / Mod
    for dt in (S32, S64):
        a = np.array([7, -7, 7, -7, -1, -(2**31) + 1], dt)
        b = np.array([2, 2, -2, -2, 3, 2], dt)

        def fn(dt=dt, a=a, b=b):
            y = run_node("Div", [("a", a), ("b", b)], [dt], label=f"Div {TNAME[dt]}")[0]
            trunc = (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(dt)
            return (
                bitexact(y, trunc),
                f"{a.tolist()}/{b.tolist()} = {y.tolist()} "
                f"({'truncation' if bitexact(y, trunc) else 'NOT trunc'})",
            )

        rec(f"Div {TNAME[dt]} negatives: toward zero?", fn)

    def mod():
        a = np.array([7, -7, 7, -7], S64)
        b = np.array([2, 2, -2, -2], S64)
        y = run_node("Mod", [("a", a), ("b", b)], [S64], label="Mod s64")[0]
        return bitexact(y, np.mod(a, b)), f"{y.tolist()} (numpy floor-mod {np.mod(a, b).tolist()})"

    rec("Mod s64 fmod=0 (sign of divisor)", mod)

    # MaxPool
    for opset in (12, 22):
        for dt in (S8, U8):
            x = rand_int(dt, (1, 4, 9, 9))

            def fn(dt=dt, x=x, opset=opset):
                y = run_node(
                    "MaxPool",
                    [("x", x)],
                    [dt],
                    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
                    opset=opset,
                    label=f"MaxPool {TNAME[dt]}",
                )[0]
                xp = np.full((1, 4, 11, 11), np.iinfo(dt).min, np.int64)
                xp[:, :, 1:10, 1:10] = x
                ref = (
                    np.stack(
                        [xp[:, :, i : i + 9 : 2, j : j + 9 : 2] for i in range(3) for j in range(3)]
                    )
                    .max(0)
                    .astype(dt)
                )
                return bitexact(y, ref), ""

            rec(f"MaxPool {TNAME[dt]} 3x3 s2 pad1 (opset {opset})", fn)

    x32 = rand_int(S32, (1, 8, 5, 5), -(2**20), 2**20)

    def gap():
        y = run_node("GlobalAveragePool", [("x", x32)], [S32], label="GAP s32")[0]
        return True, f"ran: {y.dtype}"

    rec("GlobalAveragePool int32", gap)

    for dt in (S32, S64):
        xr = rand_int(dt, (1, 8, 5, 5), -(2**20), 2**20)

        def rsum(dt=dt, xr=xr):
            y = run_node(
                "ReduceSum",
                [("x", xr), ("axes", np.array([2, 3], S64))],
                [dt],
                {"keepdims": 1},
                opset=13,
                consts=("axes",),
                label=f"ReduceSum {TNAME[dt]}",
            )[0]
            return bitexact(y, xr.sum(axis=(2, 3), keepdims=True, dtype=dt)), ""

        rec(f"ReduceSum {TNAME[dt]} axes=[2,3] keepdims (opset 13)", rsum)

    def rsum_ovf():
        xr = np.full((1, 1, 4, 4), 2**30, S32)
        y = run_node(
            "ReduceSum",
            [("x", xr), ("axes", np.array([2, 3], S64))],
            [S32],
            opset=13,
            consts=("axes",),
            label="ReduceSum ovf",
        )[0]
        return bitexact(
            y, xr.sum(axis=(2, 3), keepdims=True, dtype=S32)
        ), f"16*2^30 -> {y.ravel().tolist()}"

    rec("ReduceSum s32 overflow wraps?", rsum_ovf)

    def rsum_inter():
        xr = np.array([2**31 - 1, 2**31 - 1, -(2**31), -(2**31) + 2], S32).reshape(1, 4)
        y = run_node(
            "ReduceSum",
            [("x", xr), ("axes", np.array([1], S64))],
            [S32],
            opset=13,
            consts=("axes",),
            label="ReduceSum inter",
        )[0]
        return int(y.ravel()[0]) == 0, f"[2^31-1, 2^31-1, -2^31, -2^31+2] -> {y.ravel().tolist()}"

    rec("ReduceSum s32 intermediate overflow (true sum 0)", rsum_inter)

    def rsum64():
        xr = np.array([[2**53 + 1, 1, 1], [2**60 + 1, 2**60 + 1, 1]], S64)
        y = run_node(
            "ReduceSum",
            [("x", xr), ("axes", np.array([1], S64))],
            [S64],
            opset=13,
            consts=("axes",),
            label="ReduceSum s64 big",
        )[0].ravel()
        return bitexact(y, xr.sum(1)), f"got {y.tolist()}, want {xr.sum(1).tolist()}"

    rec("ReduceSum s64 values > 2^53 exact?", rsum64)

    # Concat / Reshape / Transpose / Pad on int8
    x8 = rand_int(S8, (2, 3, 4))

    def concat():
        y = run_node("Concat", [("a", x8), ("b", x8[:, :1])], [S8], {"axis": 1}, label="Concat s8")[
            0
        ]
        return bitexact(y, np.concatenate([x8, x8[:, :1]], 1)), ""

    rec("Concat s8", concat)

    def reshape():
        y = run_node(
            "Reshape",
            [("a", x8), ("s", np.array([4, -1], S64))],
            [S8],
            consts=("s",),
            label="Reshape s8",
        )[0]
        return bitexact(y, x8.reshape(4, -1)), ""

    rec("Reshape s8", reshape)

    def transpose():
        y = run_node("Transpose", [("a", x8)], [S8], {"perm": [2, 0, 1]}, label="Transpose s8")[0]
        return bitexact(y, x8.transpose(2, 0, 1)), ""

    rec("Transpose s8", transpose)

    def pad():
        pads = np.array([0, 1, 2, 0, 2, 1], S64)
        y = run_node(
            "Pad",
            [("a", x8), ("p", pads), ("v", np.array(-7, S8))],
            [S8],
            {"mode": "constant"},
            consts=("p", "v"),
            label="Pad s8",
        )[0]
        ref = np.pad(x8, ((0, 0), (1, 2), (2, 1)), constant_values=-7)
        return bitexact(y, ref), ""

    rec("Pad s8 constant (value -7, opset 21)", pad)

    def pad_edge():
        pads = np.array([0, 1, 2, 0, 2, 1], S64)
        y = run_node(
            "Pad",
            [("a", x8), ("p", pads)],
            [S8],
            {"mode": "edge"},
            consts=("p",),
            label="Pad s8 edge",
        )[0]
        return bitexact(y, np.pad(x8, ((0, 0), (1, 2), (2, 1)), mode="edge")), ""

    rec("Pad s8 edge", pad_edge)

    for name, v in lines:
        print(f"  {name:<58} {v}")


# --------------------------------------------------------------------------- 4. QuantizeLinear
def q_run(x, scale, zp, opset, out_dt, opt="off"):
    """Scale/zp as initializers (the realistic case)."""
    is4 = out_dt in ("int4", "uint4")
    zp_type = {"int4": TensorProto.INT4, "uint4": TensorProto.UINT4}.get(out_dt) or tproto(out_dt)
    inits = [
        numpy_helper.from_array(np.asarray(scale, F32), "s"),
        helper.make_tensor("zp", zp_type, list(np.shape(zp)), np.asarray(zp).ravel().tolist()),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"])]
    out = "q"
    if is4:
        nodes.append(helper.make_node("Cast", ["q"], ["y"], to=TensorProto.INT8))
        out = "y"
    gin = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))]
    gout = [helper.make_tensor_value_info(out, TensorProto.INT8 if is4 else zp_type, None)]
    model = make_model(nodes, gin, gout, inits, opset)
    return (
        run_both(model, {"x": x}, f"QuantizeLinear opset{opset} {out_dt}")[0]
        if opt == "both"
        else run_model(model, {"x": x}, opt)[0]
    )


def find_div_vs_mul_cases(scale, count, rng):
    """float32 x where rint(x/scale) != rint(x*(1/scale)) (both computed in float32)."""
    s = F32(scale)
    inv = F32(1) / s
    found = []
    while len(found) < count:
        # x near (k+0.5)*scale: the tie region where the two formulas can disagree
        k = rng.integers(-120, 120, size=200000)
        x = ((k + 0.5) * np.float64(s)).astype(F32)
        x = np.nextafter(x, rng.choice([-np.inf, np.inf], size=x.shape).astype(F32))
        x = np.concatenate([x, ((k + 0.5) * np.float64(s)).astype(F32)])
        d = np.rint(x / s)
        m = np.rint(x * inv)
        found.extend(x[d != m].tolist())
    return np.array(found[:count], F32)


def section_quantize():
    header("4. QuantizeLinear: rounding, x/scale vs x*(1/scale), saturation, int4")
    ties = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 0.49999997, 126.5, -127.5], F32)
    half_even = np.rint(ties)
    half_away = np.sign(ties) * np.floor(np.abs(ties) + 0.5)
    print("Ties, scale=1, zp=0, int8 out:  x =", ties.tolist())
    print("  numpy half-to-even ->", half_even.astype(int).tolist())
    print("  half-away-from-zero ->", half_away.astype(int).tolist())
    for opset in (13, 19, 21):
        for n_rep, tag in ((1, "11 elems"), (1000, "11000 elems (vectorised)")):
            xt = np.tile(ties, n_rep)
            try:
                y = q_run(xt, 1.0, np.array(0, S8), opset, S8, "both")
                rule = (
                    "half-to-even"
                    if bitexact(y, np.tile(half_even, n_rep).astype(S8))
                    else "half-away"
                    if bitexact(y, np.tile(half_away, n_rep).astype(S8))
                    else "other"
                )
                print(f"  opset {opset:>2} {tag:<26} -> {y[:11].tolist()}  [{rule}]")
            except Exception as e:
                print(f"  opset {opset:>2} {tag:<26} unsupported: {short_err(e)}")

    # odd zero point: round(x/s) + zp  vs  round(x/s + zp)
    print("\nTies with an odd zero point: round(x/s)+zp (spec) vs round(x/s+zp):")
    for dt, zp in ((S8, 3), (U8, 129)):
        ref_first = np.clip(np.rint(ties) + zp, np.iinfo(dt).min, np.iinfo(dt).max)
        ref_after = np.clip(np.rint(ties + zp), np.iinfo(dt).min, np.iinfo(dt).max)
        for opset in (13, 21):
            for n_rep in (1, 1000):
                y = q_run(np.tile(ties, n_rep), 1.0, np.array(zp, dt), opset, dt, "both")
                rule = (
                    "round then +zp"
                    if exact(y, np.tile(ref_first, n_rep))
                    else "+zp then round"
                    if exact(y, np.tile(ref_after, n_rep))
                    else "other"
                )
                print(
                    f"  {TNAME[dt]} zp={zp} opset {opset} n={11 * n_rep:<6} -> {y[:11].tolist()}"
                    f"  [{rule}]"
                )

    # division vs multiplication by reciprocal
    print("\nx/scale vs x*(1/scale) (both float32, then round-half-even); cases where they differ:")
    rng = np.random.default_rng(1)
    for scale in (0.1, 0.0123, 3.7e-3, 0.3):
        s = F32(scale)
        cases = find_div_vs_mul_cases(s, 64, rng)
        div_ref = np.rint(cases / s)
        mul_ref = np.rint(cases * (F32(1) / s))
        dbl_ref = np.rint(cases.astype(np.float64) / np.float64(s))
        res = []
        for n_total in (len(cases), 10000, 10007):
            # place the cases at random positions (vector body and scalar tail) in a big tensor
            x = RNG.uniform(-10, 10, size=n_total).astype(F32)
            pos = np.sort(RNG.choice(n_total, size=len(cases), replace=False))
            pos[-1] = n_total - 1  # make sure the last (tail) element is a disagreement case
            x[pos] = cases
            outs = {}
            for opset in (13, 19, 21):
                y = q_run(
                    x, s, np.array(0, S32) if False else np.array(0, S8), opset, S8, "both"
                ).astype(np.int64)[pos]
                outs[opset] = y
            tags = []
            for opset, y in outs.items():
                nd = int((y == np.clip(div_ref, -128, 127)).sum())
                nm = int((y == np.clip(mul_ref, -128, 127)).sum())
                nb = int((y == np.clip(dbl_ref, -128, 127)).sum())
                tags.append(f"op{opset}: div {nd}/mul {nm}/f64div {nb}")
            res.append(f"n={n_total}: " + ", ".join(tags))
        print(f"  scale={scale}: {len(cases)} cases; matches out of {len(cases)} -> ")
        for r in res:
            print("      " + r)
    # also: reference for the uint8 output
    s = F32(0.1)
    cases = find_div_vs_mul_cases(s, 64, rng)
    cases = np.abs(cases)
    x = np.concatenate([RNG.uniform(0, 20, 9000).astype(F32), cases])
    y = q_run(x, s, np.array(0, U8), 21, U8, "both")
    div_ref = np.clip(np.rint(x / s), 0, 255)
    mul_ref = np.clip(np.rint(x * (F32(1) / s)), 0, 255)
    print(
        f"  uint8 out, scale=0.1, n={len(x)}: equals div-ref: {exact(y, div_ref)}, "
        f"equals mul-ref: {exact(y, mul_ref)}"
    )

    # zero point, saturation
    print("\nSaturation / zero point (scale=0.5):")
    x = np.array(
        [-1e9, -300, -64.25, -0.25, 0.25, 63.75, 127.75, 300, 1e9, np.inf, -np.inf, np.nan], F32
    )
    for dt, zp in ((S8, 0), (S8, -3), (U8, 0), (U8, 128), (S16, 0), (U16, 0)):
        ref = np.clip(np.rint(x[:-1] / F32(0.5)) + zp, np.iinfo(dt).min, np.iinfo(dt).max)
        for opset in (13, 21) if np.iinfo(dt).bits == 8 else (21,):
            try:
                y = q_run(x, 0.5, np.array(zp, dt), opset, dt, "both")
            except Exception as e:
                print(f"  {TNAME[dt]} zp={zp:<4} opset {opset}: unsupported: {short_err(e)}")
                continue
            print(
                f"  {TNAME[dt]} zp={zp:<4} opset {opset}: {y.tolist()}  "
                f"(exact vs clip(rint(x/s)+zp) excl. NaN: {exact(y[:-1], ref)}; NaN -> {y[-1]})"
            )

    print("\nint4 / uint4 output (opset 21, read back through Cast->int8):")
    x = np.array([-9, -8.5, -7.5, -1.5, -0.5, 0.5, 1.5, 6.5, 7.5, 8, 20], F32)
    for dt, zp, lo, hi in (("int4", 0, -8, 7), ("uint4", 0, 0, 15), ("int4", 2, -8, 7)):
        try:
            y = q_run(x, 1.0, np.array(zp), 21, dt, "both")
            ref = np.clip(np.rint(x) + zp, lo, hi).astype(np.int64)
            print(
                f"  {dt} zp={zp}: {y.tolist()}  exact (half-even + saturate to [{lo},{hi}]): "
                f"{exact(y, ref)}"
            )
        except Exception as e:
            print(f"  {dt}: unsupported: {short_err(e)}")

    # per-axis QuantizeLinear
    print(
        "\nPer-axis QuantizeLinear (axis=1, float scale [C], int8 zp [C]), x 2x8x3x3 "
        "incl. tie cases:"
    )
    sc = RNG.uniform(0.01, 0.2, size=8).astype(F32)
    zpv = RNG.integers(-5, 5, size=8).astype(S8)
    x = (RNG.integers(-200, 200, size=(2, 8, 3, 3)) + 0.5).astype(F32) * sc.reshape(1, 8, 1, 1)
    for opset in (13, 21):
        inits = [numpy_helper.from_array(sc, "s"), numpy_helper.from_array(zpv, "zp")]
        model = make_model(
            [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], axis=1)],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
            [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
            inits,
            opset,
        )
        y = run_both(model, {"x": x}, f"QuantizeLinear per-axis opset{opset}")[0]
        s4 = sc.reshape(1, 8, 1, 1)
        dref = np.clip(np.rint(x / s4) + zpv.reshape(1, 8, 1, 1), -128, 127)
        mref = np.clip(np.rint(x * (F32(1) / s4)) + zpv.reshape(1, 8, 1, 1), -128, 127)
        print(
            f"  opset {opset}: equals div-ref {exact(y, dref)}, equals mul-ref "
            f"{exact(y, mref)} (div/mul refs differ in {int((dref != mref).sum())} elems)"
        )


# --------------------------------------------------------------------------- 5. DequantizeLinear
def section_dequantize():
    header("5. DequantizeLinear int32 input, per-axis float scales (axis=1)")
    C = 16
    x = np.concatenate(
        [
            RNG.integers(-(2**31), 2**31, size=(2, C, 40)),
            RNG.integers(-(2**24), 2**24, size=(2, C, 40)),
            RNG.integers(-1000, 1000, size=(2, C, 40)),
        ],
        axis=2,
    ).astype(S32)
    x[0, 0, :4] = [2**31 - 1, -(2**31), 2**24 + 1, -(2**24) - 3]
    scale = (RNG.uniform(1e-5, 1e-2, size=C)).astype(F32)
    scale[0] = F32(1 / 3)
    zp_vals = RNG.integers(-100, 100, size=C).astype(S32)
    s4 = scale.reshape(1, C, 1)
    for opset in (13, 19, 21):
        for with_zp in (False, True):
            inits = [numpy_helper.from_array(scale, "s")]
            ins = ["x", "s"]
            if with_zp:
                inits.append(numpy_helper.from_array(zp_vals, "zp"))
                ins.append("zp")
            model = make_model(
                [helper.make_node("DequantizeLinear", ins, ["y"], axis=1)],
                [helper.make_tensor_value_info("x", TensorProto.INT32, x.shape)],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                inits,
                opset,
            )
            try:
                y = run_both(model, {"x": x}, f"DequantizeLinear s32 opset{opset}")[0]
            except Exception as e:
                print(f"  opset {opset} zp={with_zp}: unsupported: {short_err(e)}")
                continue
            if with_zp:
                zp4 = zp_vals.reshape(1, C, 1)
                ref_a = (x.astype(np.int64) - zp4).astype(F32) * s4  # exact int subtraction
                ref_b = (x.astype(F32) - zp4.astype(F32)) * s4  # float subtraction
                ref_c = (x - zp4).astype(F32) * s4  # int32 (wrapping) subtract
                print(
                    f"  opset {opset} with int32 zp [C]: == float32(x - zp)*s (int64 sub): "
                    f"{bitexact(y, ref_a)}; == (f32(x)-f32(zp))*s: {bitexact(y, ref_b)}; "
                    f"== f32(int32 wrap(x-zp))*s: {bitexact(y, ref_c)}"
                )
            else:
                ref = x.astype(F32) * s4
                ref_d = (x.astype(np.float64) * s4.astype(np.float64)).astype(F32)
                nd = int((y != ref).sum())
                print(
                    f"  opset {opset} no zp: bitwise == x.astype(f32)*scale: {bitexact(y, ref)} "
                    f"({nd} diffs); == f32(f64(x)*f64(s)): {bitexact(y, ref_d)}"
                )
    # large tensor (vectorised path)
    xb = RNG.integers(-(2**31), 2**31, size=(1, C, 100003 // C + 1)).astype(S32)
    model = make_model(
        [helper.make_node("DequantizeLinear", ["x", "s"], ["y"], axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.INT32, xb.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(scale, "s")],
        21,
    )
    y = run_both(model, {"x": xb}, "DequantizeLinear s32 big")[0]
    print(
        f"  big tensor {xb.shape}, opset 21: bitwise == x.astype(f32)*scale: "
        f"{bitexact(y, xb.astype(F32) * s4)}"
    )
    # per-tensor scalar scale, int8 input
    for dt in (S8, U8):
        x8 = rand_int(dt, (3, 1001))
        model = make_model(
            [helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["y"])],
            [helper.make_tensor_value_info("x", tproto(dt), x8.shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [
                numpy_helper.from_array(np.array(0.0371, F32), "s"),
                numpy_helper.from_array(np.array(3, dt), "zp"),
            ],
            21,
        )
        y = run_both(model, {"x": x8}, f"DequantizeLinear {TNAME[dt]}")[0]
        ref = (x8.astype(np.int32) - 3).astype(F32) * F32(0.0371)
        print(f"  {TNAME[dt]} input, scalar scale+zp: bitwise == f32(x-zp)*s: {bitexact(y, ref)}")


# --------------------------------------------------------------------------- 6. optimizer
def section_optimizer():
    header("6. Graph optimizer: ORT_DISABLE_ALL vs ORT_ENABLE_ALL on multi-node graphs")
    if OPT_DIFFS:
        print("  Single-node probes of sections 1-5 whose output changed with ORT_ENABLE_ALL:")
        for d in sorted(set(OPT_DIFFS)):
            print("    -", d)
    else:
        print("  All single-node probes in sections 1-5: identical outputs with opt off / all.")

    def vi(name, dt, shape):
        return helper.make_tensor_value_info(name, dt, shape)

    def compare(label, model, feeds, ref=None):
        off = run_model(model, feeds, "off")
        on = run_model(model, feeds, "all")
        same = all(bitexact(a, b) for a, b in zip(off, on))
        extra = ""
        if ref is not None:
            extra = f"; off==numpy {bitexact(off[0], ref)}, all==numpy {bitexact(on[0], ref)}"
            if not bitexact(on[0], ref):
                extra += f" ({int((on[0] != ref).sum())} elems differ)"
        # which ops ended up in the optimized graph
        so = ort.SessionOptions()
        so.graph_optimization_level = OPT_LEVELS["all"]
        so.log_severity_level = 4
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            so.optimized_model_filepath = os.path.join(d, "opt.onnx")
            ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            g = onnx.load(so.optimized_model_filepath).graph
            ops = [(n.domain + "." if n.domain else "") + n.op_type for n in g.node]
            moved = {
                i.name: numpy_helper.to_array(i).tolist()
                for i in g.initializer
                if "DoubleQDQ" in i.name
            }
        print(
            f"  {label:<52} off==all: {same}{extra}\n      optimized graph: {ops}"
            + (f" new inits {moved}" if moved else "")
        )

    # (a) QDQ Conv: DQ(x u8) -> Conv(DQ(w s8)) -> Q(u8)  (QLinearConv fusion)
    x = rand_int(U8, (1, 16, 10, 10))
    for wlo, whi in ((-127, 127), (-64, 64)):
        w = rand_int(S8, (16, 16, 3, 3), wlo, whi)
        xs, ws, ys = F32(0.02), F32(0.004), F32(0.05)
        inits = [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(xs), "xs"),
            numpy_helper.from_array(np.array(128, U8), "xz"),
            numpy_helper.from_array(np.array(ws), "ws"),
            numpy_helper.from_array(np.array(0, S8), "wz"),
            numpy_helper.from_array(np.array(ys), "ys"),
            numpy_helper.from_array(np.array(120, U8), "yz"),
        ]
        nodes = [
            helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"]),
            helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"]),
            helper.make_node("Conv", ["xf", "wf"], ["cf"], pads=[1, 1, 1, 1]),
            helper.make_node("QuantizeLinear", ["cf", "ys", "yz"], ["y"]),
        ]
        model = make_model(
            nodes,
            [vi("x", TensorProto.UINT8, x.shape)],
            [vi("y", TensorProto.UINT8, None)],
            inits,
            13,
        )
        acc = conv_ref(x, w, 128, 0, pads=(1, 1, 1, 1))
        ref = np.clip(
            np.rint(acc * (np.float64(xs) * np.float64(ws)) / np.float64(ys)) + 120, 0, 255
        ).astype(U8)
        compare(f"QDQ DQ->Conv->Q (u8 act full range, s8 w in [{wlo},{whi}])", model, {"x": x})
        off = run_model(model, {"x": x}, "off")[0]
        on = run_model(model, {"x": x}, "all")[0]
        print(
            f"      vs real-arithmetic reference: off max|diff| "
            f"{np.abs(off.astype(int) - ref).max()}, all max|diff| "
            f"{np.abs(on.astype(int) - ref).max()}; off vs all differ in "
            f"{int((off != on).sum())}/{off.size} elems"
        )

    # (b) MatMulInteger -> Cast(float) -> Mul(scale)  (MatMulIntegerToFloat fusion)
    a = rand_int(U8, (32, 128))
    b = rand_int(S8, (128, 48), -64, 63)
    sc = RNG.uniform(1e-4, 1e-2, size=48).astype(F32)
    nodes = [
        helper.make_node("MatMulInteger", ["a", "b"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "sc"], ["y"]),
    ]
    model = make_model(
        nodes,
        [vi("a", TensorProto.UINT8, a.shape)],
        [vi("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(b, "b"), numpy_helper.from_array(sc, "sc")],
        13,
    )
    compare(
        "MatMulInteger->Cast(f32)->Mul(scale[N])",
        model,
        {"a": a},
        matmul_ref(a, b).astype(F32) * sc,
    )

    # (c) ConvInteger -> Cast -> Mul -> Add(bias) -> QuantizeLinear  (typical lowering)
    x = rand_int(U8, (1, 16, 10, 10))
    w = rand_int(S8, (16, 16, 3, 3), -64, 63)
    sc = RNG.uniform(1e-4, 1e-3, size=(1, 16, 1, 1)).astype(F32)
    bias = RNG.uniform(-1, 1, size=(1, 16, 1, 1)).astype(F32)
    nodes = [
        helper.make_node("ConvInteger", ["x", "w", "xz"], ["acc"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "sc"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["f"]),
        helper.make_node("QuantizeLinear", ["f", "ys", "yz"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(128, U8), "xz"),
        numpy_helper.from_array(sc, "sc"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(np.array(F32(0.01)), "ys"),
        numpy_helper.from_array(np.array(0, S8), "yz"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.UINT8, x.shape)], [vi("y", TensorProto.INT8, None)], inits, 13
    )
    f = conv_ref(x, w, 128, 0, pads=(1, 1, 1, 1)).astype(F32) * sc + bias
    ref = np.clip(np.rint(f / F32(0.01)), -128, 127).astype(S8)
    compare("ConvInteger->Cast->Mul->Add->QuantizeLinear", model, {"x": x}, ref)

    # (d) int64 requant chain: ConvInteger->Cast(s64)->Mul(m)->Add(r)->BitShift? (signed: Div)
    nodes = [
        helper.make_node("ConvInteger", ["x", "w", "xz"], ["acc"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["acc"], ["a64"], to=TensorProto.INT64),
        helper.make_node("Mul", ["a64", "mult"], ["p"]),
        helper.make_node("Add", ["p", "rnd"], ["pr"]),
        helper.make_node("Div", ["pr", "den"], ["d"]),
        helper.make_node("Clip", ["d", "lo", "hi"], ["c"]),
        helper.make_node("Cast", ["c"], ["y"], to=TensorProto.INT8),
    ]
    mult = RNG.integers(1000, 30000, size=(1, 16, 1, 1)).astype(S64)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array(128, U8), "xz"),
        numpy_helper.from_array(mult, "mult"),
        numpy_helper.from_array(np.array(2**19, S64), "rnd"),
        numpy_helper.from_array(np.array(2**20, S64), "den"),
        numpy_helper.from_array(np.array(-128, S64), "lo"),
        numpy_helper.from_array(np.array(127, S64), "hi"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.UINT8, x.shape)], [vi("y", TensorProto.INT8, None)], inits, 13
    )
    p = conv_ref(x, w, 128, 0, pads=(1, 1, 1, 1)) * mult + 2**19
    d = np.sign(p) * (np.abs(p) // 2**20)
    compare(
        "ConvInteger->Cast64->Mul->Add->Div->Clip->Cast(s8)",
        model,
        {"x": x},
        np.clip(d, -128, 127).astype(S8),
    )

    # (e) lossy Cast chains: int32 -> int8 -> int32, int64 -> int32 -> int64, f32->s32->f32
    for chain, vals in (
        (
            (TensorProto.INT32, TensorProto.INT8, TensorProto.INT32),
            np.array([300, -200, 5, 128], S32),
        ),
        (
            (TensorProto.INT64, TensorProto.INT32, TensorProto.INT64),
            np.array([2**40 + 3, -(2**33), 7, 2**31], S64),
        ),
        (
            (TensorProto.FLOAT, TensorProto.INT32, TensorProto.FLOAT),
            np.array([1.7, -1.7, 2.5, -2.5], F32),
        ),
    ):
        t0, t1, t2 = chain
        nodes = [
            helper.make_node("Cast", ["x"], ["m"], to=t1),
            helper.make_node("Cast", ["m"], ["y"], to=t2),
        ]
        model = make_model(nodes, [vi("x", t0, vals.shape)], [vi("y", t2, None)], [], 21)
        n0 = helper.tensor_dtype_to_np_dtype
        ref = vals.astype(n0(t1)).astype(n0(t2))
        compare(
            f"Cast {np.dtype(n0(t0)).name}->{np.dtype(n0(t1)).name}->{np.dtype(n0(t2)).name}",
            model,
            {"x": vals},
            ref,
        )

    # (f) DQ(int32 per-axis) -> Add -> Q : any fusion?
    xi = rand_int(S32, (1, 8, 6, 6), -(2**20), 2**20)
    s8v = RNG.uniform(1e-4, 1e-3, size=8).astype(F32)
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s"], ["f"], axis=1),
        helper.make_node("Add", ["f", "b"], ["g"]),
        helper.make_node("QuantizeLinear", ["g", "ys", "yz"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(s8v, "s"),
        numpy_helper.from_array(np.array(F32(0.25)), "b"),
        numpy_helper.from_array(np.array(F32(0.02)), "ys"),
        numpy_helper.from_array(np.array(0, S8), "yz"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.INT32, xi.shape)], [vi("y", TensorProto.INT8, None)], inits, 21
    )
    ref = np.clip(
        np.rint((xi.astype(F32) * s8v.reshape(1, 8, 1, 1) + F32(0.25)) / F32(0.02)), -128, 127
    ).astype(S8)
    compare("DQ(s32 per-axis)->Add->Q(s8)", model, {"x": xi}, ref)

    # (g) Q -> DQ -> Q -> DQ  (QDQ pair removal)
    xf = RNG.uniform(-3, 3, size=(64,)).astype(F32)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q1"]),
        helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["d1"]),
        helper.make_node("QuantizeLinear", ["d1", "s2", "z"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(F32(0.03)), "s"),
        numpy_helper.from_array(np.array(F32(0.07)), "s2"),
        numpy_helper.from_array(np.array(0, S8), "z"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.FLOAT, xf.shape)], [vi("y", TensorProto.FLOAT, None)], inits, 21
    )
    # (through int8, so that 0 is +0.0 as in ORT, never -0.0)
    q1 = np.clip(np.rint(xf / F32(0.03)), -128, 127).astype(S8).astype(F32) * F32(0.03)
    ref = np.clip(np.rint(q1 / F32(0.07)), -128, 127).astype(S8).astype(F32) * F32(0.07)
    compare("Q->DQ->Q->DQ (different scales)", model, {"x": xf}, ref)

    # (h) QDQ MatMul: DQ(a) -> MatMul(DQ(b)) -> [Relu] -> Q  (QLinearMatMul fusion?)
    for at, (blo, bhi), relu in (
        (S8, (-64, 63), True),
        (U8, (-127, 127), False),
        (U8, (-64, 64), False),
    ):
        a = rand_int(at, (16, 64))
        b = rand_int(S8, (64, 32), blo, bhi)
        azp = 0 if at == S8 else 128
        nodes = [
            helper.make_node("DequantizeLinear", ["a", "as", "az"], ["af"]),
            helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bf"]),
            helper.make_node("MatMul", ["af", "bf"], ["mf"]),
        ]
        if relu:
            nodes.append(helper.make_node("Relu", ["mf"], ["rf"]))
        nodes.append(
            helper.make_node("QuantizeLinear", ["rf" if relu else "mf", "ys", "yz"], ["y"])
        )
        inits = [
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array(F32(0.011)), "as"),
            numpy_helper.from_array(np.array(azp, at), "az"),
            numpy_helper.from_array(np.array(F32(0.0073)), "bs"),
            numpy_helper.from_array(np.array(0, S8), "bz"),
            numpy_helper.from_array(np.array(F32(0.09)), "ys"),
            numpy_helper.from_array(np.array(-128 if relu else azp, at), "yz"),
        ]
        model = make_model(
            nodes, [vi("a", tproto(at), a.shape)], [vi("y", tproto(at), None)], inits, 21
        )
        lab = f"QDQ DQ->MatMul{'->Relu' if relu else ''}->Q ({TNAME[at]} act, s8 w [{blo},{bhi}])"
        compare(lab, model, {"a": a})
        off = run_model(model, {"a": a}, "off")[0]
        on = run_model(model, {"a": a}, "all")[0]
        print(
            f"      off vs all differ in {int((off != on).sum())}/{off.size} elems, "
            f"max|diff| {np.abs(off.astype(int) - on.astype(int)).max()}"
        )

    # (i) requantization written as DQ -> Q (no float op between)
    x8 = rand_int(S8, (64,))
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
        helper.make_node("QuantizeLinear", ["d", "s2", "z2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(F32(0.03)), "s"),
        numpy_helper.from_array(np.array(F32(0.07)), "s2"),
        numpy_helper.from_array(np.array(0, S8), "z"),
        numpy_helper.from_array(np.array(3, S8), "z2"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.INT8, x8.shape)], [vi("y", TensorProto.INT8, None)], inits, 21
    )
    ref = np.clip(np.rint((x8.astype(F32) * F32(0.03)) / F32(0.07)) + 3, -128, 127).astype(S8)
    compare("DQ(s8,s=.03)->Q(s8,s=.07,zp=3)", model, {"x": x8}, ref)
    x32 = rand_int(S32, (1, 8, 4, 4), -(2**20), 2**20)
    s8v = RNG.uniform(1e-4, 1e-3, size=8).astype(F32)
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s"], ["d"], axis=1),
        helper.make_node("QuantizeLinear", ["d", "s2", "z2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(s8v, "s"),
        numpy_helper.from_array(np.array(F32(1.0)), "s2"),
        numpy_helper.from_array(np.array(0, S8), "z2"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.INT32, x32.shape)], [vi("y", TensorProto.INT8, None)], inits, 21
    )
    ref = np.clip(np.rint(x32.astype(F32) * s8v.reshape(1, 8, 1, 1)), -128, 127).astype(S8)
    compare("DQ(s32 per-axis)->Q(s8, s=1)", model, {"x": x32}, ref)
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d1"]),
        helper.make_node("QuantizeLinear", ["d1", "s2", "z"], ["q2"]),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z"], ["d2"]),
        helper.make_node("QuantizeLinear", ["d2", "s3", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(F32(0.03)), "s"),
        numpy_helper.from_array(np.array(F32(0.07)), "s2"),
        numpy_helper.from_array(np.array(F32(0.05)), "s3"),
        numpy_helper.from_array(np.array(0, S8), "z"),
    ]
    model = make_model(
        nodes, [vi("x", TensorProto.INT8, x8.shape)], [vi("y", TensorProto.INT8, None)], inits, 21
    )
    t = np.clip(np.rint((x8.astype(F32) * F32(0.03)) / F32(0.07)), -128, 127).astype(F32)
    ref = np.clip(np.rint((t * F32(0.07)) / F32(0.05)), -128, 127).astype(S8)
    compare("DQ->Q->DQ->Q (s8 in/out, scales .03/.07/.05)", model, {"x": x8}, ref)


def main():
    t0 = time.time()
    print(
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    try:
        flags = open("/proc/cpuinfo").read()
        isa = [
            f
            for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
            if f" {f}" in flags
        ]
        print("CPU ISA flags:", isa)
    except OSError:
        pass
    section_conv()
    section_matmul()
    section_int_ops()
    section_quantize()
    section_dequantize()
    section_optimizer()
    print(f"\nTotal time {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
