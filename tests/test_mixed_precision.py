"""Mixed precision end to end: the torch interpreter, sensitivity, ties, the plan through
``intq.quantize``, latency tables, INT4 packing in both artifacts, the CLI flags."""

from __future__ import annotations

import base64
import json

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import intq
from examples import zoo
from examples.zoo import ZooModel
from intq.backends.onnxruntime import compile_onnxruntime, onnx_census
from intq.cli import main
from intq.ir import from_text, to_text
from intq.ir.int4 import pack_int4, unpack_int4
from intq.mixed_precision import LatencyTable, MixedPrecision, derive_ties, plan_bits
from intq.passes import PREPARE, pipeline
from intq.passes.bit_allocation import InfeasibleBudgetError
from intq.passes.precision import quantizable_layers
from intq.passes.sensitivity import (
    direct_perturbations,
    fake_quantized,
    hessian_traces,
    make_loss,
)
from intq.semantics.numpy_eval import run_graph
from intq.semantics.torch_eval import run_torch


def _prepared(model: ZooModel) -> intq.ir.Graph:
    graph = intq.from_onnx(model.path)
    pipeline(PREPARE)(graph)
    return graph


def _digits_batches(count: int) -> list[dict[str, np.ndarray]]:
    x_train = zoo._digits_split()[0]
    return [{"input": x_train[8 * i : 8 * (i + 1)]} for i in range(count)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # The CI machine is small and shared: oversubscribed torch threads run ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits(digits_model: ZooModel) -> intq.ir.Graph:
    return _prepared(digits_model)


# ----- the torch interpreter ---------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["digits_model", "efficientnet_model", "resnet18_model"])
def test_torch_interpreter_matches_reference(request: pytest.FixtureRequest, fixture: str) -> None:
    model = request.getfixturevalue(fixture)
    graph = _prepared(model)
    expected = run_graph(graph, model.inputs)
    with torch.no_grad():
        got = run_torch(graph, model.inputs)
    for name, want in expected.items():
        span = float(want.max() - want.min())
        assert got[name].dtype == torch.float32
        np.testing.assert_allclose(got[name].numpy(), want, atol=1e-5 * span, rtol=0)


def test_torch_interpreter_pools_and_pads_match_reference() -> None:
    text = """graph main(%x: f32[2,3,9,9]) {
  %p = Pad(%x) {mode="reflect", pads=[0, 0, 1, 2, 0, 0, 2, 1], value=0.0} : f32[2,3,12,12]
  %m = MaxPool(%p) {ceil_mode=1, dilations=[1, 1], kernel_shape=[3, 3], pads=[1, 0, 1, 0],
    strides=[2, 2]} : f32[2,3,7,6]
  %a = AveragePool(%m) {ceil_mode=0, count_include_pad=0, kernel_shape=[2, 2],
    pads=[1, 1, 1, 1], strides=[2, 2]} : f32[2,3,4,4]
  %s = Slice(%a) {axes=[2, 3], ends=[-5, 4], starts=[3, 0], steps=[-2, 1]} : f32[2,3,2,4]
  %t = Transpose(%s) {perm=[0, 2, 3, 1]} : f32[2,2,4,3]
  %y = Softmax(%t) {axis=3} : f32[2,2,4,3]
  return %y
}
"""
    graph = from_text(text)
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype(np.float32)
    want = run_graph(graph, {"x": x})["y"]
    got = run_torch(graph, {"x": x})["y"].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


# ----- sensitivity -------------------------------------------------------------------------------


def test_quantizable_layers_count_params_and_macs(digits: intq.ir.Graph) -> None:
    layers = quantizable_layers(digits)
    assert [(layer.op, layer.params, layer.macs) for layer in layers] == [
        ("Conv", 16 * 9, 16 * 64 * 9),
        ("Conv", 32 * 16 * 9, 32 * 16 * 16 * 9),
        ("Gemm", 512 * 64, 512 * 64),
        ("Gemm", 64 * 10, 64 * 10),
    ]


def test_hutchinson_trace_matches_the_exact_hessian(digits: intq.ir.Graph) -> None:
    batch = _digits_batches(1)
    layers = quantizable_layers(digits)
    estimate = hessian_traces(
        digits, batch, layers, min_iterations=100, max_iterations=100, tol=0.5
    )
    assert estimate.iterations == 100
    with torch.no_grad():
        reference = run_torch(digits, batch[0])
    # The first conv (144 weights): the exact Hessian of the KL loss by double autograd.
    first = layers[0]
    loss = make_loss(digits, reference, "kl")
    w0 = torch.from_numpy(np.array(digits[first.weight].const))
    hessian = torch.autograd.functional.hessian(
        lambda w: loss(run_torch(digits, batch[0], {first.weight: w})), w0
    )
    exact = float(hessian.reshape(w0.numel(), -1).diagonal().sum())
    assert estimate.traces[first.name] == pytest.approx(exact, rel=0.25)
    # The last Gemm in closed form: z = x W + b, so tr(H) = mean_r ||x_r||^2 sum_k p_k (1 - p_k).
    last = next(node for node in digits if node.label() == layers[3].name)
    x = run_graph(digits.extract(["input"], [last.inputs[0].name]), batch[0])
    x = next(iter(x.values())).astype(np.float64)
    z = reference["logits"].double().numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    closed = float(np.mean((x**2).sum(-1) * (p * (1 - p)).sum(-1)))
    assert estimate.traces[layers[3].name] == pytest.approx(closed, rel=0.25)


def test_hutchinson_stops_when_settled_and_is_reproducible(digits: intq.ir.Graph) -> None:
    layers = quantizable_layers(digits)
    batches = _digits_batches(4)
    first = hessian_traces(digits, batches, layers, tol=0.2, min_iterations=2, max_iterations=40)
    again = hessian_traces(digits, batches, layers, tol=0.2, min_iterations=2, max_iterations=40)
    assert first.converged and first.iterations < 40
    assert first == again


def test_direct_sensitivity_is_the_loss_with_one_layer_quantized(digits: intq.ir.Graph) -> None:
    layers = quantizable_layers(digits)
    batches = _digits_batches(2)
    omega = direct_perturbations(digits, batches, layers, (4, 8), loss="kl")
    for layer in layers:
        assert omega[layer.name][4] > omega[layer.name][8] >= 0
    # Recompute one entry with the numpy reference interpreter and a numpy KL.
    layer = layers[2]
    graph = digits.copy()
    w = graph[layer.weight]
    w.const = fake_quantized(w.const, 4, layer.axis)
    values = []
    for batch in batches:
        z_ref = run_graph(digits, batch)["logits"].astype(np.float64)
        z = run_graph(graph, batch)["logits"].astype(np.float64)
        logp = z_ref - np.log(np.exp(z_ref).sum(-1, keepdims=True))
        logq = z - np.log(np.exp(z).sum(-1, keepdims=True))
        values.append((np.exp(logp) * (logp - logq)).sum(-1).mean())
    assert omega[layer.name][4] == pytest.approx(np.mean(values), rel=1e-3)


def test_sensitivity_errors_name_the_problem(digits: intq.ir.Graph) -> None:
    layers = quantizable_layers(digits)
    with pytest.raises(intq.IntqError, match="no calibration batches"):
        hessian_traces(digits, [], layers)
    with pytest.raises(intq.IntqError, match="unknown sensitivity loss"):
        hessian_traces(digits, _digits_batches(1), layers, loss="ce")
    with pytest.raises(intq.IntqError, match="unknown sensitivity method"):
        MixedPrecision(size_mb=1.0, sensitivity="fisher")
    with pytest.raises(intq.IntqError, match="candidate weight bits"):
        MixedPrecision(size_mb=1.0, candidates=(4, 16))


# ----- ties ------------------------------------------------------------------------------------


def test_ties_join_a_residual_branch_and_its_projection_shortcut(
    resnet18_model: ZooModel,
) -> None:
    graph = _prepared(resnet18_model)
    ties = derive_ties(graph)
    adds = [node for node in graph if node.op == "Add"]
    assert len(adds) == 8
    assert len(ties) == 4
    # The three downsampling blocks tie their last conv with the 1x1 shortcut conv.
    for group in ties[1:]:
        assert len(group) == 2 and "conv2" in group[0] and "downsample" in group[1]
    # The first block's identity shortcut carries the stem conv's output (through its ReLU
    # and MaxPool); the other identity shortcuts read an Add and tie nothing.
    assert ties[0] == ["/layer1/layer1.0/conv2/Conv", "/conv1/Conv"]


# ----- the plan through intq.quantize ---------------------------------------------------------


def _weight_bits(graph: intq.ir.Graph) -> dict[str, int]:
    out = {}
    for node in graph:
        if node.op in ("QConv", "QGemm", "QMatMul"):
            quant = node.inputs[1].type.quant
            out[node.label()] = quant.bits
    return out


def test_mixed_precision_meets_a_size_budget_bit_exactly_on_both_backends(
    digits_model: ZooModel, tmp_path
) -> None:
    graph = intq.from_onnx(digits_model.path)
    budget = 0.03  # MB: all-INT8 is 0.0365, first and last pinned at 8 fit in 0.0186
    mp = MixedPrecision(size_mb=budget, report=tmp_path / "mp", max_iterations=16)
    quantized = intq.quantize(graph, _digits_batches(8), intq.QuantConfig(mixed_precision=mp))
    bits = _weight_bits(quantized)
    names = list(bits)
    assert bits[names[0]] == 8 and bits[names[-1]] == 8  # pinned
    assert 4 in bits.values()
    params = {layer.name: layer.params for layer in quantizable_layers(_prepared(digits_model))}
    assert sum(params[n] * b for n, b in bits.items()) / 8 / 2**20 <= budget
    # Both backends agree bit for bit on the mixed 4/8-bit graph, on real held-out digits.
    feeds = digits_model.inputs
    want = run_graph(quantized, feeds)
    ort = compile_onnxruntime(quantized)
    got = ort.run(feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    # The report: table and PNG.
    table = (tmp_path / "mp.txt").read_text()
    assert "mixed precision: sensitivity hessian" in table and names[1] in table
    assert (tmp_path / "mp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infeasible_budget_names_the_smallest(digits: intq.ir.Graph) -> None:
    with pytest.raises(InfeasibleBudgetError, match="smallest model") as info:
        plan_bits(digits, _digits_batches(1), MixedPrecision(size_mb=0.001, max_iterations=2))
    # First and last layer pinned at 8 bits, the middle two at 4.
    assert info.value.smallest["size_mb"] == pytest.approx(
        (144 * 8 + 4608 * 4 + 32768 * 4 + 640 * 8) / 8 / 2**20
    )


def test_layer_bits_stay_pinned_and_ties_can_be_lifted(digits: intq.ir.Graph) -> None:
    names = [layer.name for layer in quantizable_layers(digits)]
    mp = MixedPrecision(size_mb=0.035, sensitivity="direct", pin_first_last=False, ties=False)
    plan = plan_bits(digits, _digits_batches(2), mp, fixed={names[2]: 8})
    assert plan.allocation.bits[names[2]] == 8
    assert plan.allocation.size_mb <= 0.035
    assert 4 in plan.allocation.bits.values()
    assert plan.traces is None and plan.ties == []


def test_latency_table_round_trip_and_budget(digits: intq.ir.Graph, tmp_path) -> None:
    from intq.mixed_precision import measure_latency

    table = measure_latency(digits, (4, 8), repeats=3)
    names = [layer.name for layer in quantizable_layers(digits)]
    assert set(table.layers) == set(names)
    assert all(ms > 0 for t in table.layers.values() for ms in t.values())
    path = table.save(tmp_path / "latency.json")
    data = json.loads(path.read_text())
    assert data["format"] == "intq-latency-table" and data["unit"] == "ms"
    assert LatencyTable.load(path) == table
    # A hand-written table: 4-bit layers twice as fast; the budget forces two to 4 bits.
    hand = LatencyTable({n: {4: 1.0, 8: 2.0} for n in names})
    mp = MixedPrecision(latency_ms=6.0, latency_table=hand, max_iterations=4)
    plan = plan_bits(digits, _digits_batches(1), mp)
    assert plan.allocation.latency_ms == pytest.approx(6.0)
    assert list(plan.allocation.bits.values()) == [8, 4, 4, 8]
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(intq.ArtifactError, match="not an intq latency table"):
        LatencyTable.load(tmp_path / "bad.json")
    with pytest.raises(intq.IntqError, match="no entry") as info:
        LatencyTable({}).for_layer(names[0], (4, 8))
    assert info.value.node == names[0]


# ----- INT4 packing --------------------------------------------------------------------------


@given(st.lists(st.integers(-8, 7), max_size=41))
def test_int4_pack_unpack_round_trip(values: list[int]) -> None:
    array = np.array(values, np.int8)
    raw = pack_int4(array)
    assert len(raw) == (len(values) + 1) // 2
    np.testing.assert_array_equal(unpack_int4(raw, len(values), signed=True), array)
    unsigned = (array.astype(np.int16) + 8).astype(np.uint8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(unsigned), len(values), False), unsigned)


def test_int4_layout_is_onnx_low_nibble_first() -> None:
    assert pack_int4(np.array([-7, 3, 1], np.int8)) == bytes([0x39, 0x01])


@pytest.fixture(scope="module")
def int4_digits(digits_model: ZooModel) -> intq.ir.Graph:
    graph = intq.from_onnx(digits_model.path)
    config = intq.QuantConfig(weight_bits=4, progress=False)
    return intq.quantize(graph, _digits_batches(4), config)


def test_int4_constants_print_packed_and_round_trip(int4_digits: intq.ir.Graph) -> None:
    text = to_text(int4_digits)
    assert to_text(from_text(text)) == text
    parsed = from_text(text)
    for value in int4_digits.constants:
        np.testing.assert_array_equal(parsed[value.name].const, value.const)
        assert parsed[value.name].type == value.type
    # The 512x64 weight: 32768 values in 16384 bytes of base64.
    fc = max(int4_digits.constants, key=lambda v: v.type.size)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"%{fc.name} ="))
    blob = line.split('i4"')[1].rstrip('"')
    assert len(base64.b64decode(blob)) == fc.type.size // 2


