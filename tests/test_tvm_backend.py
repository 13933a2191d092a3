"""The TVM backend agrees bit for bit with the reference interpreter, and exports libraries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from int_graphs import (
    adversarial,
    full_range,
    int_input,
    qadd_and_pools,
    qconv,
    requantized,
    shifted_batches,
    weight,
)

import intq
from examples import zoo
from intq.backends.tvm import TvmExecutable, compile_tvm, load_tvm
from intq.ir import DType, Graph, QuantParams, TensorType, verify

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": "+neon"}
EM_AARCH64 = 183


def assert_same(graph: Graph, exe: TvmExecutable, feeds: dict[str, np.ndarray]) -> None:
    want = intq.compile(graph, target="reference").run(feeds)
    got = exe.run(feeds)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


ZEN3 = {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}
"""An AVX2 target without AVX-512 or VNNI: the assembly a test inspects must not depend on
the CPU the tests run on (LLVM picks other instructions for a Zen 4 host)."""


def assembly(exe: TvmExecutable) -> str:
    """The x86 assembly of every kernel of ``exe``."""
    return "".join(m.inspect_source("asm") for m in exe.executable.mod.imports)


@pytest.fixture(scope="module")
def digits_int8(digits_model):
    x_train = zoo._digits_split()[0]
    batches = [{"input": x_train[i : i + 8]} for i in range(0, 128, 8)]
    graph = intq.quantize(intq.from_onnx(digits_model.path), batches)
    return graph, intq.compile(graph, target="tvm")


# ----- real models --------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["digits_model", "resnet18_model", "efficientnet_model"])
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_real_models_are_bit_exact(fixture, weight_bits, request):
    model = request.getfixturevalue(fixture)
    x = model.inputs["input"]
    config = intq.QuantConfig(weight_bits=weight_bits)
    graph = intq.quantize(intq.from_onnx(model.path), shifted_batches(x), config)
    exe = intq.compile(graph, target="tvm")
    for feed in [x, *adversarial(x)]:
        assert_same(graph, exe, {"input": feed})
    # Every kernel got its own schedule (tensorized conv/dense, depthwise, elementwise):
    # none fell back to a plainer one.
    kinds = {kind for kind, _ in exe.schedules.values()}
    assert "conv" in kinds and "dense" in kinds
    fallbacks = {name: s for name, s in exe.schedules.items() if s[0] != s[1]}
    assert not fallbacks
    assert exe.kernel_paths and "fallback" not in exe.kernel_paths.values()


def test_tensorized_kernels_use_vpmaddwd_and_32_bit_products(digits_int8):
    graph, _ = digits_int8
    asm = assembly(intq.compile(graph, target="tvm", tvm_target=ZEN3))
    assert "vpmaddwd" in asm
    # The requantization multiplies the biased int32 accumulator by M' as LLVM's
    # high-half multiply (vpmuldq on even and odd lanes, then a blend), never as an
    # emulated 64-bit product (vpmuludq), which a plain int32 bias add would give.
    assert "vpmuldq" in asm and "vpblendd" in asm
    assert "vpmuludq" not in asm


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize(("pair", "byte_kernel"), [((64, 64), True), ((65, 64), False)])
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("layer", ["conv", "gemm"])
def test_byte_kernel_only_where_no_weight_pair_can_saturate(signed, pair, byte_kernel, sign, layer):
    """``vpmaddubsw`` adds each pair of byte products with int16 saturation: 255 * 128 =
    32640 fits, 255 * 129 = 32895 does not. Weights whose packed pairs reach 129 take the
    ``vpmaddwd`` kernel instead; both are exact on the inputs that saturate the most."""
    rng = np.random.default_rng(0)
    g = Graph()
    shape = (1, 8, 3, 4) if layer == "conv" else (3, 8)
    x = int_input(g, "x", shape, signed)
    w_data = rng.integers(-5, 6, (16, 8)).astype(np.int8)
    w_data[3, 4:6] = sign * np.array(pair)  # a pair the kernel reads together
    if layer == "conv":
        w = weight(g, w_data[:, :, None, None], rng.uniform(0.001, 0.1, 16), 0)
        acc = g.op("QConv", x, w, group=1, strides=(1, 1), pads=(1, 1, 1, 1))
    else:
        w = weight(g, w_data, rng.uniform(0.001, 0.1, 16), 0)
        acc = g.op("QGemm", x, w, transB=1)
    g.set_outputs([acc, requantized(g, acc, 20.0, True)])
    verify(g)
    zen3 = compile_tvm(g, ZEN3)
    asm = assembly(zen3)
    assert ("vpmaddubsw" in asm) == byte_kernel and "vpmaddwd" in asm
    assert set(zen3.kernel_paths.values()) == {"byte" if byte_kernel else "vpmaddwd"}
    exe = compile_tvm(g)  # exact on this host, whatever its instruction set
    dtype = np.int8 if signed else np.uint8
    for value in (np.iinfo(dtype).max, np.iinfo(dtype).min):
        assert_same(g, exe, {"x": np.full(shape, value, dtype)})
    assert_same(g, exe, {"x": full_range(rng, shape, signed)})


# ----- the VNNI kernel: chosen from the target, exact for full-range 8-bit weights ---------------

ZEN4 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}
CASCADELAKE = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
AVX_VNNI = {"kind": "llvm", "mcpu": "alderlake", "num-cores": 2}
"""AVX-VNNI (VEX-encoded ``vpdpbusd``) without AVX-512."""
AARCH64_DOTPROD = {**AARCH64, "mattr": "+neon,+dotprod"}


AVX_VNNI_ONLY = {"kind": "llvm", "mcpu": "x86-64-v3", "mattr": ["+avxvnni"], "num-cores": 2}
"""AVX2 plus AVX-VNNI and nothing else: a module any AVX-VNNI host runs."""
TUNING = ("fast-", "slow-", "false-deps-", "prefer-", "tuning-", "no-bypass-", "allow-light-")
"""LLVM CPU feature prefixes that tune code generation rather than enable instructions."""


def host_runs(target: dict) -> str | None:
    """Why a module for ``target`` cannot run here (None when it can): the host (as LLVM
    detects it) must be x86-64 with every instruction-set feature of the target."""
    import tvm
    from tvm.target import codegen

    from intq.backends.tvm import host_target

    if not codegen.llvm_get_system_triple().startswith("x86_64"):
        return "the host is not x86-64"
    features = codegen.llvm_get_cpu_features(tvm.target.Target(target))
    host = set(codegen.llvm_get_cpu_features(tvm.target.Target(host_target())))
    missing = sorted(f for f in features if f not in host and not f.startswith(TUNING))
    return f"this host lacks {', '.join(missing)}" if missing else None


def full_range_weights(g: Graph, rng: np.random.Generator, shape: tuple[int, ...], axis: int):
    """Int8 weights over all of -128..127 (not narrow), a quarter of them each extreme."""
    data = rng.integers(-128, 128, shape).astype(np.int8)
    flat = data.reshape(-1)
    flat[::4], flat[1::4] = -128, 127
    w = g.add_constant(data, "w")
    channels = shape[axis]
    quant = QuantParams(8, True, tuple(rng.uniform(0.001, 0.1, channels)), axis=axis)
    w.type = w.type.with_quant(quant)
    return w


def vnni_layer(
    layer: str, signed: bool, seed: int = 0, cin: int = 19, cout: int = 24, width: int = 8
) -> Graph:
    """A conv (3x3, padded, 5 rows of ``width``) or a dense layer with full-range 8-bit
    weights and a bias, its accumulator and its requantized output both graph outputs."""
    rng = np.random.default_rng(seed)
    g = Graph()
    shape = (1, cin, 5, width) if layer == "conv" else (3, cin)
    x = int_input(g, "x", shape, signed)
    if layer == "conv":
        w = full_range_weights(g, rng, (cout, cin, 3, 3), 0)
    else:
        w = full_range_weights(g, rng, (cin, cout), 1)
    b = g.add_constant(rng.integers(-(2**20), 2**20, cout).astype(np.int32), "b")
    b.type = b.type.with_quant(
        QuantParams(32, True, tuple(0.05 * s for s in w.type.quant.scale), axis=0)
    )
    if layer == "conv":
        acc = g.op("QConv", x, w, b, group=1, strides=(1, 1), pads=(1, 1, 1, 1))
    else:
        acc = g.op("QMatMul", x, w, b)
    g.set_outputs([acc, requantized(g, acc, 20.0, True)])
    verify(g)
    return g


@pytest.mark.parametrize("layer", ["conv", "gemm"])
@pytest.mark.parametrize(
    ("target", "path", "dot"),
    [
        (ZEN3, "vpmaddwd", None),
        (ZEN4, "vnni", "vpdpbusd\t%ymm"),
        (CASCADELAKE, "vnni", "vpdpbusd\t%ymm"),
        (AVX_VNNI, "vnni", "{vex}\tvpdpbusd"),
        (AARCH64, "vector", None),
        (AARCH64_DOTPROD, "vector", None),
    ],
    ids=["znver3", "znver4", "cascadelake", "alderlake", "aarch64", "aarch64+dotprod"],
)
def test_kernel_path_follows_the_targets_features(layer, target, path, dot):
    """The kernel path comes from the target's ``mcpu``/``mattr`` at compile time, whatever
    this host is: ``vpdpbusd`` on AVX512-VNNI and AVX-VNNI targets, none on Zen 3 (full-range
    8-bit weights there take ``vpmaddwd``), plain vector multiply-adds on AArch64."""
    exe = compile_tvm(vnni_layer(layer, signed=True), target)
    assert set(exe.kernel_paths.values()) == {path}
    asm = assembly(exe)
    assert ("vpdpbusd" in asm) == (dot is not None)
    if dot is not None:
        assert dot in asm and "vpmaddubsw" not in asm and "vpmaddwd" not in asm
    if target is ZEN3:
        assert "vpmaddwd" in asm and "vpmaddubsw" not in asm
    if target["mtriple" if "mtriple" in target else "kind"] == "aarch64-linux-gnu":
        assert "smlal" in asm  # widening multiply-adds, no x86 in sight


@pytest.mark.parametrize(
    ("target", "avx2", "vnni", "registers"),
    [
        ({"mcpu": "znver3"}, True, False, 16),
        ({"mcpu": "znver4"}, True, True, 32),
        ({"mcpu": "cascadelake"}, True, True, 32),
        ({"mcpu": "sapphirerapids"}, True, True, 32),
        ({"mcpu": "alderlake"}, True, True, 16),  # AVX-VNNI, no AVX-512
        ({"mcpu": "znver3", "mattr": ["+avxvnni"]}, True, True, 16),
        # vpdpbusd on 256 bits is AVX512-VNNI *with* AVX512-VL (EVEX-encoded ymm).
        ({"mcpu": "znver3", "mattr": ["+avx512vnni"]}, True, False, 32),
        ({"mcpu": "znver3", "mattr": ["+avx512vnni", "+avx512vl"]}, True, True, 32),
        ({"mcpu": "znver4", "mattr": ["-avx512vnni"]}, True, False, 32),
        ({}, False, False, 16),  # generic x86-64
        ({"mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, False, False, 16),
    ],
)
def test_isa_comes_from_the_targets_mcpu_and_mattr(target, avx2, vnni, registers):
    import tvm

    from intq.backends.tvm_schedules import Isa

    isa = Isa.of(tvm.target.Target({"kind": "llvm", **target}))
    assert (isa.avx2, isa.vnni, isa.registers) == (avx2, vnni, registers)


def test_without_vnni_in_mattr_the_avx2_kernels_return():
    """``-avx512vnni`` on a Zen 4 target takes VNNI away: the AVX2 kernels again."""
    exe = compile_tvm(vnni_layer("conv", True), {**ZEN4, "mattr": ["-avx512vnni"]})
    assert set(exe.kernel_paths.values()) == {"vpmaddwd"}
    assert "vpdpbusd" not in assembly(exe)


def _runnable(target: dict, name: str) -> object:
    """``target`` as a parameter, skipped (saying why) where the host cannot run its code:
    decided before Hypothesis draws any example."""
    reason = host_runs(target)
    skip = pytest.mark.skipif(
        reason is not None, reason=f"a {name} module cannot run here: {reason}"
    )
    return pytest.param(target, id=name, marks=skip)


@pytest.mark.parametrize("target", [_runnable(ZEN4, "znver4"), _runnable(AVX_VNNI_ONLY, "avxvnni")])
@settings(max_examples=10, deadline=None)
# The AVX-512 targets' wide register tiles: 4 columns x 4 blocks, 7 columns x 2 blocks.
@example(seed=1, layer="conv", signed=True, cin=19, cout=32, width=8)
@example(seed=2, layer="conv", signed=False, cin=64, cout=32, width=7)
@given(
    seed=st.integers(0, 2**16),
    layer=st.sampled_from(["conv", "gemm"]),
    signed=st.booleans(),
    cin=st.sampled_from([1, 3, 4, 19, 64]),  # channel groups of 4 with and without a tail
    cout=st.sampled_from([5, 8, 24, 32]),  # 1-4 blocks of 8: every register tile
    width=st.sampled_from([7, 8]),
)
def test_vnni_kernels_are_bit_exact_with_full_range_weights(
    target, seed, layer, signed, cin, cout, width
):
    """``vpdpbusd`` adds four u8 x s8 products into int32 with no intermediate saturation,
    so full-range 8-bit weights (-128 and 127 included) are exact, with int8 activations
    offset by 128 (the offset taken out of the bias) and uint8 ones as they are: checked at
    both ends of the activation range and on random full-range inputs, through the 4 x 4,
    7 x 2, 4 x 2 and one-block register tiles of AVX-512 targets."""
    g = vnni_layer(layer, signed, seed, cin, cout, width)
    exe = compile_tvm(g, target)
    assert set(exe.kernel_paths.values()) == {"vnni"}
    shape = g.inputs[0].type.shape
    dtype = np.int8 if signed else np.uint8
    rng = np.random.default_rng(seed)
    for value in (np.iinfo(dtype).max, np.iinfo(dtype).min):
        assert_same(g, exe, {"x": np.full(shape, value, dtype)})
    alternating = np.where(np.indices(shape).sum(0) % 2 == 0, np.iinfo(dtype).max, 0)
    assert_same(g, exe, {"x": alternating.astype(dtype)})
    assert_same(g, exe, {"x": full_range(rng, shape, signed)})


# ----- export -------------------------------------------------------------------------------------


def test_saved_library_reloads_and_runs(digits_int8, digits_model, tmp_path):
    graph, exe = digits_int8
    path = exe.save(tmp_path / "digits.so")
    assert path.read_bytes()[:4] == b"\x7fELF"
    manifest = json.loads((tmp_path / "digits.so.json").read_text())
    (spec,) = manifest["inputs"]
    assert spec["name"] == "input" and spec["shape"] == [8, 1, 8, 8] and spec["dtype"] == "float32"
    quantize = next(n for n in graph if n.op == "Quantize")
    assert spec["quantization"]["scale"] == pytest.approx(quantize.attrs["scale"], rel=1e-7)
    assert spec["quantization"]["bits"] == 8
    (out,) = manifest["outputs"]
    assert out["name"] == "logits" and out["quantization"]["op"] == "dequantize"
    assert len(out["quantization"]["scale"]) == 10  # per class, straight from the Gemm
    loaded = load_tvm(path)
    assert loaded.input_names == ["input"] and loaded.output_names == ["logits"]
    np.testing.assert_array_equal(
        loaded.run(digits_model.inputs)["logits"], exe.run(digits_model.inputs)["logits"]
    )
    np.testing.assert_array_equal(  # intq.load knows the format too
        intq.load(path).run(digits_model.inputs)["logits"], exe.run(digits_model.inputs)["logits"]
    )
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    # A modified library is refused before TVM loads (runs) it. (A copy: the original is
    # mapped into this process, and rewriting a loaded library in place corrupts its code.)
    tampered = tmp_path / "tampered.so"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    shutil.copy(tmp_path / "digits.so.json", tmp_path / "tampered.so.json")
    with pytest.raises(intq.ArtifactError, match="checksum"):
        intq.load(tampered)


def test_saved_library_runs_in_a_fresh_process(digits_int8, digits_model, tmp_path):
    """A device-side loader needs only TVM's runtime, the .so and the manifest."""
    _, exe = digits_int8
    path = exe.save(tmp_path / "model.so")
    np.save(tmp_path / "x.npy", digits_model.inputs["input"])
    script = (
        "import json, sys, numpy as np, tvm\n"
        "from tvm import relax\n"
        f"spec = json.load(open({str(path) + '.json'!r}))\n"
        f"vm = relax.VirtualMachine(tvm.runtime.load_module({str(path)!r}), tvm.cpu())\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        "out = vm[spec['entry']](tvm.runtime.tensor(x))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, out[0].numpy())\n"
        "assert not any(m == 'intq' or m.startswith('intq.') for m in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(
        np.load(tmp_path / "y.npy"), exe.run(digits_model.inputs)["logits"]
    )


