"""Symbolic input dimensions (``batch``, ``seq``), as every Hugging Face export has them.

``input_shapes`` / ``--input-shape`` fix them; ``intq.convert`` and ``intq compile`` take
what they leave open from the first calibration batch; one dimension name gets one size.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import IR_VERSION

import intq

QUIET = intq.QuantConfig(progress=False)
VOCAB, HIDDEN = 50, 8


def text_model() -> onnx.ModelProto:
    """Token and token-type embeddings, added, and a linear head: inputs ``input_ids`` and
    ``token_type_ids``, both ``[batch, seq]``."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32), "emb")
    types = numpy_helper.from_array(rng.normal(size=(2, HIDDEN)).astype(np.float32), "types")
    w = numpy_helper.from_array(rng.normal(size=(HIDDEN, 4)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="/embed/Gather"),
        helper.make_node("Gather", ["types", "token_type_ids"], ["t"], name="/types/Gather"),
        helper.make_node("Add", ["h", "t"], ["e"], name="/embed/Add"),
        helper.make_node("MatMul", ["e", "w"], ["y"], name="/head/MatMul"),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])]
    graph = helper.make_graph(nodes, "text", inputs, outputs, [table, types, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = IR_VERSION
    return model


def batches(n: int, batch: int, seq: int, mask_seq: int | None = None) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "input_ids": rng.integers(0, VOCAB, (batch, seq)),
            "token_type_ids": rng.integers(0, 2, (batch, mask_seq or seq)),
        }
        for _ in range(n)
    ]


def test_input_shapes_fix_a_name_for_every_input_that_uses_it():
    graph = intq.from_onnx(text_model(), input_shapes={"input_ids": (2, 16)})
    assert [v.type.shape for v in graph.inputs] == [(2, 16), (2, 16)]
    assert graph.outputs[0].type.shape == (2, 16, 4)


def test_an_open_dimension_names_the_input_the_dim_and_the_option():
    with pytest.raises(intq.ShapeError) as info:
        intq.from_onnx(text_model())
    err = info.value
    assert "'input_ids'" in err.message and "'batch'" in err.message and "'seq'" in err.message
    assert "[batch, seq]" in err.message
    assert err.hint is not None and "input_shapes={'input_ids': (batch, seq)}" in err.hint


def test_fixed_dims_print_as_numbers_named_ones_by_name():
    model = text_model()
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 16
    model.graph.input[1].type.tensor_type.shape.dim[0].Clear()  # neither value nor name
    with pytest.raises(intq.ShapeError, match=r"\[\?, 16\]"):
        intq.from_onnx(model, input_shapes={"input_ids": (1, 5)})  # seq 5 vs the mask's 16
    # With the names fixed, the unnamed dim stays open:
    with pytest.raises(intq.ShapeError, match=r"'token_type_ids'.*\['\?'\].*\[\?, 16\]"):
        intq.from_onnx(model, input_shapes={"input_ids": (1, 16)})


def test_given_shapes_that_disagree_on_a_name_are_refused_naming_both_inputs():
    with pytest.raises(intq.ShapeError, match="'seq'.*'input_ids'.*'token_type_ids'"):
        intq.from_onnx(text_model(), input_shapes={"input_ids": (1, 8), "token_type_ids": (1, 9)})


def test_convert_takes_the_dims_from_the_first_calibration_batch():
    data = batches(4, batch=3, seq=7)
    exe = intq.convert(text_model(), iter(data), target="reference", config=QUIET)
    assert [v.type.shape for v in exe.float_graph.inputs] == [(3, 7), (3, 7)]
    out = exe.run(data[0])["y"]
    assert out.shape == (3, 7, 4)
    want = intq.compile(exe.float_graph, target="reference").run(data[0])["y"]
    assert np.max(np.abs(out - want)) < 0.1 * np.max(np.abs(want))


def test_a_block_of_samples_gives_batches_of_one():
    block = batches(1, batch=6, seq=5)[0]
    exe = intq.convert(text_model(), block, target="reference", config=QUIET)
    assert [v.type.shape for v in exe.float_graph.inputs] == [(1, 5), (1, 5)]


def test_input_shapes_override_the_data():
    data = batches(2, batch=2, seq=6)
    exe = intq.convert(
        text_model(), data, target="reference", config=QUIET, input_shapes={"input_ids": (1, 6)}
    )
    assert [v.type.shape for v in exe.float_graph.inputs] == [(1, 6), (1, 6)]


def test_calibration_data_that_disagrees_on_a_name_is_refused_naming_both_inputs():
    with pytest.raises(intq.ShapeError, match="'seq' is 7 for input 'input_ids' but 5 for"):
        intq.convert(text_model(), batches(2, 1, 7, mask_seq=5), "reference", QUIET)


def test_a_torch_export_with_dynamic_axes(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU()).eval()
    path = tmp_path / "linear.onnx"
    torch.onnx.export(
        module,
        (torch.zeros(2, 6),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch_size"}, "y": {0: "batch_size"}},
        dynamo=False,
    )
    data = [np.random.default_rng(i).normal(size=(5, 6)).astype(np.float32) for i in range(3)]
    exe = intq.convert(path, data, target="reference", config=QUIET)
    assert exe.float_graph.inputs[0].type.shape == (5, 6)
    want = module(torch.from_numpy(data[0])).detach().numpy()
    np.testing.assert_allclose(exe.run({"x": data[0]})["y"], want, atol=0.05)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intq.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_compile_takes_the_dims_from_calib_and_hints_in_cli_terms(tmp_path):
    path = tmp_path / "text.onnx"
    onnx.save(text_model(), path)
    calib = tmp_path / "calib.npz"
    np.savez(
        calib, **{k: np.concatenate([b[k] for b in batches(3, 2, 9)]) for k in batches(1, 1, 1)[0]}
    )
    out = tmp_path / "text.intq"
    done = run_cli(
        "compile",
        str(path),
        "--calib",
        str(calib),
        "--target",
        "reference",
        "-o",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert "input_ids: i64[1,9]" in run_cli("inspect", str(out)).stdout
    done = run_cli("inspect", str(path))
    assert done.returncode == 1
    assert "--input-shape input_ids=batch,seq" in done.stderr and "input_shapes" not in done.stderr
    done = run_cli("inspect", str(path), "--input-shape", "input_ids=2,4")
    assert done.returncode == 0, done.stderr
    assert "token_type_ids: i64[2,4]" in done.stdout