def test_int4_text_errors() -> None:
    bad_type = 'graph main() {\n  %w = const f32[20] i4"AAAAAAAAAAAAAA=="\n  return %w\n}\n'
    with pytest.raises(intq.ParseError, match="i4 data needs"):
        from_text(bad_type)
    short = (
        "graph main() {\n  %w = const i8[20] q(bits=4, signed, narrow, scale=0.5)"
        ' i4"AAAA"\n  return %w\n}\n'
    )
    with pytest.raises(intq.ParseError, match="bad i4 data"):
        from_text(short)


def test_int4_onnx_artifact_is_packed_integer_only_and_exact(
    int4_digits: intq.ir.Graph, digits_model: ZooModel, tmp_path
) -> None:
    exe = compile_onnxruntime(int4_digits)
    path = exe.save(tmp_path / "digits_int4.onnx")
    model = onnx.load(path)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 4
    fc = max(int4, key=lambda t: int(np.prod(t.dims)))
    assert len(fc.raw_data) == int(np.prod(fc.dims)) // 2  # two per byte
    census = onnx_census(model)
    assert "ConvInteger" in census and "MatMulInteger" in census
    want = run_graph(int4_digits, digits_model.inputs)
    got = exe.run(digits_model.inputs)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


# ----- the command line ------------------------------------------------------------------------