def test_aarch64_export_is_a_tar_of_aarch64_objects(digits_int8, tmp_path):
    graph, _ = digits_int8
    exe = compile_tvm(graph, tvm_target=AARCH64)
    for call in (exe.run, exe.profile):
        with pytest.raises(intq.IntqError, match="cannot run on this machine"):
            call({"input": np.zeros((8, 1, 8, 8), np.float32)})
    with pytest.raises(intq.ArtifactError, match=r"\.tar"):
        exe.save(tmp_path / "digits.so")
    path = exe.save(tmp_path / "digits.tar")
    with tarfile.open(path) as tar:
        objects = [m for m in tar.getmembers() if m.name.endswith(".o")]
        assert objects
        for member in objects:
            header = tar.extractfile(member).read(20)  # type: ignore[union-attr]
            assert header[:4] == b"\x7fELF" and header[4] == 2  # 64-bit
            assert int.from_bytes(header[18:20], "little") == EM_AARCH64, member.name
    manifest = json.loads((tmp_path / "digits.tar.json").read_text())
    assert manifest["target"]["mtriple"] == "aarch64-linux-gnu"
    with pytest.raises(intq.ArtifactError, match="not this machine"):
        load_tvm(path)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM needs nvcc to build CUDA kernels")
def test_cuda_sm90_module_builds(digits_int8, digits_model, tmp_path):
    """Built here, where there is no GPU; run and compared only where one is present."""
    import tvm

    graph, host = digits_int8
    exe = compile_tvm(graph, tvm_target={"kind": "cuda", "arch": "sm_90"})
    kinds = [m.kind for m in exe.executable.mod.imports[0].imports]
    assert "cuda" in kinds
    cuda = exe.executable.mod.imports[0].imports[kinds.index("cuda")]
    assert "__global__" in cuda.inspect_source()
    path = exe.save(tmp_path / "digits_cuda.so")
    assert json.loads((tmp_path / "digits_cuda.so.json").read_text())["target"]["arch"] == "sm_90"
    if tvm.cuda(0).exist:
        np.testing.assert_array_equal(
            load_tvm(path).run(digits_model.inputs)["logits"],
            host.run(digits_model.inputs)["logits"],
        )
    else:
        with pytest.raises(intq.IntqError, match="cannot run on this machine"):
            exe.run(digits_model.inputs)


