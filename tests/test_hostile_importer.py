"""Regression tests for what the hostile importer cases found (tests/hostile_importer.py):
strict ONNX validation, external-data locations, names ONNX cannot store, rank-0 inputs,
config files read against their schema, and the command line on hostile arguments."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import make_model
from onnx_mutations import set_external

import intq
import intq.cli
import intq.config
from intq.ir import from_text
from intq.mixed_precision import LatencyTable


def _model(*extra_nodes, inputs=None, outputs=None, **conv_attrs) -> onnx.ModelProto:
    """x[1,1,6,6] -> Conv "/conv" (weight w) -> y, with ``extra_nodes`` after it."""
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="/conv", **conv_attrs)
    return make_model(
        [conv, *extra_nodes],
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
        outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )


def _refused(model: onnx.ModelProto, match: str, node: str | None = None) -> None:
    with pytest.raises(intq.ModelImportError, match=match) as info:
        intq.from_onnx(model)
    assert info.value.node == node


# ----- every value defined once ---------------------------------------------------------------


def test_a_value_defined_twice_is_refused_naming_the_node():
    """Were accepted silently (initializer and node output), or called a cycle."""
    relu = helper.make_node("Relu", ["y"], ["w"], name="/relu")
    _refused(_model(relu), "tensor 'w' is an output of this node and also an initializer", "/relu")
    again = helper.make_node("Relu", ["y"], ["x"], name="/again")
    _refused(_model(again), "'x' is an output of this node and also a graph input", "/again")
    twin = helper.make_node("Relu", ["y"], ["y"], name="/twin")
    _refused(
        _model(twin), "'y' is an output of this node and also an output of node '/conv'", "/twin"
    )


def test_a_graph_input_listed_twice_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])
    _refused(_model(inputs=[x, x]), "graph input 'x' is listed twice")


def test_an_initializer_may_also_be_listed_as_an_input():
    """IR version 3 lists initializers among the inputs: still one definition."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 1, 3, 3])
    graph = intq.from_onnx(_model(inputs=[x, w]))
    assert [v.name for v in graph.inputs] == ["x"]


# ----- element types --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["input", "output", "initializer", "cast"])
def test_an_unknown_dtype_enum_is_refused_naming_where(where):
    """Was a ValueError from onnx ("Enum DataType has no name defined for value 99")."""
    model = _model()
    g = model.graph
    if where == "input":
        g.input[0].type.tensor_type.elem_type = 99
        match = "graph input 'x' has element type 99, which no ONNX version defines"
    elif where == "output":
        g.output[0].type.tensor_type.elem_type = 99
        match = "graph output 'y' has element type 99"
    elif where == "initializer":
        g.initializer[0].data_type = 99
        match = "initializer 'w' has element type 99"
    else:
        g.node.append(helper.make_node("Cast", ["y"], ["z"], name="/cast", to=1))
        g.node[-1].attribute[0].i = 99
        g.output[0].name = "z"
        match = "attribute 'to' of Cast has element type 99"
    _refused(model, match, "/cast" if where == "cast" else None)


# ----- attribute values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"auto_pad": "SAME_UPPER", "strides": [0, 0]}, "'strides' of Conv .*: 0 is below 1"),
        ({"group": 0}, "'group' of Conv is out of range: 0 is below 1"),
        ({"kernel_shape": [3, -3]}, "'kernel_shape' .*: -3 is below 1"),
        ({"auto_pad": "SAME"}, "'auto_pad' of Conv .*'SAME' is not one of NOTSET"),
        ({"axis": 1}, "Conv has no attribute 'axis'"),
    ],
)
def test_attribute_values_out_of_range_are_refused_naming_the_node(attrs, match):
    """``auto_pad=SAME_UPPER`` with stride 0 was a ZeroDivisionError."""
    _refused(_model(**attrs), match, "/conv")


@pytest.mark.parametrize("strides", [[1], [1, 1, 1]])
def test_window_attributes_need_one_value_per_spatial_axis(strides):
    """Was an IndexError in the SAME padding arithmetic."""
    with pytest.raises(intq.ShapeError, match="gives .* values for 2 spatial axes") as info:
        intq.from_onnx(_model(auto_pad="SAME_LOWER", strides=strides))
    assert info.value.node == "/conv"


def test_a_string_attribute_that_is_not_utf8_is_refused():
    """Was a UnicodeDecodeError in the converter."""
    model = _model(auto_pad="NOTSET")
    model.graph.node[0].attribute[0].s = b"\xffNOTSET"
    _refused(model, "attribute 'auto_pad' is not valid UTF-8 text", "/conv")


def test_a_node_name_that_is_not_utf8_says_which_node(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model().SerializeToString().replace(b"/conv", b"\xffconv"))
    with pytest.raises(intq.ModelImportError, match=r"the name of node 0 \(Conv\) is not valid"):
        intq.from_onnx(path)