def test_cli_size_budget_writes_the_report(digits_model: ZooModel, tmp_path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:64])
    out = tmp_path / "digits.intq"
    code = main(
        [
            "quantize",
            str(digits_model.path),
            "--calib",
            str(calib),
            "--size-mb",
            "0.025",
            "--sensitivity",
            "direct",
            "--mp-report",
            str(tmp_path / "report"),
            "-o",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    assert 'i4"' in out.read_text()
    assert "sensitivity direct" in (tmp_path / "report.txt").read_text()
    assert (tmp_path / "report.png").exists()


def test_cli_infeasible_budget_exits_1(digits_model: ZooModel, tmp_path, capsys) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:16])
    args = ["quantize", str(digits_model.path), "--calib", str(calib), "--quiet"]
    code = main([*args, "--size-mb", "0.0001", "-o", str(tmp_path / "x.intq")])
    assert code == 1
    assert "infeasible" in capsys.readouterr().err
    code = main([*args, "--mp-report", "r", "-o", str(tmp_path / "x.intq")])
    assert code == 1


def test_minilm_mixed_precision_is_bit_exact_on_onnxruntime(minilm_model: ZooModel) -> None:
    graph = intq.from_onnx(minilm_model.path)
    # MSE to the FP32 hidden states: a sentence encoder has no classes to take a softmax of.
    mp = MixedPrecision(size_mb=7.0, loss="mse", max_iterations=8)
    config = intq.QuantConfig(mixed_precision=mp, progress=False)
    quantized = intq.quantize(graph, [minilm_model.inputs], config)
    bits = [n.inputs[1].type.quant.bits for n in quantized if n.op in ("QMatMul", "QGemm")]
    assert 4 in bits and 8 in bits
    feeds = minilm_model.inputs
    want = run_graph(quantized, feeds)
    got = compile_onnxruntime(quantized).run(feeds)
    np.testing.assert_array_equal(got["last_hidden_state"], want["last_hidden_state"])
    fp32 = run_graph(graph, feeds)["last_hidden_state"]
    mask = feeds["attention_mask"].astype(np.float32)[..., None]
    a = (fp32 * mask).sum(1) / mask.sum(1)
    b = (want["last_hidden_state"] * mask).sum(1) / mask.sum(1)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.95