def test_bad_targets_and_artifacts_raise_intq_errors(digits_int8, tmp_path):
    graph, _ = digits_int8
    with pytest.raises(intq.IntqError, match="not JSON"):
        compile_tvm(graph, tvm_target="llvm -mcpu=znver3")
    with pytest.raises(intq.IntqError, match="kind"):
        compile_tvm(graph, tvm_target={"mcpu": "znver3"})
    with pytest.raises(intq.ArtifactError, match="manifest"):
        load_tvm(tmp_path / "missing.so")


# ----- errors -------------------------------------------------------------------------------------


def test_an_op_without_a_lowering_names_the_node():
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (2, 3)))
    g.set_outputs([g.op("Sigmoid", x, name="/head/act")])
    with pytest.raises(intq.UnsupportedOpError, match="Sigmoid has no TVM lowering") as err:
        intq.compile(g, target="tvm")
    assert err.value.node == "/head/act"


def test_a_3d_convolution_is_refused_with_its_name():
    g = Graph()
    x = int_input(g, "x", (1, 2, 4, 4, 4), True)
    w = weight(g, np.ones((3, 2, 1, 1, 1), np.int8), [0.1] * 3, 0)
    g.set_outputs([g.op("QConv", x, w, name="/conv3d")])
    with pytest.raises(intq.UnsupportedOpError, match="spatial dimensions") as err:
        intq.compile(g, target="tvm")
    assert err.value.node == "/conv3d"