# ----- external data --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "match"),
    [
        ("w\x00.bin", "a name with a NUL byte"),
        ("w" * 5000 + ".bin", r"\(5004 characters\), which cannot be resolved: File name too long"),
        ("loop.bin", "which cannot be resolved"),
    ],
)
def test_external_data_locations_that_no_file_can_have(tmp_path, location, match):
    """Were a ValueError (NUL), an OSError (ENAMETOOLONG) and a RuntimeError (the loop)."""
    os.symlink("loop.bin", tmp_path / "loop.bin")
    model = _model()
    set_external(model.graph.initializer[0], location, "0", "72")
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(intq.ModelImportError, match=match) as info:
        intq.from_onnx(path)
    assert "external data of initializer 'w'" in str(info.value)


# ----- names ONNX cannot store ----------------------------------------------------------------


def test_a_lone_surrogate_in_a_name_is_refused():
    """Was a UnicodeEncodeError inside onnx.helper.make_node when compiling for ONNX Runtime."""
    text = 'graph g(%x: f32[2]) {\n  %y = Relu(%x) : f32[2] @"r\\udc80"\n  return %y\n}'
    with pytest.raises(intq.ParseError, match="a lone surrogate is not text"):
        from_text(text)
    graph = from_text(text.replace("\\udc80", "elu"))
    graph.rename(graph.outputs[0], "y\udc80")  # a name from the Python API
    quantized = intq.quantize(graph, [{"x": np.array([0.5, -1.0], np.float32)}])
    with pytest.raises(intq.IntqError, match=r"value name 'y\\udc80\.int' is not text UTF-8"):
        intq.compile(quantized, target="onnxruntime")


# ----- rank-0 inputs --------------------------------------------------------------------------


def _scalar_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Sigmoid", ["x"], ["y"], name="/sigmoid")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )


@pytest.mark.parametrize(
    "calibration",
    [np.linspace(-2, 2, 5, dtype=np.float32), [{"x": np.float32(v)} for v in (-2, 0, 2)]],
    ids=["samples", "batches"],
)
def test_a_model_with_a_rank0_input_converts_and_runs(calibration):
    """Were a TypeError (len() of a 0-d array) and a PassError wrapping numpy's "return
    arrays must be of ArrayType" in the calibration histogram."""
    exe = intq.convert(_scalar_model(), calibration, "onnxruntime")
    got = exe.run({"x": np.float32(1.0)})["y"]
    assert got.shape == () and abs(float(got) - 0.731) < 0.02


# ----- the command line -----------------------------------------------------------------------


def _cli(tmp_path: Path, *argv: str) -> tuple[int, str, str]:
    """``intq ARGV`` in ``tmp_path``, with a UTF-8 stdout that cannot print surrogates."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = intq.cli.main(list(argv))
            except SystemExit as exit:
                code = int(exit.code or 0)
    finally:
        os.chdir(cwd)
    out.flush()
    return code, out.buffer.getvalue().decode("utf-8", "replace"), err.getvalue()  # type: ignore[attr-defined]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A float CNN, its calibration data and inputs, and the scalar model."""
    (tmp_path / "model.onnx").write_bytes(_model().SerializeToString())
    x = np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "in.npz", x=x[:1])
    (tmp_path / "scalar.onnx").write_bytes(_scalar_model().SerializeToString())
    return tmp_path


@pytest.mark.parametrize("flag", ["model", "--calib", "-o"])
def test_a_file_name_too_long_for_any_file_system_is_a_usage_error(files, flag):
    """Was exit 3: an OSError (ENAMETOOLONG) from Path.is_file."""
    argv = ["quantize", "model.onnx", "--calib", "calib.npz", "-o", "out.intq"]
    index = 1 if flag == "model" else argv.index(flag) + 1
    argv[index] = "n" * 300 + Path(argv[index]).suffix
    code, _, err = _cli(files, *argv)
    assert code == 2 and re.search("is 30[45] bytes long; file names take at most 255", err)


def test_a_path_that_is_not_utf8_prints(files):
    """Was exit 3: "wrote <path>" could not print a name decoded with surrogateescape."""
    code, out, err = _cli(
        files, "quantize", "model.onnx", "--calib", "calib.npz", "-o", "\udcff.intq"
    )
    assert code == 0, err
    assert "wrote \\udcff.intq" in out and (files / os.fsdecode(b"\xff.intq")).is_file()


