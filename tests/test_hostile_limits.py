"""Regression tests for the limits the hostile-input run found missing: zero-size inputs,
graph-size linearity, integers of thousands of digits, the per-tensor limit at run time on
every backend, and calibration / input archives checked before they are read."""

from __future__ import annotations

import io
import random
import time
import tracemalloc
import zipfile

import hostile_limits as hl
import numpy as np
import onnx
import pytest

import intq
from intq import limits
from intq.cli import main
from intq.data import npz_members, read_npz
from intq.ir import from_text, to_text, verify

SMALL = 64 << 20
"""Peak traced allocation allowed while refusing an archive or a graph."""


def _traced(action):
    """Run ``action`` under tracemalloc; returns (its error or None, peak bytes)."""
    tracemalloc.start()
    try:
        try:
            action()
            error = None
        except intq.IntqError as err:
            error = err
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return error, peak


# ----- zero-size dimensions (these hung: a batch of 0 samples never fills) --------------------


def test_a_declared_zero_batch_is_refused_before_calibration():
    model = hl._conv_model([0, 1, 4, 4])
    with pytest.raises(intq.ShapeError, match=r"input 'x' has shape \[0, 1, 4, 4\].*zero-size"):
        intq.convert(model, np.zeros((0, 1, 4, 4), np.float32), target="reference")


def test_zero_input_shapes_are_refused_naming_the_option():
    model = hl._conv_model(["N", 1, "H", "W"])
    data = np.ones((2, 1, 4, 4), np.float32)
    with pytest.raises(intq.ShapeError, match="input_shapes gives input 'x'.*at least 1") as info:
        intq.convert(model, data, target="reference", input_shapes={"x": (1, 1, 0, 4)})
    assert "input_shapes={'x': (1, 1, 1, 4)}" in info.value.hint


def test_calibration_data_with_a_zero_size_dimension_is_refused():
    model = hl._conv_model(["N", 1, "H", "W"])
    with pytest.raises(intq.ShapeError, match="first calibration batch.*at least 1"):
        intq.convert(model, [{"x": np.zeros((2, 1, 0, 4), np.float32)}], target="reference")


def test_quantizing_ir_text_with_a_zero_size_input_is_refused():
    graph = from_text("graph g(%x: f32[0,3]) {\n  %y = Relu(%x) : f32[0,3]\n  return %y\n}")
    with pytest.raises(intq.ShapeError, match="input 'x' has type f32\\[0,3\\].*zero-size"):
        intq.quantize(graph, [{"x": np.zeros((0, 3), np.float32)}])