# ----- single layers, full-range integers (Hypothesis) --------------------------------------------


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
    groups=st.sampled_from(["one", "depthwise", "two"]),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    pads=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    bias=st.booleans(),
    fused=st.booleans(),
    length=st.integers(7, 12),  # the widest window: 2 * (4 - 1) + 1
)
def test_1d_qconv_layers_are_bit_exact(
    seed, signed, groups, kernel, stride, dilation, pads, bias, fused, length
):
    """A 1-D ``QConv`` (SqueezeBERT's grouped Conv1d, audio front ends) runs as a 2-D one of
    height 1: input ``[N, C, 1, L]``, weights ``[M, C / group, 1, K]``, its pads, stride and
    dilation along the width; the result reshaped back (after the fused requantization)."""
    rng = np.random.default_rng(seed)
    channels = 4
    group = {"one": 1, "depthwise": channels, "two": 2}[groups]
    out_channels = channels if groups == "depthwise" else 6
    g = Graph()
    x = int_input(g, "x", (2, channels, length), signed)
    w_data = full_range(rng, (out_channels, channels // group, kernel), True).clip(-127, 127)
    w = weight(g, w_data, rng.uniform(0.001, 0.1, out_channels), 0)
    inputs = [x, w]
    if bias:
        acc_scales = tuple(0.05 * s for s in w.type.quant.scale)
        b = g.add_constant(rng.integers(-(2**20), 2**20, out_channels).astype(np.int32), "b")
        b.type = b.type.with_quant(QuantParams(32, True, acc_scales, axis=0))
        inputs.append(b)
    acc = g.op("QConv", *inputs, group=group, strides=(stride,), dilations=(dilation,), pads=pads)
    y = requantized(g, acc, float(rng.uniform(0.5, 20)), rng.random() < 0.5)
    g.set_outputs([y] if fused else [acc, y])
    verify(g)
    assert_same(g, compile_tvm(g), {"x": full_range(rng, (2, channels, length), signed)})


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
    channels=st.sampled_from([1, 2, 3, 4, 6, 17, 24]),  # odd, and several vector blocks
    groups=st.sampled_from(["one", "depthwise", "two"]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    bias=st.booleans(),
    fused=st.booleans(),
    width=st.sampled_from([5, 7, 9]),
    weight_max=st.sampled_from([127, 64, 7]),  # 64 and 7: the byte kernel (vpmaddubsw)
)
def test_qconv_layers_are_bit_exact(
    seed, signed, channels, groups, kernel, stride, pad, bias, fused, width, weight_max
):
    rng = np.random.default_rng(seed)
    g = Graph()
    x = int_input(g, "x", (1, channels, 6, width), signed)
    group = {"one": 1, "depthwise": channels, "two": 2 if channels % 2 == 0 else 1}[groups]
    out_channels = channels if groups == "depthwise" else 10
    acc = qconv(g, rng, x, out_channels, group, kernel, stride, pad, bias, weight_max)
    y = requantized(g, acc, float(rng.uniform(0.5, 20)), rng.random() < 0.5)
    g.set_outputs([y] if fused else [acc, y])  # alone, the accumulator is fused with the requantize
    verify(g)
    assert_same(g, compile_tvm(g), {"x": full_range(rng, (1, channels, 6, width), signed)})


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    signed=st.booleans(),
    trans_b=st.booleans(),
    rows=st.integers(1, 9),
    k=st.integers(1, 300),
    n=st.integers(1, 20),
    matmul=st.booleans(),
    weight_max=st.sampled_from([127, 64]),
)
def test_qgemm_and_qmatmul_layers_are_bit_exact(
    seed, signed, trans_b, rows, k, n, matmul, weight_max
):
    rng = np.random.default_rng(seed)
    g = Graph()
    shape = (2, rows, k) if matmul else (rows, k)
    x = int_input(g, "x", shape, signed)
    w_shape = (k, n) if matmul or not trans_b else (n, k)
    w_data = full_range(rng, w_shape, True).clip(-weight_max, weight_max)
    scales = rng.uniform(0.001, 0.1, n)
    if matmul:
        acc = g.op("QMatMul", x, weight(g, w_data, scales, 1))
    else:
        w = weight(g, w_data, scales, 0 if trans_b else 1)
        acc = g.op("QGemm", x, w, transB=int(trans_b))
    g.set_outputs([requantized(g, acc, float(rng.uniform(1, 100)), True)])
    assert_same(g, compile_tvm(g), {"x": full_range(rng, shape, signed)})


@settings(max_examples=16, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    layer=st.sampled_from(["conv", "depthwise", "gemm", "matmul"]),
    one_multiplier=st.booleans(),
    bias_bits=st.sampled_from([4, 20, 30]),
    weight_max=st.sampled_from([127, 64]),
)
def test_a_bias_in_the_accumulator_requantizes_exactly(
    seed, layer, one_multiplier, bias_bits, weight_max
):
    """With every S' >= 32 (as these scales give) the kernel adds the bias to the int32
    accumulator (an unsigned add, reinterpreted) and takes the high half of its product
    with M': exact for biases up to 2^30, with per-channel and per-tensor weights (one
    multiplier; the bias stays per channel)."""
    rng = np.random.default_rng(seed)
    g = Graph()
    channels = 12
    conv = layer in ("conv", "depthwise")
    if conv:
        shape = (1, channels, 5, 8)
        group = channels if layer == "depthwise" else 1
        w_shape = (channels, channels // group, 3, 3)
        attrs = dict(group=group, strides=(1, 1), pads=(1, 1, 1, 1))
    else:
        shape = (2, 3, 40) if layer == "matmul" else (3, 40)
        w_shape, attrs = (40, channels), {}
    x = int_input(g, "x", shape, conv)
    w_data = full_range(rng, w_shape, True).clip(-weight_max, weight_max)
    w_scales = rng.uniform(0.001, 0.1, 1 if one_multiplier else channels)
    w = weight(g, w_data, w_scales, None if one_multiplier else 0 if conv else 1)
    b = g.add_constant(rng.integers(-(2**bias_bits), 2**bias_bits, channels, np.int32), "b")
    acc_scales = tuple(0.05 * s for s in w.type.quant.scale)
    b.type = b.type.with_quant(
        QuantParams(32, True, acc_scales, axis=None if one_multiplier else 0)
    )
    op = "QConv" if conv else "QMatMul" if layer == "matmul" else "QGemm"
    acc = g.op(op, x, w, b, **attrs)
    y = requantized(g, acc, float(rng.uniform(0.5, 20)), True)
    assert min(y.producer.attrs["shift"]) >= 32 and len(y.producer.attrs["shift"]) == len(w_scales)
    g.set_outputs([y])
    verify(g)
    assert_same(g, compile_tvm(g), {"x": full_range(rng, shape, conv)})


@settings(max_examples=25, deadline=None)
@example(seed=0, pairs=[(3, 1), (2**31 - 1, 64), (5, 0), (7, -3)], signed=False)
# Every S >= 32: the kernel shifts the product's high half on 32-bit lanes.
@example(seed=1, pairs=[(2**31 - 1, 32), (2**30, 63), (12345, 70), (2**31 - 1, 45)], signed=True)
@example(seed=2, pairs=[(2**31 - 1, 32)], signed=False)
# Every S >= 33: the rounding is an int32 add on the high half of the product.
@example(seed=3, pairs=[(2**31 - 1, 33), (1, 33), (2**30 + 7, 40), (5, 64), (3, 63)], signed=False)
@given(
    seed=st.integers(0, 2**16),
    pairs=st.lists(
        st.tuples(st.integers(1, 2**31 - 1), st.integers(-4, 80)), min_size=1, max_size=6
    ),
    signed=st.booleans(),
)
def test_requantize_edge_shifts_are_bit_exact(seed, pairs, signed):
    """Per tensor (immediates) and per channel (constant arrays), S from -4 to 80."""
    rng = np.random.default_rng(seed)
    pairs = [(min(m, 2**10) if s <= 0 else m, s) for m, s in pairs]  # S <= 0 fits int64
    channels = len(pairs)
    ratios = [m * 2.0**-s for m, s in pairs]  # output scale 1: input scale = M * 2^-S
    shape = (channels, 16)
    g = Graph()
    x = g.add_input("x", TensorType(DType.I32, shape, QuantParams(32, True, (ratios[0],))))
    xc = g.add_input("xc", TensorType(DType.I32, shape, QuantParams(32, True, ratios, axis=0)))
    lo, hi = (-128, 127) if signed else (0, 255)
    common = dict(bits=8, signed=int(signed), scale=1.0, lo=lo, hi=hi)
    per_tensor = g.op("Requantize", x, multiplier=(pairs[0][0],), shift=(pairs[0][1],), **common)
    multipliers, shifts = zip(*pairs)
    per_channel = g.op("Requantize", xc, multiplier=multipliers, shift=shifts, axis=0, **common)
    g.set_outputs([per_tensor, per_channel])
    acc = rng.integers(-(2**31), 2**31, shape, dtype=np.int64)
    acc[:, :4] = [-(2**31), 2**31 - 1, 0, -1]
    if any(s <= 0 for _, s in pairs):
        acc = acc >> 12  # keep acc * M * 2^-S within int64, as the range analysis requires
    feeds = {"x": acc.astype(np.int32), "xc": acc.astype(np.int32)}
    assert_same(g, compile_tvm(g), feeds)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), ra=st.floats(0.01, 4.0), rb=st.floats(0.01, 4.0))