def test_bench_fp32_with_other_input_shapes_is_refused(files):
    """Was exit 3: ONNX Runtime's InvalidArgument on the FP32 model's first run."""
    code, _, err = _cli(files, "compile", "model.onnx", "--calib", "calib.npz", "-o", "m.onnx")
    assert code == 0, err
    other = _model(inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])])
    (files / "other.onnx").write_bytes(other.SerializeToString())
    code, _, err = _cli(files, "bench", "m.onnx", "--repeat", "1", "--fp32", "other.onnx")
    assert code == 1
    assert "--fp32 other.onnx: input 'x' takes tensor(float)[1,1,8,8], the artifact" in err


def test_a_scalar_input_through_compile_run_and_bench(files):
    np.savez(files / "scalar_calib.npz", x=np.linspace(-2, 2, 9, dtype=np.float32))
    np.savez(files / "scalar_in.npz", x=np.float32(0.5))
    argv = ["compile", "scalar.onnx", "--calib", "scalar_calib.npz", "-o", "s.onnx", "--quiet"]
    assert _cli(files, *argv)[0] == 0
    assert _cli(files, "run", "s.onnx", "--inputs", "scalar_in.npz", "-o", "o.npz")[0] == 0
    with np.load(files / "o.npz") as outputs:
        assert outputs["y"].shape == ()
    assert _cli(files, "bench", "s.onnx", "--repeat", "1", "--fp32", "scalar.onnx")[0] == 0


@pytest.mark.parametrize(
    "command", ["compile", "quantize", "run", "vectors", "inspect", "bench", "report"]
)
@pytest.mark.parametrize("path", ["", ".", "missing.onnx", "calib.npz"])
def test_no_subcommand_exits_3_on_a_wrong_file(files, command, path):
    """Every subcommand given a directory, a missing file or a file of the wrong kind where it
    reads its model or artifact: a message, never an internal error."""
    rest = {
        "compile": ["--calib", "calib.npz", "-o", "out.onnx"],
        "quantize": ["--calib", "calib.npz", "-o", "out.intq"],
        "run": ["--inputs", "in.npz", "-o", "out.npz"],
        "vectors": ["--inputs", "in.npz", "-o", "vec"],
        "inspect": [],
        "bench": ["--repeat", "1"],
        "report": ["--calib", "calib.npz", "-o", "r.png"],
    }[command]
    code, _, err = _cli(files, command, path, *rest)
    assert code in (1, 2) and err.strip() and "internal error" not in err, err


def test_window_pads_need_a_begin_and_an_end_per_axis():
    """Was accepted: pads [0, 0] on a 2-d window (ONNX Runtime refuses the model)."""
    with pytest.raises(intq.ShapeError, match=r"pads \[0, 0\] gives 2 values; 2 spatial axes"):
        intq.from_onnx(_model(pads=[0, 0]))


def test_report_titles_a_model_whose_name_is_not_utf8(files):
    """Was exit 3: matplotlib cannot render a name decoded with surrogateescape."""
    (files / "\udcff.onnx").write_bytes((files / "model.onnx").read_bytes())
    argv = ["report", "\udcff.onnx", "--calib", "calib.npz", "-o", "r.png", "--quiet"]
    code, _, err = _cli(files, *argv, "--calibration", "minmax")
    assert code == 0, err
    assert (files / "r.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["m" * 300 + ".onnx", "m\x00.onnx"])
def test_model_and_config_paths_no_file_can_have(tmp_path, name):
    """Were an OSError (File name too long) and a ValueError (embedded null byte)."""
    with pytest.raises(intq.ModelImportError, match="cannot read|no model file at"):
        intq.from_onnx(tmp_path / name)
    with pytest.raises(intq.IntqError, match="cannot read config"):
        intq.config.load_config(tmp_path / name.replace(".onnx", ".toml"))


@pytest.mark.parametrize("timeout", [float("inf"), 1e308, float("nan"), -1.0])
def test_an_rpc_timeout_a_socket_cannot_take_is_refused(timeout):
    """``--rpc-timeout inf`` was exit 3: an OverflowError from socket.settimeout."""
    from intq.backends.tvm_rpc import remote_bench

    with pytest.raises(intq.IntqError, match="RPC timeout must be positive and at most 86400"):
        remote_bench("m.so", "127.0.0.1:1", "k", {}, timeout=timeout)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format": "intq-latency-table", "version": 1, "layers": {}, "batch": "x"}', "batch"),
        (b'{"format": "intq-latency-table", "version": 1, "layers": {}, "repeats": [1]}', "rep"),
        (b'{"format": "intq-latency-table", "version": 1, "layers": {"\xff": {}}}', "UTF-8|utf-8"),
    ],
)
def test_a_malformed_latency_table_is_refused(tmp_path, data, match):
    """Were a RecursionError (deep JSON) and a ValueError/TypeError (counts of other types),
    for --latency-table."""
    path = tmp_path / "latency.json"
    path.write_bytes(data)
    with pytest.raises(intq.ArtifactError, match=match):
        LatencyTable.load(path)