@pytest.mark.parametrize("dims", ["0,1,4,4", "1,-1,4,4", "1," + "9" * 5000 + ",4,4"])
def test_cli_input_shape_is_refused_as_usage(tmp_path, capsys, dims):
    onnx.save(hl._conv_model(["N", 1, 4, 4]), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.ones((2, 1, 4, 4), np.float32))
    argv = ["compile", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npz")]
    argv += ["--input-shape", f"x={dims}", "-o", str(tmp_path / "o.intq")]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "--input-shape" in capsys.readouterr().err
    assert not (tmp_path / "o.intq").exists()


# ----- graph size: linear import, parse and verify ----------------------------------------------


def _wide_seconds(n: int, sources: int) -> float:
    model = hl._fan_model(n, sources, 0)
    start = time.perf_counter()
    graph = intq.from_onnx(model)
    verify(from_text(to_text(graph)))
    return time.perf_counter() - start


@pytest.mark.parametrize("sources", [1, 2400], ids=["fan-out", "distinct"])
def test_import_and_parse_are_linear_in_graph_size(sources):
    # 4x the inputs must take well under 16x the time (quadratic): 8x leaves room for a busy
    # machine; the first, small run also warms up every import.
    _wide_seconds(200, min(sources, 200))
    small = min(_wide_seconds(600, min(sources, 600)) for _ in range(2))
    large = _wide_seconds(2400, sources)
    assert large < 8 * small + 0.5, f"600 inputs: {small:.2f} s, 2400 inputs: {large:.2f} s"


def test_the_verifier_checks_uses_in_constant_time():
    graph = intq.from_onnx(hl._fan_model(20_000, 1, 0))
    start = time.perf_counter()
    verify(graph)
    assert time.perf_counter() - start < 5.0  # was 4e8 tuple entries (minutes)


# ----- integers of thousands of digits --------------------------------------------------------


@pytest.mark.parametrize("where", ["shape", "attribute", "constant", "quant", "quant_axis"])
def test_long_integers_in_ir_text_are_parse_errors(where, tmp_path):
    with pytest.raises(intq.ParseError, match="an integer of 5000 digits is out of range"):
        hl.long_integer(tmp_path, where, 5000, 0)


@pytest.mark.parametrize("where", ["blanks", "comments"])
def test_a_bad_character_after_a_million_blanks_is_found_at_once(where, tmp_path):
    start = time.perf_counter()
    with pytest.raises(intq.ParseError, match="unexpected character '@'"):
        hl.long_integer(tmp_path, where, 300_000, 0)
    assert time.perf_counter() - start < 5.0  # a search from each blank was quadratic


def test_a_long_format_number_in_a_header_is_a_damaged_header(tmp_path):
    with pytest.raises(intq.ArtifactError, match="header has no end of line in its first"):
        hl.long_integer(tmp_path, "header", 5000, 0)


def test_a_dimension_of_400_digits_in_an_npy_header_is_reported(tmp_path):
    path = tmp_path / "c.npz"
    hl._write_npz(path, {"x": hl._npy_bytes(f"({'7' * 400}, 1)", "<f4", b"")})
    with pytest.raises(intq.ShapeError, match=r"shape \[~10\^\d+, 1\].*limit"):
        npz_members(path)


# ----- the per-tensor limit at run time, on every backend ----------------------------------------


@pytest.mark.parametrize("target", list(intq.backends.TARGETS))
@pytest.mark.parametrize("op", ["Expand", "Pad", "ConstantOfShape"])
def test_a_huge_shape_hidden_behind_a_small_type_is_refused_at_compile(op, target, tmp_path):
    error, peak = _traced(lambda: hl.huge_text(tmp_path, op, [1 << 20, 1 << 20], False, target))
    assert isinstance(error, intq.VerificationError), error
    assert f"the output of {op} (i8) of shape [1048576, 1048576]" in error.message
    assert "intq.limits.MAX_TENSOR_BYTES" in error.hint
    assert peak < SMALL


def test_loading_a_sealed_artifact_hiding_a_huge_shape_is_refused(tmp_path):
    error, peak = _traced(lambda: hl.huge_text(tmp_path, "Expand", [1 << 20] * 2, False, "load"))
    assert isinstance(error, intq.IntqError) and "the output of Expand (i8)" in error.message
    assert peak < SMALL


def test_a_huge_declared_type_is_a_parse_error():
    text = "graph g(%x: i8[1048576,1048576]) {\n  return %x\n}"
    with pytest.raises(intq.ParseError, match=r"line 1: a value \(i8\) of shape.*limit"):
        from_text(text)


def test_quantize_refuses_a_huge_constant_of_shape_before_folding_it(tmp_path):
    error, peak = _traced(lambda: hl.huge_float_text(tmp_path, "ConstantOfShape", [1 << 20] * 2))
    assert isinstance(error, intq.VerificationError) and "ConstantOfShape" in error.message
    assert peak < SMALL


def test_the_reference_interpreter_checks_declared_sizes_before_running(monkeypatch):
    graph = from_text("graph g(%x: f32[64,64]) {\n  %y = Relu(%x) : f32[64,64]\n  return %y\n}")
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 1024)
    from intq.semantics.numpy_eval import run_graph

    with pytest.raises(intq.ShapeError, match=r"output %y of Relu.*limit of 1024"):
        run_graph(graph, {"x": np.ones((64, 64), np.float32)})