def test_qadd_pools_and_data_movement_are_bit_exact(seed, ra, rb):
    rng = np.random.default_rng(seed)
    g, a, b, (s, pooled, mean) = qadd_and_pools(ra, rb)
    maxed = g.op("MaxPool", a, kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))
    moved = g.op("Transpose", g.op("Slice", s, starts=(3,), ends=(-5,), axes=(3,), steps=(-2,)))
    joined = g.op("Flatten", g.op("Concat", a, g.op("Relu", a), axis=1), axis=1)
    padded = g.op("Pad", b, pads=(0, 0, 1, 0, 0, 0, 0, 2), value=3.0)
    g.set_outputs([s, pooled, mean, maxed, moved, joined, padded])
    verify(g)
    feeds = {"a": full_range(rng, (1, 3, 4, 4), True), "b": full_range(rng, (1, 3, 4, 4), False)}
    assert_same(g, compile_tvm(g), feeds)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), signed=st.booleans())
def test_nhwc_activations_meet_nchw_ops_bit_exactly(seed, signed):
    """Convs, depthwise convs and pools keep activations NHWC; grouped convs, slices and
    concats with an NCHW value take them back; every path agrees with the reference."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = int_input(g, "x", (1, 5, 9, 7), signed)

    def conv(v, out, k, group=1, stride=1):
        c = v.type.shape[1]
        w = weight(g, full_range(rng, (out, c // group, k, k), True).clip(-127), [0.02] * out, 0)
        acc = g.op("QConv", v, w, group=group, strides=(stride, stride), pads=(k // 2,) * 4)
        return requantized(g, acc, 8.0, False)  # one scale: the concats need it

    a = conv(x, 16, 3)  # NHWC
    d = conv(a, 16, 3, group=16, stride=2)  # NHWC, depthwise
    m = g.op("MaxPool", a, kernel_shape=(3, 3), strides=(2, 2), pads=(1, 1, 1, 1))  # NHWC
    grouped = conv(m, 8, 1, group=2)  # NCHW: takes m back
    both = g.op("Concat", d, m, axis=1)  # NHWC inputs: NHWC concat
    mixed = g.op("Concat", grouped, d, axis=1)  # mixed: NCHW
    pooled = g.op("QAveragePool", both, kernel_shape=(2, 2), strides=(1, 1))
    mean = g.op("QGlobalAveragePool", conv(mixed, 24, 1))
    g.set_outputs([a, both, mixed, pooled, mean])
    verify(g)
    exe = compile_tvm(g)
    assert_same(g, exe, {"x": full_range(rng, (1, 5, 9, 7), signed)})
    kinds = {kind for kind, _ in exe.schedules.values()}
    assert {"conv", "depthwise", "pool"} <= kinds
    assert all(kind == applied for kind, applied in exe.schedules.values())


def test_quantize_rounds_half_to_even_after_a_float32_division():
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (12,)))
    q = g.op("Quantize", x, bits=8, signed=1, scale=0.1)
    g.set_outputs([q, g.op("Dequantize", q)])
    ties = np.float32([0.05, 0.15, 0.25, -0.05, -0.25, 12.7, 12.75, -12.85, 1e30, -1e30, 0, 3.3])
    assert_same(g, compile_tvm(g), {"x": ties})


def test_quantize_runs_on_vectors_with_nan_ties_and_infinities_exact():
    """An image's Quantize is vector code only (``vroundps``, no scalar ``vroundss``, no
    byte extracts) with NaN -> 0 in every lane: TVM's own ``nearbyint`` and ``isnan`` left
    the loop scalar, and LLVM vectorized the loop over rows instead, storing byte by byte
    (and, for AVX-512, gathering each vector from 16 rows)."""
    g = Graph()
    x = g.add_input("x", TensorType(DType.F32, (1, 3, 8, 64)))
    q = g.op("Quantize", x, bits=8, signed=0, scale=0.1)
    g.set_outputs([q])
    exe = compile_tvm(g, ZEN3)
    asm = assembly(exe)
    assert "vroundps" in asm and "vroundss" not in asm and "vpextrb" not in asm
    rng = np.random.default_rng(5)
    special = [np.nan, -np.nan, np.inf, -np.inf, 0.05, 0.15, 0.25, 12.75, 25.45, -0.05, 1e30]
    feed = rng.choice(np.float32(special), (1, 3, 8, 64))
    feed[0, 1] = rng.normal(0, 10, (8, 64))
    assert np.isnan(feed).sum() > 100
    assert_same(g, exe, {"x": feed})


def test_a_generic_conv_accumulates_a_vector_of_outputs_per_step():
    """A grouped conv of 16-bit activations (SqueezeBERT's attention projections: no
    tensorized kernel) runs its ``generic`` schedule with the reduction outside the
    innermost output loop, which is vectorized (``vpmulld`` on the AVX2 target; the
    reduction innermost left scalar multiplies), and stays bit-exact over the full range."""
    rng = np.random.default_rng(8)
    g = Graph()
    x = int_input(g, "x", (1, 64, 1, 16), True, bits=16)
    g.set_outputs([requantized(g, qconv(g, rng, x, 64, 2, 1, 1, 0, True), 0.05, True)])
    zen3 = compile_tvm(g, ZEN3)
    assert set(zen3.schedules.values()) == {("generic", "generic")}
    assert "vpmulld" in assembly(zen3)
    exe = compile_tvm(g)
    for _ in range(3):
        assert_same(g, exe, {"x": full_range(rng, (1, 64, 1, 16), True, bits=16)})


# ----- running ------------------------------------------------------------------------------------


def _view_and_conv_graph(rng: np.random.Generator) -> Graph:
    """An int8 input, returned flattened (on TVM a view of the input tensor) and through a
    requantized conv, plus a float input quantized and dequantized."""
    g = Graph()
    x = int_input(g, "x", (1, 4, 5, 5), True)
    f = g.add_input("f", TensorType(DType.F32, (2, 3)))
    conv = requantized(g, qconv(g, rng, x, 8, 1, 3, 1, 1, True), 0.1, True)
    q = g.op("Quantize", f, bits=8, signed=1, scale=0.02)
    g.set_outputs([g.op("Flatten", x, axis=1), conv, g.op("Dequantize", q)])
    verify(g)
    return g


def test_runs_fill_the_same_input_tensors_yet_every_result_stays_its_own():
    """run() copies each feed into input tensors allocated once and copies each output out:
    an output that is a view of an input (the flattened ``x``) keeps the values of its own
    run after later runs overwrite the input tensors, and a result written to by the caller
    changes nothing in the next run."""
    rng = np.random.default_rng(3)
    g = _view_and_conv_graph(rng)
    exe = compile_tvm(g)
    reference = intq.compile(g, target="reference")
    feeds = [
        {"x": full_range(rng, (1, 4, 5, 5), True), "f": rng.normal(size=(2, 3))}  # float64
        for _ in range(3)
    ]
    feeds[1]["x"] = np.ascontiguousarray(feeds[1]["x"].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not feeds[1]["x"].flags.c_contiguous
    results = [exe.run(feed) for feed in feeds]
    for feed, got in zip(feeds, results):
        for name, want in reference.run(feed).items():
            assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
            np.testing.assert_array_equal(got[name], want, err_msg=name)
    for array in results[0].values():
        array[...] = 0  # the caller's own arrays, writable
    assert_same(g, exe, feeds[0])
    with pytest.raises(intq.ShapeError, match="has shape"):
        exe.run({"x": feeds[0]["x"][..., :4], "f": feeds[0]["f"]})
    assert_same(g, exe, feeds[2])  # a refused feed leaves nothing behind


def test_runs_from_several_threads_each_get_their_own_results():
    """One executable run from 4 threads at once: the runs share its input tensors and its
    VM, one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(4)
    g = _view_and_conv_graph(rng)
    exe = compile_tvm(g)
    reference = intq.compile(g, target="reference")
    feeds = [
        {"x": full_range(rng, (1, 4, 5, 5), True), "f": rng.normal(size=(2, 3)).astype(np.float32)}
        for _ in range(48)
    ]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads inside runs, not only between them
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(exe.run, feeds * 4))
    finally:
        sys.setswitchinterval(interval)
    for feed, got in zip(feeds * 4, results):
        for name, want in reference.run(feed).items():
            np.testing.assert_array_equal(got[name], want, err_msg=name)


