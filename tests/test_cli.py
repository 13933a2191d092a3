"""The ``intq`` command, run as a user would: in a subprocess."""

from __future__ import annotations

import subprocess
import sys

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

    from intq import examples

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=examples._digits_split()[0][:64])
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
        "--quiet",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and out.exists()
    inspected = run_cli("inspect", str(out))
    assert "integer-only: yes" in inspected.stdout and "QConv" in inspected.stdout
    # The same result as the Python API on the same batches.
    graph = intq.from_onnx(digits_model.path)
    batches = [{"input": examples._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    api = intq.quantize(graph, batches, intq.QuantConfig(calibration="percentile"))
    assert out.read_text() == intq.ir.to_text(api)


def test_quantize_command_reports_bad_calibration_archives(digits_model, tmp_path):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, wrong_name=np.zeros((8, 1, 8, 8), np.float32))
    done = run_cli("quantize", str(digits_model.path), "--calib", str(calib), "-o", "x.intq")
    assert done.returncode == 1 and "no array for input 'input'" in done.stderr


def test_compile_command_writes_a_plain_onnx_model(digits_model, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from intq import examples

    calib = tmp_path / "calib.npz"
    np.savez(calib, input=examples._digits_split()[0][:64])
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
    batches = [{"input": examples._digits_split()[0][i : i + 8]} for i in range(0, 64, 8)]
    want = intq.compile(intq.quantize(graph, batches)).run(digits_model.inputs)["logits"]
    np.testing.assert_array_equal(logits, want)