def test_raising_the_limit_takes_effect(monkeypatch):
    text = "graph g(%x: f32[2]) {\n  %y = Expand(%x) {shape=[1024, 2]} : f32[1024,2]\n"
    text += "  return %y\n}"
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 4096)
    with pytest.raises(intq.IntqError, match="limit of 4096"):
        from_text(text)
    monkeypatch.setattr(limits, "MAX_TENSOR_BYTES", 1 << 20)
    out = intq.compile(from_text(text)).run({"x": np.ones(2, np.float32)})
    assert out["y"].shape == (1024, 2)


# ----- archives -------------------------------------------------------------------------------


def _archive(tmp_path, kind: str, seed: int = 0):
    path = tmp_path / "data.npz"
    hl._archive(path, kind, random.Random(seed))
    return path


def test_a_header_declaring_10_gb_over_64_bytes_is_refused_before_reading(tmp_path):
    path = _archive(tmp_path, "declared_huge")
    error, peak = _traced(lambda: read_npz(path))
    assert isinstance(error, intq.ShapeError) and "array 'x'" in error.message
    assert str(path) in error.message and "limit" in error.message
    assert peak < SMALL


def test_a_zip_bomb_is_refused_without_inflating_it(tmp_path):
    path = tmp_path / "bomb.npz"
    hl._bomb(path, f"({(10 << 30) // 4},)", 64 << 20)
    assert path.stat().st_size < 1 << 20
    error, peak = _traced(lambda: read_npz(path))
    assert isinstance(error, intq.ShapeError) and "limit" in error.message
    assert peak < SMALL


@pytest.mark.parametrize("deflate", [False, True], ids=["stored", "deflated"])
def test_zip_sizes_claiming_more_than_the_file_can_hold_are_refused(tmp_path, deflate):
    # 2 GiB declared consistently by the .npy header and the zip directory (under the size
    # limit), over 64 bytes of data: nothing of that size may be allocated.
    path = tmp_path / "forged.npz"
    hl._forged(path, 1 << 29, deflate)
    error, peak = _traced(lambda: read_npz(path))
    assert isinstance(error, intq.ArtifactError)
    assert "claims 2147483776 bytes" in error.message and "corrupt" in error.message
    assert peak < SMALL


def test_a_member_inflating_to_more_than_its_header_declares_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    hl._bomb(path, "(4, 1, 4, 4)", 32 << 20)
    error, peak = _traced(lambda: read_npz(path))
    assert isinstance(error, intq.ArtifactError)
    assert (
        "declares shape [4, 1, 4, 4]" in error.message and "truncated or corrupt" in error.message
    )
    assert peak < SMALL


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("declared_more", "holds .* bytes of data"),
        ("declared_less", "holds .* bytes of data"),
        ("not_zip", "not an .npz archive"),
        ("npy", r"an \.npy file \(one array\)"),
        ("object", "dtype object.*no objects or pickles"),
        ("negative", "cannot read it|negative"),
        ("duplicate", "stored twice"),
        ("foreign_member", "is not an .npy array"),
        ("encrypted_flag", "encrypted"),
        ("version", "format version"),
    ],
)
def test_malformed_archives_are_refused_naming_file_and_member(tmp_path, kind, message):
    path = _archive(tmp_path, kind)
    with pytest.raises(intq.ArtifactError, match=message) as info:
        read_npz(path, "inputs")
    assert str(path) in info.value.message and info.value.message.startswith("inputs ")


@pytest.mark.parametrize("descr", ["<c8", "<U4", "|S4", "|V4", "<M8[s]", "|O"])
def test_odd_dtypes_are_refused(tmp_path, descr):
    path = tmp_path / "odd.npz"
    hl._write_npz(path, {"x": hl._npy_bytes("(4,)", descr, bytes(64))})
    with pytest.raises(intq.ArtifactError, match="intq reads bool, integer and float arrays"):
        read_npz(path)


