"""Golden vectors (intq/vectors.py): written atomically, replayed node by node through the
reference interpreter bit for bit, and from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import intq
from examples import zoo
from intq.semantics.numpy_eval import evaluate
from intq.vectors import FORMAT, MANIFEST, VERSION, is_vector_node, json_attr, read_manifest


@pytest.fixture(scope="module")
def digits(digits_model, tmp_path_factory):
    """The digits CNN quantized, saved as .intq, and one batch of inputs."""
    root = tmp_path_factory.mktemp("vectors")
    x_train, x_test, _, _ = zoo._digits_split()
    graph = intq.from_onnx(digits_model.path)
    batches = [{"input": x_train[i : i + 8]} for i in range(0, 64, 8)]
    quantized = intq.quantize(graph, batches, intq.QuantConfig(progress=False))
    path = intq.compile(quantized, "reference").save(root / "digits.intq")
    inputs = root / "in.npz"
    np.savez(inputs, input=x_test[:8])
    return root, quantized, path, inputs, {"input": x_test[:8]}


def replay(artifact, out_dir) -> list[str]:
    """Check every node of the manifest against the saved graph: its attributes equal the
    manifest's, and the interpreter fed its npz's inputs gives its npz's outputs bit for
    bit. Returns the ops replayed."""
    graph = intq.load(artifact).graph
    manifest = read_manifest(out_dir)
    assert manifest["format"] == FORMAT and manifest["version"] == VERSION
    assert manifest["inputs"] == [v.name for v in graph.inputs]
    assert manifest["outputs"] == [v.name for v in graph.outputs]
    chosen = [i for i, node in enumerate(graph.nodes) if is_vector_node(node)]
    assert [entry["index"] for entry in manifest["nodes"]] == chosen
    files = {p.name for p in out_dir.iterdir()}
    assert files == {MANIFEST} | {entry["file"] for entry in manifest["nodes"]}
    for entry in manifest["nodes"]:
        node = graph.nodes[entry["index"]]
        assert (entry["op"], entry["name"]) == (node.op, node.label())
        assert entry["attrs"] == {k: json_attr(v) for k, v in node.attrs.items()}
        with np.load(out_dir / entry["file"], allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        inputs = []
        for i, (spec, value) in enumerate(zip(entry["inputs"], node.inputs, strict=True)):
            if value is None:
                assert spec == {"key": None, "omitted": True}
                inputs.append(None)
                continue
            array = arrays[f"in{i}"]
            assert spec["key"] == f"in{i}" and spec["value"] == value.name
            assert spec["dtype"] == array.dtype.name and spec["shape"] == list(array.shape)
            assert spec["constant"] == value.is_const
            if value.is_const:
                np.testing.assert_array_equal(array, value.const)
            inputs.append(array)
        outputs = evaluate(node, inputs)
        assert len(outputs) == len(entry["outputs"]) == len(node.outputs)
        for i, (spec, got) in enumerate(zip(entry["outputs"], outputs)):
            want = arrays[f"out{i}"]
            assert spec["key"] == f"out{i}" and spec["dtype"] == want.dtype.name
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), f"{node.label()} out{i} differs"
            quant = node.outputs[i].type.quant
            if quant is not None:
                assert spec["quant"]["scale"] == list(quant.scale)
                assert spec["quant"]["bits"] == quant.bits
    return [entry["op"] for entry in manifest["nodes"]]


def test_digits_vectors_replay_bit_for_bit(digits, tmp_path):
    _, _, artifact, _, feeds = digits
    exe = intq.load(artifact)
    out = exe.golden_vectors(feeds, tmp_path / "vectors")
    ops = replay(artifact, out)
    assert ops[0] == "Quantize" and ops[-1] == "Dequantize"
    assert {"QConv", "QGemm"} <= set(ops)
    qconv = next(e for e in read_manifest(out)["nodes"] if e["op"] == "QConv")
    weights = qconv["inputs"][1]
    assert weights["constant"] and weights["quant"]["axis"] == 0 and weights["quant"]["narrow"]
    assert qconv["outputs"][0]["dtype"] == "int32"
    requant = next(e for e in read_manifest(out)["nodes"] if e["op"] == "Requantize")
    assert {"multiplier", "shift"} <= set(requant["attrs"])
    assert all(isinstance(m, int) for m in requant["attrs"]["multiplier"])
    # The last node's output is the graph's output, as the executable computes it.
    last = read_manifest(out)["nodes"][-1]
    with np.load(out / last["file"]) as npz:
        np.testing.assert_array_equal(npz["out0"], exe.run(feeds)[last["outputs"][0]["value"]])


def test_compiled_executables_write_the_same_vectors(digits, tmp_path):
    _, quantized, _, _, feeds = digits
    ref = intq.compile(quantized, "reference").golden_vectors(feeds, tmp_path / "ref")
    ort = intq.compile(quantized, "onnxruntime").golden_vectors(feeds, tmp_path / "ort")
    assert (ref / MANIFEST).read_text() == (ort / MANIFEST).read_text()
    for entry in read_manifest(ref)["nodes"]:
        assert (ref / entry["file"]).read_bytes() == (ort / entry["file"]).read_bytes()


def test_loaded_onnx_artifact_refuses_and_points_to_the_intq(digits, tmp_path):
    _, quantized, _, _, feeds = digits
    path = intq.compile(quantized, "onnxruntime").save(tmp_path / "m.onnx")
    with pytest.raises(intq.IntqError, match="not the integer graph") as info:
        intq.load(path).golden_vectors(feeds, tmp_path / "v")
    assert ".intq" in str(info.value)
    assert not (tmp_path / "v").exists()


def test_float_graph_is_refused(digits_model, tmp_path):
    exe = intq.compile(intq.from_onnx(digits_model.path), "reference")
    with pytest.raises(intq.IntqError, match="no integer nodes"):
        exe.golden_vectors(digits_model.inputs, tmp_path / "v")


def test_existing_directory_is_refused_unless_overwrite_and_nothing_half_written(digits, tmp_path):
    _, quantized, _, _, feeds = digits
    exe = intq.compile(quantized, "reference")
    out = tmp_path / "v"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(intq.ArtifactError, match="not empty"):
        exe.golden_vectors(feeds, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    # A failing run (wrong input shape) leaves neither a directory nor a temporary one.
    with pytest.raises(intq.IntqError):
        exe.golden_vectors({"input": np.zeros((1, 1, 8, 8), np.float32)}, tmp_path / "w")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    exe.golden_vectors(feeds, out, overwrite=True)
    assert (out / MANIFEST).is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]
    # An empty directory is filled without overwrite.
    (tmp_path / "empty").mkdir()
    exe.golden_vectors(feeds, tmp_path / "empty")
    assert (tmp_path / "empty" / MANIFEST).is_file()


class _TinyEncoder(nn.Module):
    """One attention-like block: projections, softmax of scores, LayerNorm, GELU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.ff = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8**0.5, dim=-1)
        h = self.norm(x + scores @ self.v(x))
        return self.ff(nn.functional.gelu(h))