# ----- profiling ----------------------------------------------------------------------------------


def test_profile_times_each_kernel_and_names_its_nodes(tmp_path, capsys):
    from intq.cli import main

    rng = np.random.default_rng(0)
    g = Graph()
    x = int_input(g, "x", (1, 16, 8, 8), True)
    for _ in range(2):  # the same shapes twice: TVM shares one prim func between the convs
        x = requantized(g, qconv(g, rng, x, 16, 1, 1, 1, 0, True), 0.05, True)
    g.set_outputs([x])
    exe = compile_tvm(g)
    feeds = {"x": full_range(rng, (1, 16, 8, 8), True)}
    rows = exe.profile(feeds, runs=3, warmup=1)
    assert [r.ms for r in rows] == sorted((r.ms for r in rows), reverse=True)
    assert all(r.calls >= 1 and r.ms > 0 for r in rows)
    by_kernel = {r.kernel: r for r in rows}
    conv = by_kernel[next(name for name, (kind, _) in exe.schedules.items() if kind == "conv")]
    assert conv.calls == 2 and conv.nodes == tuple(n.label() for n in g if n.op == "QConv")
    assert any(name.startswith("vm.builtin.alloc") for name in by_kernel)  # the VM's own calls
    assert_same(g, exe, feeds)  # run() is not instrumented, and still exact
    with pytest.raises(intq.IntqError, match="runs >= 1"):
        exe.profile(feeds, runs=0)

    # A saved library keeps the names (in its manifest), and the CLI prints the table.
    path = exe.save(tmp_path / "twins.so")
    loaded = {r.kernel: r for r in load_tvm(path).profile(feeds, runs=2)}
    assert loaded[conv.kernel].nodes == conv.nodes
    np.savez(tmp_path / "in.npz", **feeds)
    bench = ["bench", str(path), "--inputs", str(tmp_path / "in.npz"), "--repeat", "3"]
    assert main([*bench, "--profile", "--top", "0"]) == 0  # every kernel
    out = capsys.readouterr().out
    assert re.search(rf"^{conv.kernel} +2 ", out, re.M) and "QConv -> %qconv (+1 more)" in out
    assert "more kernels:" not in out
    assert main([*bench, "--profile", "--top", "1"]) == 0
    out = capsys.readouterr().out.split("profiled runs:\n")[1].splitlines()
    assert len(out) == 5 and out[3].startswith(f"... {len(rows) - 1} more kernels: ")
    assert out[4].endswith("kernels ran its own schedule (no fallback)")  # from the manifest
    rpc = ["--rpc-tracker", "127.0.0.1:9", "--rpc-key", "k"]
    assert main([*bench, "--profile", *rpc]) == 1
    assert "--profile times the kernels on this machine" in capsys.readouterr().err


