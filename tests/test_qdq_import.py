"""Models already quantized by ONNX Runtime: QDQ import keeps the model's own quantization.

A small CNN and a small attention + MLP block are exported from torch and quantized with
``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel int8 weights), once with
symmetric int8 activations (``ActivationSymmetric=True``, s8s8) and once with ONNX Runtime's
default asymmetric uint8 activations. intq imports them without calibration data; the
integer graph must hold the model's weight integers exactly, the model's activation scales
(symmetric models), be as faithful to the float model as ONNX Runtime running the QDQ model,
and run bit-exactly on every backend. Dynamically quantized and QOperator models are refused
with one error.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_models import IR_VERSION, f32, make_model
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from torch import nn

import intq
from intq.backends import TARGETS
from intq.frontends.onnx_qdq import DYNAMIC_OPS, QdqApproximationWarning
from intq.ir.types import QuantParams
from intq.passes.model_quantization import ActivationRange, ModelQuantization, WeightScales


class _Cnn(nn.Module):
    """Conv-ReLU, max pool, a residual add, a 1x1 conv, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        z = self.c3(torch.relu(self.c2(y) + y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


class _Block(nn.Module):
    """Single-head attention and a ReLU MLP, each with a residual: MatMuls of weights and
    of two activations, a scaled softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.f1, self.f2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) * 0.25
        h = x + self.o(torch.softmax(scores, -1) @ self.v(x))
        return h + self.f2(torch.relu(self.f1(h)))


SHAPES = {"cnn": (1, 3, 8, 8), "block": (1, 6, 16)}
MODES = {
    "s8s8": dict(activation_type=QuantType.QInt8, extra_options={"ActivationSymmetric": True}),
    "u8": dict(activation_type=QuantType.QUInt8),  # ONNX Runtime's default: asymmetric
}


class _Reader(CalibrationDataReader):
    def __init__(self, samples: list[np.ndarray]):
        self._items = iter([{"x": s} for s in samples])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def _samples(shape: tuple[int, ...], count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def _export(module: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        buffer = io.BytesIO()
        torch.onnx.export(
            module.eval(),
            (torch.zeros(shape),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
        )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.ir_version = IR_VERSION
    onnx.save(proto, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"cnn": float, "cnn-s8s8": QDQ, "cnn-u8": QDQ, ...}`` model files."""
    root = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    paths = {}
    for name, module in (("cnn", _Cnn()), ("block", _Block())):
        paths[name] = root / f"{name}.onnx"
        _export(module, SHAPES[name], paths[name])
        for mode, options in MODES.items():
            paths[f"{name}-{mode}"] = root / f"{name}-{mode}.onnx"
            quantize_static(
                paths[name],
                paths[f"{name}-{mode}"],
                _Reader(_samples(SHAPES[name], 4, 0)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                weight_type=QuantType.QInt8,
                **options,
            )
    # 7-bit weights ([-64, 64]): intq's own per-channel quantizer would take 127 levels, so
    # only the model's scales give these integers.
    paths["cnn-reduced"] = root / "cnn-reduced.onnx"
    quantize_static(
        paths["cnn"],
        paths["cnn-reduced"],
        _Reader(_samples(SHAPES["cnn"], 4, 0)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=True,
        **MODES["s8s8"],
    )
    return paths


QDQ = [f"{name}-{mode}" for name in SHAPES for mode in MODES]


def _import(path: Path) -> intq.ir.Graph:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QdqApproximationWarning)
        return intq.from_onnx(path)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def _activation_scales(path: Path) -> set[float]:
    """The scales of the model's activation QuantizeLinear nodes."""
    proto = onnx.load(path)
    init = _initializers(path)
    return {
        float(init[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in init
    }


# ----- the model's own quantization -------------------------------------------------------


@pytest.mark.parametrize("model", [*QDQ, "cnn-reduced"])
def test_the_weights_are_the_models_int8_integers_exactly(models, model):
    proto = onnx.load(models[model])
    init = _initializers(models[model])
    stored = {
        n.output[0]: init[n.input[0]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in init
    }
    int_graph = intq.quantize(_import(models[model]))
    layers = [n for n in int_graph if n.op in ("QConv", "QGemm", "QMatMul")]
    assert len(layers) == (4 if model.startswith("cnn") else 6)
    for node in layers:
        w = node.inputs[1]
        assert w.type.quant.narrow and w.type.quant.bits == 8
        assert w.const.dtype == np.int8
        np.testing.assert_array_equal(w.const, stored[w.name], err_msg=node.name)
        if model == "cnn-reduced":
            assert np.abs(w.const).max() <= 64
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if model in ("cnn-s8s8", "cnn-reduced"):
            # Every input scale is the model's, so the int32 bias at s_x * s_w[c] is too.
            np.testing.assert_array_equal(bias.const, stored[node.name.split("/")[1] + ".bias"])


@pytest.mark.parametrize("model", ["cnn-s8s8", "block-s8s8"])
def test_a_symmetric_models_activation_scales_are_kept_exactly(models, model):
    scales = _activation_scales(models[model])
    int_graph = intq.quantize(_import(models[model]))
    rescaled = [n for n in int_graph if n.op in ("Quantize", "Requantize", "QAdd", "QMul")]
    assert len(rescaled) >= 6
    for node in rescaled:
        quant = node.output.type.quant
        assert quant.signed and quant.bits == 8, node.name
        assert quant.scale[0] in scales, f"{node.name}: {quant.scale[0]} is not the model's"
    # The input's Quantize is the model's x_scale, with its zero point 0.
    x_scale = float(_initializers(models[model])["x_scale"])
    assert int_graph.nodes[0].op == "Quantize" and int_graph.nodes[0].attrs["scale"] == x_scale


def test_uint8_zero_point_zero_is_an_unsigned_activation_and_restores_the_removed_relu(models):
    # ONNX Runtime's u8 quantizer removes each ReLU whose output its uint8 (zero point 0)
    # pair quantizes; the import puts the clamp back as a Relu, and the lowering makes the
    # value unsigned at exactly the model's scale.
    proto = onnx.load(models["cnn-u8"])
    assert not [n for n in proto.graph.node if n.op_type == "Relu"]
    graph = _import(models["cnn-u8"])
    assert [n.op for n in graph].count("Relu") == 2
    scales = _activation_scales(models["cnn-u8"])
    int_graph = intq.quantize(graph)
    unsigned = [n for n in int_graph if n.op in ("Requantize", "QAdd") and not n.attrs["signed"]]
    assert len(unsigned) == 2
    for node in unsigned:
        assert node.attrs["lo"] == 0 and node.attrs["hi"] == 255
        assert node.attrs["scale"] in scales


def test_a_nonzero_zero_point_is_covered_symmetrically_with_one_warning(models):
    with pytest.warns(QdqApproximationWarning, match=r"^6 of the model's quantized tensors") as w:
        graph = intq.from_onnx(models["cnn-u8"])
    assert len(w) == 1
    model = graph.analysis(ModelQuantization)
    x = model.activation(graph["x"])
    init = _initializers(models["cnn-u8"])
    s, z = float(init["x_scale"]), int(init["x_zero_point"])
    assert z != 0 and x.exact is None
    assert (x.lo, x.hi) == (s * (0 - z), s * (255 - z))
    int_graph = intq.quantize(graph)
    quantize = int_graph.nodes[0]
    assert quantize.attrs["signed"] == 1
    assert quantize.attrs["scale"] == max(-x.lo, x.hi) / 127


def test_a_symmetric_model_imports_without_a_warning(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error", QdqApproximationWarning)
        graph = intq.from_onnx(models["cnn-s8s8"])
    assert graph.analysis(ModelQuantization) is not None
    assert intq.from_onnx(models["cnn"]).analysis(ModelQuantization) is None


# ----- numerics --------------------------------------------------------------------------


@pytest.mark.parametrize("model", QDQ)
def test_as_faithful_to_the_float_model_as_onnxruntime_running_the_qdq_model(models, model):
    """intq against ONNX Runtime on the QDQ model, both against the float model, on 32 fresh
    samples. Bound: intq's max and mean errors to the float model are at most 1.1x ONNX
    Runtime's plus one output step (measured: equal max errors, intq's mean 0.9-1.0x);
    the s8s8 CNN is within one output step of ONNX Runtime (measured: identical)."""
    name = model.split("-")[0]
    exe = intq.compile(intq.quantize(_import(models[model])), target="reference")
    qdq = ort.InferenceSession(str(models[model]), providers=["CPUExecutionProvider"])
    fp32 = ort.InferenceSession(str(models[name]), providers=["CPUExecutionProvider"])
    step = float(_initializers(models[model])["y_scale"])
    ours, theirs, want = [], [], []
    for x in _samples(SHAPES[name], 32, seed=7):
        ours.append(exe.run({"x": x})["y"])
        theirs.append(qdq.run(None, {"x": x})[0])
        want.append(fp32.run(None, {"x": x})[0])
    ours, theirs, want = map(np.concatenate, (ours, theirs, want))
    ours_err, theirs_err = np.abs(ours - want), np.abs(theirs - want)
    assert ours_err.max() <= 1.1 * theirs_err.max() + step
    assert ours_err.mean() <= 1.1 * theirs_err.mean() + step
    if model == "cnn-s8s8":
        assert np.abs(ours - theirs).max() <= step * 1.0001


@pytest.mark.parametrize("model", ["cnn-u8", "block-s8s8"])
def test_the_integer_graph_is_bit_exact_on_every_backend(models, model):
    name = model.split("-")[0]
    int_graph = intq.quantize(_import(models[model]))
    reference = intq.compile(int_graph, target="reference")
    feeds = _samples(SHAPES[name], 3, seed=11)
    for target in ("onnxruntime", "tvm"):
        if target not in TARGETS:
            continue
        compiled = intq.compile(int_graph, target=target)
        for x in feeds:
            np.testing.assert_array_equal(
                compiled.run({"x": x})["y"], reference.run({"x": x})["y"], err_msg=target
            )


def test_convert_takes_a_qdq_file_without_calibration_data(models):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QdqApproximationWarning)
        exe = intq.convert(models["cnn-u8"], target="onnxruntime")
    x = _samples(SHAPES["cnn"], 1, seed=3)[0]
    assert exe.run({"x": x})["y"].shape == (1, 10)


def _cli(*args: str) -> tuple[int, str]:
    from intq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(args))
    return code, err.getvalue()


def test_the_command_line_compiles_a_qdq_model_without_calib(models, tmp_path):
    out = tmp_path / "cnn_int8.onnx"
    code, err = _cli("compile", str(models["cnn-s8s8"]), "-o", str(out), "--quiet")
    assert code == 0, err
    assert intq.load(out).run({"x": _samples(SHAPES["cnn"], 1, seed=3)[0]})["y"].shape == (1, 10)
    code, err = _cli("compile", str(models["cnn"]), "-o", str(tmp_path / "f.onnx"), "--quiet")
    assert code == 1 and "needs --calib" in err
    assert not (tmp_path / "f.onnx").exists()


# ----- calibration data with a QDQ model ---------------------------------------------------


def test_calibration_data_does_not_change_the_values_the_model_quantizes(models):
    graph = _import(models["cnn-s8s8"])
    data = [{"x": x * 3} for x in _samples(SHAPES["cnn"], 4, seed=5)]  # a wider range
    without = intq.ir.to_text(intq.quantize(graph))
    assert intq.ir.to_text(intq.quantize(graph, data)) == without


def test_calibration_fills_the_values_the_model_left_in_float(models, tmp_path):
    partial = tmp_path / "partial.onnx"
    quantize_static(
        models["cnn"],
        partial,
        _Reader(_samples(SHAPES["cnn"], 4, 0)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        nodes_to_exclude=["/GlobalAveragePool"],
        **MODES["s8s8"],
    )
    graph = intq.from_onnx(partial)
    with pytest.raises(intq.IntqError, match="does not quantize it") as err:
        intq.quantize(graph)
    assert err.value.node == "/GlobalAveragePool"
    data = [{"x": x} for x in _samples(SHAPES["cnn"], 4, seed=0)]
    int_graph = intq.quantize(graph, data)
    weights = [n.inputs[1].const for n in int_graph if n.op == "QConv"]
    stored = _initializers(partial)["c1.weight_quantized"]
    np.testing.assert_array_equal(weights[0], stored)


def test_a_float_model_still_needs_calibration_data(models):
    with pytest.raises(intq.IntqError, match="no calibration data"):
        intq.quantize(intq.from_onnx(models["cnn"]))


# ----- models intq refuses ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "block"])
def test_a_dynamically_quantized_model_is_refused_with_one_error(models, tmp_path, name):
    path = tmp_path / f"{name}-dynamic.onnx"
    quantize_dynamic(models[name], path)
    proto = onnx.load(path)
    first = next(n for n in proto.graph.node if n.op_type in DYNAMIC_OPS)
    with pytest.raises(intq.UnsupportedOpError, match="already quantized dynamically") as err:
        intq.from_onnx(path)
    assert err.value.node == first.name
    assert "QDQ" in err.value.hint and "export the float model" in err.value.hint


def test_a_qoperator_model_is_refused_with_one_error(models, tmp_path):
    path = tmp_path / "cnn-qop.onnx"
    quantize_static(
        models["cnn"],
        path,
        _Reader(_samples(SHAPES["cnn"], 2, 0)),
        quant_format=QuantFormat.QOperator,
    )
    with pytest.raises(intq.UnsupportedOpError, match="in QOperator format") as err:
        intq.from_onnx(path)
    assert err.value.node is not None
    assert "is not supported, in" not in str(err.value)  # not the list of missing ops


def _qdq_model(consumer: str = "DequantizeLinear", scales: int = 1) -> onnx.ModelProto:
    scale = numpy_helper.from_array(
        np.full(scales, 0.1, np.float32).reshape(-1 if scales > 1 else ()), "s"
    )
    zp = numpy_helper.from_array(np.zeros(scales, np.int8).reshape(-1 if scales > 1 else ()), "z")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="quant", axis=1)]
    if consumer == "DequantizeLinear":
        nodes.append(
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq", axis=1)
        )
    else:
        nodes.append(helper.make_node(consumer, ["q"], ["y"], name="reader", to=TensorProto.FLOAT))
    return make_model(nodes, [f32("x", [1, 2])], [f32("y", [1, 2])], [scale, zp])


def test_an_integer_output_of_quantizelinear_read_by_another_op_is_refused():
    with pytest.raises(
        intq.UnsupportedOpError, match="reads the integer output of QuantizeLinear"
    ) as err:
        intq.from_onnx(_qdq_model("Cast"))
    assert err.value.node == "reader"


def test_per_channel_activation_quantization_is_refused():
    with pytest.raises(intq.UnsupportedOpError, match="per-channel activation") as err:
        intq.from_onnx(_qdq_model(scales=2))
    assert err.value.node == "quant"


# ----- the zero-point rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zero_point", "qmin", "qmax", "exact"),
    [
        (0, -128, 127, QuantParams(8, True, (0.5,))),  # int8, symmetric
        (0, 0, 255, QuantParams(8, False, (0.5,))),  # uint8, zero point 0
        (128, 0, 255, QuantParams(8, True, (0.5,))),  # uint8 symmetric: q - 128 is int8
        (0, -32768, 32767, QuantParams(16, True, (0.5,))),  # int16
        (100, 0, 255, None),  # asymmetric uint8
    ],
)
def test_which_zero_points_are_kept_exactly(zero_point, qmin, qmax, exact):
    found = ActivationRange.affine(0.5, zero_point, qmin, qmax)
    assert found.exact == exact
    assert (found.lo, found.hi) == (0.5 * (qmin - zero_point), 0.5 * (qmax - zero_point))


def test_an_inexact_range_takes_the_symmetric_range_covering_it():
    found = ActivationRange.affine(0.5, 100, 0, 255)  # [-50, 77.5]
    assert found.quant(8) == QuantParams(8, True, (77.5 / 127,))
    # Another width than the model's: its range, at that width.
    exact = ActivationRange.affine(0.5, 0, -128, 127)
    assert exact.quant(8) == QuantParams(8, True, (0.5,))
    assert exact.quant(16) == QuantParams(16, True, (64.0 / 32767,))
    assert exact.quant(8, signed=False) == QuantParams(8, False, (63.5 / 255,))


def test_weight_scales_apply_only_where_the_models_integers_fit():
    scales = WeightScales(8, (0.1, 0.2), axis=0)
    np.testing.assert_array_equal(scales.channel_scales((2, 3), 0, 8), [0.1, 0.2])
    assert scales.channel_scales((2, 3), 1, 8) is None  # another channel axis
    assert scales.channel_scales((2, 3), 0, 4) is None  # fewer bits than the model's
    assert WeightScales(8, (0.3,), None).channel_scales((2, 3), 1, 8).tolist() == [0.3] * 3