def test_transformer_block_vectors_replay(tmp_path):
    x = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "block.onnx"
    torch.onnx.export(
        _TinyEncoder().eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"]
    )
    graph = intq.from_onnx(path)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(4)]
    quantized = intq.quantize(graph, batches, intq.QuantConfig(progress=False))
    artifact = intq.compile(quantized, "reference").save(tmp_path / "block.intq")
    out = intq.load(artifact).golden_vectors(batches[0], tmp_path / "vectors")
    ops = replay(artifact, out)
    assert {"QSoftmax", "QLayerNorm"} <= set(ops)
    softmax = next(e for e in read_manifest(out)["nodes"] if e["op"] == "QSoftmax")
    assert "variant" in softmax["attrs"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "intq.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_vectors_command(digits, tmp_path):
    _, _, artifact, inputs, _ = digits
    out = tmp_path / "vectors"
    done = run_cli("vectors", str(artifact), "--inputs", str(inputs), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stdout
    replay(artifact, out)
    # An existing directory is refused without --force, replaced with it.
    again = run_cli("vectors", str(artifact), "--inputs", str(inputs), "-o", str(out))
    assert again.returncode == 1 and "not empty" in again.stderr and "--force" in again.stderr
    forced = run_cli("vectors", str(artifact), "--inputs", str(inputs), "-o", str(out), "--force")
    assert forced.returncode == 0 and forced.stdout
    quiet = run_cli(
        "vectors", str(artifact), "--inputs", str(inputs), "-o", str(out), "--force", "--quiet"
    )
    assert quiet.returncode == 0 and quiet.stdout == ""
    assert json.loads((out / MANIFEST).read_text())["format"] == FORMAT


def test_vectors_command_bad_inputs_exit_1(digits, tmp_path):
    _, _, artifact, _, _ = digits
    bad = tmp_path / "bad.npz"
    np.savez(bad, wrong=np.zeros((8, 1, 8, 8), np.float32))
    for inputs in (bad, tmp_path / "missing.npz"):
        done = run_cli("vectors", str(artifact), "--inputs", str(inputs), "-o", str(tmp_path / "v"))
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("intq: error:") and "Traceback" not in done.stderr
    assert not (tmp_path / "v").exists()


def test_tvm_executable_writes_the_same_vectors_and_a_loaded_library_refuses(digits, tmp_path):
    _, quantized, _, _, feeds = digits
    exe = intq.compile(quantized, "tvm")
    tvm = exe.golden_vectors(feeds, tmp_path / "tvm")
    ref = intq.compile(quantized, "reference").golden_vectors(feeds, tmp_path / "ref")
    assert (ref / MANIFEST).read_text() == (tvm / MANIFEST).read_text()
    for entry in read_manifest(ref)["nodes"]:
        assert (ref / entry["file"]).read_bytes() == (tvm / entry["file"]).read_bytes()
    # What the vectors promise: the TVM build computes the last node's output bit for bit.
    last = read_manifest(tvm)["nodes"][-1]
    with np.load(tvm / last["file"]) as npz:
        np.testing.assert_array_equal(npz["out0"], exe.run(feeds)[last["outputs"][0]["value"]])
    library = exe.save(tmp_path / "m.so")
    with pytest.raises(intq.IntqError, match="not the integer graph") as info:
        intq.load(library).golden_vectors(feeds, tmp_path / "v")
    assert ".intq" in str(info.value) and not (tmp_path / "v").exists()


def test_attributes_become_json():
    assert json_attr((1, 2)) == [1, 2] and json_attr(("a",)) == ["a"]
    assert json_attr((float("inf"), -float("inf"), float("nan"), 0.5)) == [
        "inf",
        "-inf",
        "nan",
        0.5,
    ]
    assert json_attr(np.int64(3)) == 3 and type(json_attr(np.int64(3))) is int