@pytest.mark.parametrize("seed", range(8))
def test_truncated_archives_are_refused(tmp_path, seed):
    path = _archive(tmp_path, "truncated", seed)
    with pytest.raises(intq.ArtifactError, match=str(path)):
        read_npz(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_valid_archives_read_exactly(tmp_path, compressed):
    arrays = {
        "x": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        "f": np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)),
        "b": np.array([True, False]),
        "e": np.zeros((0, 3), np.int8),
    }
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    path = tmp_path / "ok.npz"
    path.write_bytes(buffer.getvalue())
    got = read_npz(path)
    assert set(got) == set(arrays)
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
        assert got[name].flags.writeable
    assert {k: m.shape for k, m in npz_members(path).items()} == {
        k: a.shape for k, a in arrays.items()
    }


@pytest.mark.parametrize("kind", ["declared_huge", "npy", "object", "truncated", "not_zip"])
def test_the_cli_refuses_bad_inputs_with_exit_1(tmp_path, capsys, kind):
    model = tmp_path / "m.intq"
    data = [{"x": np.ones((4, 1, 4, 4), np.float32)}]
    intq.convert(hl._conv_model([4, 1, 4, 4]), data, "reference").save(model)
    path = _archive(tmp_path, kind)
    code = main(["run", str(model), "--inputs", str(path), "-o", str(tmp_path / "o.npz")])
    err = capsys.readouterr().err
    assert code == 1 and f"inputs {path}" in err and "internal error" not in err
    assert not (tmp_path / "o.npz").exists()


def test_a_member_listed_with_a_wrong_crc_is_refused(tmp_path):
    path = tmp_path / "crc.npz"
    np.savez(path, x=np.ones((4, 1, 4, 4), np.float32))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    data[info.header_offset + 30 + len("x.npy") + 200] ^= 0xFF  # a byte of the array's data
    path.write_bytes(bytes(data))
    with pytest.raises(intq.ArtifactError, match="BadZipFile.*CRC"):
        read_npz(path)


def test_a_header_numpy_cannot_tokenize_is_refused(tmp_path):
    # numpy retries a header it cannot parse as Python 2's, whose tokenizer raises its own error
    path = tmp_path / "bad.npz"
    hl._write_npz(path, {"x": hl._npy_bytes("(4,6{, 4, 4)", "<f4", bytes(64))})
    with pytest.raises(intq.ArtifactError, match="cannot read it"):
        read_npz(path)


def test_running_a_wide_fan_out_checks_each_feed_use_once():
    graph = intq.from_onnx(hl._fan_model(20_000, 1, 0))
    exe = intq.compile(graph, target="reference")
    start = time.perf_counter()
    out = exe.run({"x": np.ones((1, 2), np.float32)})
    assert out["y"].shape == (20_000, 2)
    assert time.perf_counter() - start < 5.0  # the feed check copied the input list per use


# ----- lists in IR text: memory bounded by limits, not by the text's length --------------------


def test_a_listed_constant_of_more_than_65536_values_is_refused_before_its_list(tmp_path):
    error, peak = _traced(lambda: hl.long_list(tmp_path, "constant", 200_000))
    assert isinstance(error, intq.ParseError) and "written as b64 data" in error.message
    assert peak < SMALL


def test_a_rank_above_numpys_is_refused_at_the_65th_dimension(tmp_path):
    with pytest.raises(intq.ParseError, match="more than 64 dimensions"):
        hl.long_list(tmp_path, "rank", 100_000)
    with pytest.raises(intq.ShapeError, match="65 dimensions, more than the 64 numpy supports"):
        limits.check_size([1] * 65, 4, "x")


def test_lists_of_any_kind_stop_at_the_item_limit(monkeypatch):
    from intq.ir import parser

    assert parser._MAX_ITEMS == 1 << 20
    monkeypatch.setattr(parser, "_MAX_ITEMS", 1000)  # the real one takes seconds to reach
    items = ", ".join(["1"] * 1001)
    text = f"graph g(%x: f32[1]) {{\n  %y = Reshape(%x) {{shape=[{items}]}} : f32[1]\n"
    with pytest.raises(intq.ParseError, match="a list of more than 1000 items"):
        from_text(text + "  return %y\n}")