# ----- command line -------------------------------------------------------------------------------


def test_compile_command_targets_tvm(digits_model, tmp_path, capsys):
    from intq.cli import main

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:64])
    common = ["compile", str(digits_model.path), "--calib", str(calib), "--target", "tvm"]
    assert main([*common, "-o", str(tmp_path / "digits.so"), "--quiet"]) == 0
    graph = intq.from_onnx(digits_model.path)
    batches = [{"input": zoo._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    want = intq.compile(intq.quantize(graph, batches)).run(digits_model.inputs)["logits"]
    got = load_tvm(tmp_path / "digits.so").run(digits_model.inputs)["logits"]
    np.testing.assert_array_equal(got, want)

    cross = ["--tvm-target", json.dumps(AARCH64), "--quiet"]
    assert main([*common, *cross, "-o", str(tmp_path / "digits.tar")]) == 0
    assert tarfile.is_tarfile(tmp_path / "digits.tar")
    assert main([*common, "--tvm-target", "{oops", "-o", str(tmp_path / "x.so")]) == 1
    assert "not JSON" in capsys.readouterr().err


def test_negative_token_ids_count_from_the_end_as_in_onnx():
    # An embedding lookup takes -1 as the table's last row (ONNX Gather, the reference and
    # ONNX Runtime); TVM's clipping take alone would read row 0.
    import torch

    class Embedded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table, self.dense = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.dense(self.table(ids))

    torch.manual_seed(0)
    graph = intq.from_torch(Embedded().eval(), (torch.tensor([[1, 2, 3]]),), input_names=["ids"])
    data = [{"ids": np.array([[i, (i + 1) % 10, (i + 2) % 10]])} for i in range(10)]
    quantized = intq.quantize(graph, data, intq.QuantConfig(progress=False))
    reference = intq.compile(quantized, "reference")
    feed = {"ids": np.array([[-1, 2, -10]])}
    want = reference.run(feed)
    same_rows = reference.run({"ids": np.array([[9, 2, 0]])})
    got = compile_tvm(quantized).run(feed)
    for name in want:
        np.testing.assert_array_equal(want[name], same_rows[name])
        np.testing.assert_array_equal(got[name], want[name])
