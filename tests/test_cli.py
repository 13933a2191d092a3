"""The ``intq`` command, run as a user would: in a subprocess."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

import intq


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intq.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_inspect_onnx_and_saved_ir(digits_model, tmp_path):
    done = run_cli("inspect", str(digits_model.path))
    assert done.returncode == 0, done.stderr
    assert "input  input: f32[8,1,8,8]" in done.stdout
    assert "BatchNormalization       1" in done.stdout

    saved = intq.compile(intq.from_onnx(digits_model.path)).save(tmp_path / "digits.intq")
    done = run_cli("inspect", str(saved), "--ir")
    assert done.returncode == 0, done.stderr
    assert "output logits: f32[8,10]" in done.stdout and "return %logits" in done.stdout


def test_input_shape_option(digits_model):
    done = run_cli("inspect", str(digits_model.path), "--input-shape", "input=2,1,8,8")
    assert done.returncode == 0, done.stderr
    assert "output logits: f32[2,10]" in done.stdout


def test_errors_exit_1_with_message(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    done = run_cli("inspect", str(bad))
    assert done.returncode == 1
    assert done.stderr.startswith("intq: error:") and "Traceback" not in done.stderr


def test_usage_errors_exit_2():
    assert run_cli("inspect").returncode == 2
    assert run_cli("inspect", "m.onnx", "--input-shape", "nonsense").returncode == 2
    assert "examples:" in run_cli("--help").stdout


def test_readme_lists_every_supported_onnx_op():
    from pathlib import Path

    from intq.frontends.onnx_ops import supported_ops

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    flat = " ".join(readme.split())
    missing = [entry for entry in supported_ops() if entry not in flat]
    assert not missing, f"README's op list is stale: {missing}"


def test_quantize_command_writes_an_integer_only_graph(digits_model, tmp_path):
    import numpy as np

    from examples import zoo

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:64])
    out = tmp_path / "digits.intq"
    done = run_cli(
        "quantize",
        str(digits_model.path),
        "--calib",
        str(calib),
        "-o",
        str(out),
        "--calibration",
        "percentile",
        "--bias-correction",
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and out.exists()
    inspected = run_cli("inspect", str(out))
    assert "integer-only: yes" in inspected.stdout and "QConv" in inspected.stdout
    # The same result as the Python API on the same batches.
    graph = intq.from_onnx(digits_model.path)
    batches = [{"input": zoo._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    config = intq.QuantConfig(calibration="percentile", bias_correction=True)
    api = intq.quantize(graph, batches, config)
    assert intq.ir.to_text(intq.load(out).graph) == intq.ir.to_text(api)


def test_quantize_command_reports_bad_calibration_archives(digits_model, tmp_path):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, wrong_name=np.zeros((8, 1, 8, 8), np.float32))
    done = run_cli("quantize", str(digits_model.path), "--calib", str(calib), "-o", "x.intq")
    assert done.returncode == 1 and "array named 'wrong_name'" in done.stderr


def test_compile_command_writes_a_plain_onnx_model(digits_model, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from examples import zoo

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=zoo._digits_split()[0][:64])
    out = tmp_path / "digits_int8.onnx"
    done = run_cli(
        "compile",
        str(digits_model.path),
        "--calib",
        str(calib),
        "--target",
        "onnxruntime",
        "-o",
        str(out),
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o044  # readable by others, as any written file
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, digits_model.inputs)
    graph = intq.from_onnx(digits_model.path)
    batches = [{"input": zoo._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    want = intq.compile(intq.quantize(graph, batches)).run(digits_model.inputs)["logits"]
    np.testing.assert_array_equal(logits, want)


# ----- the whole job through the command line -------------------------------------------


def _npz(path, **arrays):
    import numpy as np

    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def digits_files(digits_model, tmp_path_factory):
    from examples import zoo

    root = tmp_path_factory.mktemp("cli")
    x_train, x_test, _, _ = zoo._digits_split()
    calib = _npz(root / "calib.npz", input=x_train[:64])
    inputs = _npz(root / "in.npz", input=x_test[:8])
    config = root / "cfg.toml"
    config.write_text('calibration = "percentile"\npercentile = 99.9\n')
    return root, calib, inputs, config


@pytest.mark.parametrize(("target", "suffix"), [("onnxruntime", ".onnx"), ("reference", ".intq")])
def test_compile_run_inspect_bench_report_end_to_end(digits_model, digits_files, target, suffix):
    import numpy as np

    from intq.config import load_config

    root, calib, inputs, config = digits_files
    artifact = root / f"digits{suffix}"
    done = run_cli(
        "compile", str(digits_model.path), "--calib", str(calib), "--config", str(config),
        "--target", target, "-o", str(artifact), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and artifact.is_file()

    out = root / f"out_{target}.npz"
    done = run_cli("run", str(artifact), "--inputs", str(inputs), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "output logits: float32[8, 10]" in done.stdout
    # The same as the Python API, bit for bit.
    exe = intq.convert(digits_model.path, calib, target=target, config=load_config(config))
    with np.load(out) as got, np.load(inputs) as x:
        assert np.array_equal(got["logits"], exe.run({"input": x["input"]})["logits"])
        assert np.array_equal(
            got["logits"], intq.load(artifact).run({"input": x["input"]})["logits"]
        )

    done = run_cli("inspect", str(artifact))
    assert done.returncode == 0, done.stderr
    assert "integer-only: yes" in done.stdout
    assert "/features/features.0/Conv" in done.stdout and "s8 @" in done.stdout

    done = run_cli("bench", str(artifact), "--fp32", str(digits_model.path), "--repeat", "5")
    assert done.returncode == 0, done.stderr
    assert "p50" in done.stdout and "p99" in done.stdout and "vs FP32 (p50)" in done.stdout
    done = run_cli("bench", str(artifact), "--repeat", "2", "--profile", "--top", "1")
    if target == "onnxruntime":  # its slowest node, named after the graph node it computes
        assert done.returncode == 0, done.stderr
        (row,) = re.findall(r"^(/\S+)/(\w+) +1 +[\d.]+ +[\d.]+% +(\S+)$", done.stdout, re.M)
        assert row[0] == row[2], row  # the ONNX node "<graph node>/<op type>", and its node
    else:
        assert done.returncode == 1 and "--profile times the kernels of TVM" in done.stderr

    if target == "onnxruntime":  # the report does not depend on the target: run it once
        png = root / "report.png"
        done = run_cli(
            "report", str(digits_model.path), "--calib", str(calib), "--config", str(config),
            "-o", str(png), "--quiet",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert png.read_bytes().startswith(b"\x89PNG")
        values = [float(line.split()[-1]) for line in done.stdout.splitlines()[3:]]
        assert len(values) >= 6 and values == sorted(values)  # worst first
        assert done.stdout.splitlines()[1].split()[2] == "clip"
        assert "p99.9" in done.stdout  # the config's clipping rule, per layer
        assert "/classifier/classifier.1/Gemm" in done.stdout


def _unsupported_model(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="act"),
         helper.make_node("Cos", ["r"], ["y"], name="block/cosine")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _error_cases(root, model, calib, inputs):
    import numpy as np

    artifact = root / "good.onnx"
    assert (
        run_cli(
            "compile", str(model), "--calib", str(calib), "-o", str(artifact), "--quiet"
        ).returncode
        == 0
    )
    tampered = root / "tampered.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    x = np.load(calib)["input"]
    config = root / "typo.toml"
    config.write_text("weight_bit = 4\n")
    return {
        "missing model": (["compile", str(root / "nope.onnx"), "--calib", str(calib)],
                          "no model file", None),
        "missing calibration": (["compile", str(model), "--calib", str(root / "nope.npz")],
                                "no calibration file", "check the path"),
        "calibration shape": (["compile", str(model), "--calib",
                               str(_npz(root / "shape.npz", input=x[:, :, :4]))],
                              "samples of shape [1, 4, 8]", "[N, 1, 8, 8]"),
        "calibration name": (["compile", str(model), "--calib",
                              str(_npz(root / "name.npz", images=x))],
                             "array named 'images'", "input=array"),
        "calibration dtype": (["compile", str(model), "--calib",
                               str(_npz(root / "dtype.npz", input=x.astype(np.int64)))],
                              "dtype int64", "astype"),
        "unknown config key": (["compile", str(model), "--calib", str(calib), "--config",
                                str(config)], "unknown config key 'weight_bit'", "weight_bits"),
        "unsupported op": (["compile", str(_unsupported_model(root / "cos.onnx")), "--calib",
                            str(_npz(root / "x.npz", x=np.ones((8, 4), np.float32)))],
                           "node 'block/cosine': Cos (opset 17) is not supported", "Relu"),
        "tampered artifact": (["run", str(tampered), "--inputs", str(inputs)], "", "recompile"),
        "missing run input": (["run", str(artifact), "--inputs", str(root / "nope.npz")],
                              "no inputs file", "check the path"),
        "wrong run input": (["run", str(artifact), "--inputs", str(calib)],
                            "input 'input' has shape [64, 1, 8, 8]", None),
    }  # fmt: skip


SUBPROCESS_CASES = ("missing model", "calibration shape", "unknown config key", "unsupported op")
"""Run as a user would; the other error cases call ``intq.cli.main`` in-process (the same
parser and handler, without paying an interpreter start each)."""


def _in_process(*args: str) -> subprocess.CompletedProcess[str]:
    import contextlib
    import io

    from intq.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_error_paths_exit_1_with_one_paragraph_and_leave_no_file(digits_model, digits_files):
    root, calib, inputs, _ = digits_files
    for case, (args, message, hint) in _error_cases(root, digits_model.path, calib, inputs).items():
        suffix = ".onnx" if args[0] == "compile" else ".npz"  # -o names what it writes
        out = root / "errors" / f"{case.replace(' ', '_')}{suffix}"
        out.parent.mkdir(exist_ok=True)
        call = run_cli if case in SUBPROCESS_CASES else _in_process
        done = call(*args, "-o", str(out))
        assert done.returncode == 1, (case, done.stderr)
        assert done.stderr.startswith("intq: error:"), (case, done.stderr)
        assert message in done.stderr, (case, done.stderr)
        if hint:
            assert "hint:" in done.stderr and hint in done.stderr, (case, done.stderr)
        assert "Traceback" not in done.stderr and "\n\n" not in done.stderr.strip(), case
        assert list(out.parent.iterdir()) == [], (case, list(out.parent.iterdir()))


# ----- TVM artifacts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_so(digits_model, digits_files):
    """The digits CNN compiled for TVM (this CPU) by ``intq compile -o digits_int8.so``: the
    suffix picks the target."""
    root, calib, _, _ = digits_files
    out = root / "digits_int8.so"
    done = _in_process("compile", str(digits_model.path), "--calib", str(calib), "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_the_output_suffix_picks_the_target_and_a_mismatch_is_refused(
    digits_model, digits_files, digits_so
):
    root, calib, _, _ = digits_files
    assert intq.load(digits_so).target == "tvm" and (root / "digits_int8.so.json").is_file()
    compile_ = ["compile", str(digits_model.path), "--calib", str(calib), "--quiet"]
    out = root / "by_suffix.intq"
    assert _in_process(*compile_, "-o", str(out)).returncode == 0
    assert intq.load(out).target == "reference"

    refused = root / "refused"
    refused.mkdir()
    for args, message, hint in [
        (["--target", "tvm", "-o", "x.onnx"], "--target tvm writes a shared object",
         ["x.so", "drop --target tvm: .onnx means onnxruntime"]),
        (["--target", "onnxruntime", "-o", "x.intq"], "named .onnx", ["x.onnx"]),
        (["-o", "x.out"], "cannot tell the target", [".so/.tar tvm", "--target"]),
    ]:  # fmt: skip
        args[-1] = str(refused / args[-1])
        done = _in_process(*compile_, *args)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("intq: error: -o ") and message in done.stderr, done.stderr
        assert all(h in done.stderr.split("hint:")[1] for h in hint), done.stderr
    done = _in_process("quantize", str(digits_model.path), "--calib", str(calib), "-o",
                       str(refused / "x.onnx"))  # fmt: skip
    assert done.returncode == 1 and "intq quantize writes a .intq graph" in done.stderr
    assert list(refused.iterdir()) == []  # refused before any work: nothing written


def test_bench_a_tvm_library_without_inputs_feeds_random_ones(digits_so):
    done = _in_process("bench", str(digits_so), "--repeat", "2", "--warmup", "0")
    assert done.returncode == 0, done.stderr
    assert f"{digits_so} (tvm)" in done.stdout and "p50" in done.stdout


def test_inspect_a_tvm_library_reads_its_manifest(digits_so):
    done = _in_process("inspect", str(digits_so))
    assert done.returncode == 0, done.stderr
    assert f"{digits_so}: intq TVM artifact (a shared object), target {{" in done.stdout
    assert "input  input: float32[8,1,8,8], quantized to u8 @ 0.00392" in done.stdout
    assert "output logits: float32[8,10], dequantized from s32 @ " in done.stdout
    assert "per-layer bits @ scales:" in done.stdout and "/features/features.0/Conv" in done.stdout
    done = _in_process("inspect", str(digits_so), "--ir")
    assert done.returncode == 1 and "holds compiled code, not the IR graph" in done.stderr


def test_inspect_a_damaged_intq_artifact_says_checksum(digits_model, tmp_path):
    saved = intq.compile(intq.from_onnx(digits_model.path)).save(tmp_path / "digits.intq")
    data = saved.read_bytes()
    cut = tmp_path / "cut.intq"
    cut.write_bytes(data[: len(data) // 2])
    done = _in_process("inspect", str(cut))
    assert done.returncode == 1 and "does not match its checksum" in done.stderr, done.stderr


# ----- messages and help ----------------------------------------------------------------------


def test_hints_name_the_flag_not_the_python_keyword(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="act")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "symbolic.onnx"
    onnx.save(model, str(path))
    with pytest.raises(intq.ShapeError) as info:  # the API's hint names its keyword...
        intq.from_onnx(path)
    assert "input_shapes=" in info.value.hint
    done = _in_process("inspect", str(path))  # ...the command line's, the flag
    assert done.returncode == 1 and "input 'x' has symbolic dimensions" in done.stderr
    assert "hint: pass the shape you will run: --input-shape x=batch,4" in done.stderr, done.stderr
    assert "input_shapes" not in done.stderr
    assert _in_process("inspect", str(path), "--input-shape", "x=2,4").returncode == 0


@pytest.mark.parametrize(
    ("hint", "cli"),
    [
        ("tune first: tune_trials=N (--tune-trials N) creates it", "tune first: --tune-trials N"),
        ("or tune_trials=0 to only read it", "or --tune-trials 0 to only"),
        ("drop tune_trials/tuning_db (--tune-trials/--tuning-db) for", "drop --tune-trials/--tun"),
        ("a fixed shape with input_shapes=..., so", "with --input-shape NAME=D1,D2,..., so"),
        ("convert the model with input_shapes= set to", "with --input-shape NAME=D1,D2,... set"),
    ],
)
def test_every_python_keyword_form_in_hints_maps_to_its_flag(hint, cli):
    from intq.cli import API_FLAGS, cli_hint, error_text

    assert cli in cli_hint(hint) and not any(k in cli_hint(hint) for k in API_FLAGS)
    err = intq.IntqError("message", node="n", hint=hint)
    assert error_text(err) == f"node 'n': message\n  hint: {cli_hint(hint)}"


def test_help_texts_every_argument_the_default_target_and_line_breaks():
    from intq.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, (name, action.option_strings or action.dest)
        assert "--quiet" in command._option_string_actions, name  # as the README says
    text = commands.choices["compile"].format_help()
    assert "(default: the target of OUT's suffix" in " ".join(text.split())
    # Shell continuations in the examples keep their line breaks.
    assert "-o model_arm.tar \\\n      --tvm-target" in text


def test_inspect_and_bench_accept_quiet(digits_so, tmp_path):
    done = _in_process("inspect", str(digits_so), "--quiet")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    cut = tmp_path / "cut.so"
    cut.write_bytes(digits_so.read_bytes()[:1000])
    (tmp_path / "cut.so.json").write_bytes(
        digits_so.with_name(digits_so.name + ".json").read_bytes()
    )
    done = _in_process("inspect", str(cut), "--quiet")
    assert done.returncode == 1 and "checksum" in done.stderr and done.stdout == ""
    done = _in_process("bench", str(digits_so), "--repeat", "1", "--warmup", "0", "--quiet")
    assert done.returncode == 0 and "p50" in done.stdout, done.stderr
