"""``intq.convert`` / ``intq.load``: calibration data in every form, checked artifacts, config."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import intq
from examples import zoo
from intq.artifacts import FORMAT_VERSION
from intq.config import load_config

QUIET = intq.QuantConfig(progress=False)


@pytest.fixture(scope="module")
def digits_train() -> np.ndarray:
    return zoo._digits_split()[0][:64]


@pytest.fixture(scope="module")
def digits_int(digits_model, digits_train) -> intq.ir.Graph:
    """The digits CNN's integer graph, calibrated on the 64 digits as one array."""
    return intq.convert(digits_model.path, digits_train, target="reference", config=QUIET).int_graph


@pytest.fixture(scope="module")
def digits_tvm(digits_int):
    """``digits_int`` compiled for TVM (this CPU)."""
    return intq.compile(digits_int, target="tvm")


@pytest.fixture(scope="module")
def expected(digits_model, digits_train) -> np.ndarray:
    """The integer model's output calibrated on the 64 digits as one array."""
    exe = intq.convert(digits_model.path, digits_train, target="reference", config=QUIET)
    return exe.run(digits_model.inputs)["logits"]


def test_every_calibration_form_gives_the_same_model(
    digits_model, digits_train, expected, tmp_path
):
    npz = tmp_path / "calib.npz"
    np.savez(npz, input=digits_train, labels=np.zeros(64))  # extra arrays are ignored
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(digits_train), torch.zeros(64)),
        batch_size=16,  # regrouped into the model's batch of 8
    )
    forms = [
        [{"input": digits_train[i : i + 8]} for i in range(0, 64, 8)],
        {"input": digits_train},
        loader,
        npz,
        str(npz),
        (torch.from_numpy(digits_train[i : i + 4]) for i in range(0, 64, 4)),  # one-shot
    ]
    for data in forms:
        exe = intq.convert(digits_model.path, data, target="reference", config=QUIET)
        assert np.array_equal(exe.run(digits_model.inputs)["logits"], expected), type(data)


def test_convert_a_torch_module_and_reload_both_targets(digits_model, digits_train, tmp_path):
    module = zoo.digits_cnn_module()
    for target, name in (("reference", "m.intq"), ("onnxruntime", "m.onnx")):
        example = torch.from_numpy(digits_train[:8])
        exe = intq.convert(module, digits_train, target, QUIET, example_inputs=example)
        assert exe.target == target and exe.input_names == ["x"]
        assert "features.0" in {node.label() for node in exe.int_graph}
        got = exe.run({"x": digits_model.inputs["input"]})["output"]
        with torch.no_grad():
            want = module(torch.from_numpy(digits_model.inputs["input"])).numpy()
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.875
        loaded = intq.load(exe.save(tmp_path / name))
        assert loaded.target == target
        assert np.array_equal(loaded.run({"x": digits_model.inputs["input"]})["output"], got)
    assert loaded.layers[0]["layer"] == "features.0" and loaded.layers[0]["weights"].startswith(
        "s8"
    )
    loader = [torch.from_numpy(digits_train[i : i + 8]) for i in range(0, 64, 8)]
    assert intq.convert(module, loader, "reference", QUIET).input_names == ["x"]
    with pytest.raises(intq.ShapeError, match="example inputs"):
        intq.convert(module, digits_train, "reference", QUIET)


@pytest.mark.parametrize(
    ("data", "match", "hint"),
    [
        (np.zeros((16, 1, 4, 8), np.float32), r"samples of shape \[1, 4, 8\]", r"\[N, 1, 8, 8\]"),
        (np.zeros((16, 1, 8, 8), np.int64), "dtype int64", "astype"),
        (
            [{"image": np.zeros((8, 1, 8, 8), np.float32)}],
            r"unknown input name\(s\) \['image'\]",
            "input: f32",
        ),
        (np.zeros((4, 1, 8, 8), np.float32), "fewer than one batch of 8", "at least 8"),
        (["text"], "not an array", "DataLoader"),
        (42, "not supported", "npz"),
    ],
)
def test_bad_calibration_data_names_the_input_and_the_fix(digits_model, data, match, hint):
    with pytest.raises(intq.ShapeError, match=match) as info:
        intq.convert(digits_model.path, data, target="reference", config=QUIET)
    assert info.value.hint is not None
    assert __import__("re").search(hint, info.value.hint)


def _saved(digits_model, digits_train, tmp_path, target: str, name: str):
    exe = intq.convert(digits_model.path, digits_train, target=target, config=QUIET)
    return exe.save(tmp_path / name)


def test_reference_artifact_header_and_tampering(digits_model, digits_train, tmp_path):
    path = _saved(digits_model, digits_train, tmp_path, "reference", "m.intq")
    data = path.read_bytes()
    assert data.startswith(f"# intq-artifact format={FORMAT_VERSION} target=reference".encode())
    # The header is a comment to the IR parser: the file is still plain textual IR.
    assert intq.ir.from_text(data.decode()).outputs[0].name == "logits"

    flipped = tmp_path / "flipped.intq"
    at = data.index(b"scale=") + 7
    flipped.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    with pytest.raises(intq.ArtifactError, match="does not match its checksum"):
        intq.load(flipped)
    with pytest.raises(intq.ArtifactError, match="does not match its checksum"):
        intq.convert(flipped, digits_train, "reference", QUIET)  # a saved model, as input
    newer = tmp_path / "newer.intq"
    newer.write_bytes(data.replace(b"format=1", b"format=9", 1))
    with pytest.raises(intq.ArtifactError, match="format version 9"):
        intq.load(newer)
    truncated = tmp_path / "truncated.intq"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(intq.ArtifactError, match="checksum"):
        intq.load(truncated)
    bare = tmp_path / "bare.intq"
    bare.write_text(data.decode().split("\n", 1)[1])
    with pytest.raises(intq.ArtifactError, match="no valid intq artifact header"):
        intq.load(bare)


def test_onnx_artifact_metadata_and_tampering(digits_model, digits_train, tmp_path):
    import onnx

    path = _saved(digits_model, digits_train, tmp_path, "onnxruntime", "m.onnx")
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["intq.format"] == str(FORMAT_VERSION) and len(meta["intq.sha256"]) == 64
    # A plain ONNX Runtime session runs the artifact (the metadata is ignored).
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    plain = session.run(None, digits_model.inputs)[0]
    assert np.array_equal(plain, intq.load(path).run(digits_model.inputs)["logits"])

    weights = next(t for t in model.graph.initializer if t.raw_data and len(t.raw_data) > 100)
    raw = bytearray(weights.raw_data)
    raw[10] ^= 1
    weights.raw_data = bytes(raw)
    onnx.save(model, str(tmp_path / "tampered.onnx"))
    with pytest.raises(intq.ArtifactError, match="does not match its checksum"):
        intq.load(tmp_path / "tampered.onnx")
    (tmp_path / "cut.onnx").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(intq.ArtifactError, match="not a valid ONNX file"):
        intq.load(tmp_path / "cut.onnx")
    with pytest.raises(intq.ArtifactError, match="not an intq artifact"):
        intq.load(digits_model.path)  # a float model, not something intq wrote
    with pytest.raises(intq.ArtifactError, match="no artifact at"):
        intq.load(tmp_path / "missing.onnx")


def test_the_demo_names_its_artifacts_so_that_intq_load_reopens_them(
    digits_model, digits_int, tmp_path
):
    """What the demo's closing line promises: its globs match every artifact it saved, and
    ``intq.load`` reopens each (the demo itself takes minutes; its save path is checked here)."""
    from examples import demo

    fp32_path = tmp_path / digits_model.path.name  # the demo saves next to the FP32 model
    targets = ["onnxruntime", "tvm", "reference"]
    saved = {}
    for target in targets:
        exe = intq.compile(digits_int, target=target)
        saved[demo._save(exe, target, fp32_path)] = exe.run(digits_model.inputs)["logits"]
    line = demo.closing_line(tmp_path, targets)
    globs = re.findall(rf"{re.escape(str(tmp_path))}/(\S+?)[,: ]", line)
    assert len(globs) == len(targets), line
    matched = {path for glob in globs for path in tmp_path.glob(glob)}
    assert matched == set(saved), line
    for path, logits in saved.items():
        assert np.array_equal(intq.load(path).run(digits_model.inputs)["logits"], logits), path


def test_the_demo_says_each_models_calibration_and_readable_latencies(tmp_path, capsys):
    """The demo's header and rows (digits on the reference only: the whole demo takes
    minutes); no progress bars when stderr is not a terminal."""
    from examples import demo

    assert demo.CONFIG == intq.QuantConfig()  # the demo shows what the defaults give
    assert demo.calibration_text(intq.QuantConfig(calibration="percentile")) == "percentile 99.99"
    assert [demo.ms_text(ms) for ms in (0.0412, 0.21, 8.43, 0.0004)] == [
        "0.041", "0.21", "8.4", "<0.001",
    ]  # fmt: skip
    assert (
        demo.main(["--models", "digits_cnn", "--targets", "reference", "--out", str(tmp_path)]) == 0
    )
    out, err = capsys.readouterr()
    header, model_line = out.splitlines()[:2]
    assert "percentile" not in header and "minmax" not in header
    assert model_line == "  digits_cnn: calibration auto ..."
    row = next(line for line in out.splitlines() if line.startswith("digits_cnn | reference"))
    fp32_ms = row.split(" | ")[4].strip()
    assert float(fp32_ms) > 0, row  # not "0.0"
    assert err == ""


def test_config_file(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(
        'calibration = "percentile"\npercentile = 99\nweight_bits = 8\nbias_correction = true\n'
        '[kernels]\nsoftmax = "lut"\n[layer_bits."features.0"]\nweights = 4\n'
        '[mixed_precision]\nsize_mb = 2\nsensitivity = "direct"\ncandidates = [4, 8]\n'
    )
    config = load_config(good, weight_bits=None, activation_bits=8)
    assert config.calibration == "percentile" and config.percentile == 99.0
    assert config.bias_correction
    assert config.kernels == {"softmax": "lut"}
    assert config.layer_bits["features.0"] == intq.LayerBits(weights=4, activations=8)
    assert config.mixed_precision == intq.MixedPrecision(
        size_mb=2.0, sensitivity="direct", candidates=(4, 8)
    )
    for text, match, hint in [
        ("weight_bit = 4\n", "unknown config key 'weight_bit'", "weight_bits"),
        ('weight_bits = "8"\n', 'weight_bits: expected an integer, got "8"', "weight_bits = 8"),
        ('calibration = "best"\n', "unknown calibration method 'best'", "auto, minmax"),
        (
            'bias_correction = "yes"\n',
            'bias_correction: expected true, false or "auto"',
            "bias_correction =",
        ),
        ('[layer_bits."a"]\nweight = 4\n', r'\[layer_bits."a"\]: unknown key .weight.', "weights"),
        ("weight_bits = \n", "not valid TOML", None),
        ("[mixed_precision]\nsize = 2\n", r"\[mixed_precision\]: unknown key 'size'", "size_mb"),
        ('[mixed_precision]\nsize_mb = "big"\n', 'size_mb: expected a number, got "big"', "2.5"),
        ("[mixed_precision]\ncandidates = 5\n", "candidates: expected an array of int", "[4, 8]"),
        ('[mixed_precision]\npins = "x"\n', 'pins: expected a table of integers, got "x"', "8"),
        ("[mixed_precision]\ntol = 2.0\n", r"\[mixed_precision\] tol: expected a value betw", None),
        ("x = " + "[" * 10**4 + "]" * 10**4 + "\n", "nest too deeply", None),
        ("[mixed_precision]\npins" + ".a" * 10**4 + " = 4\n", "nests deeper than 4", None),
        ('[kernels]\ngelu = "exact"\n', "unknown gelu variant 'exact'", "poly"),
        ('[kernels]\nsoftmx = "lut"\n', r"\[kernels\]: unknown kernel 'softmx'", "softmax"),
        ("[kernels]\nsoftmax = 3\n", r"\[kernels\] softmax: expected a string", "divfree"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(intq.IntqError, match=match) as info:
            load_config(bad)
        assert str(bad) in str(info.value)
        if hint:
            assert hint in info.value.hint
    bad.write_bytes(b'calibration = "min\xe9max"\n')  # Latin-1, not UTF-8
    with pytest.raises(intq.IntqError, match="bad.toml is not UTF-8 text .byte 18"):
        load_config(bad)


# ----- properties ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_artifacts(digits_model, digits_train, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    int_graph = intq.convert(digits_model.path, digits_train, "reference", QUIET).int_graph
    return {
        "reference": intq.compile(int_graph).save(root / "m.intq").read_bytes(),
        "onnxruntime": intq.compile(int_graph, "onnxruntime").save(root / "m.onnx").read_bytes(),
    }


@settings(max_examples=25)
@given(where=st.floats(0, 1, exclude_max=True), bits=st.integers(1, 255), cut=st.booleans())
def test_any_changed_byte_or_truncation_is_refused(
    saved_artifacts, tmp_path_factory, where, bits, cut
):
    for target, data in saved_artifacts.items():
        at = int(where * len(data))
        changed = data[:at] if cut else data[:at] + bytes([data[at] ^ bits]) + data[at + 1 :]
        path = (
            tmp_path_factory.getbasetemp()
            / f"changed.{'intq' if target == 'reference' else 'onnx'}"
        )
        path.write_bytes(changed)
        with pytest.raises(intq.ArtifactError):
            intq.load(path)


@given(chunks=st.lists(st.integers(1, 20), min_size=1, max_size=12))
def test_calibration_regrouped_into_model_batches_whatever_the_chunking(digits_model, chunks):
    from intq.data import calibration_batches

    inputs = intq.from_onnx(digits_model.path).inputs
    total = sum(chunks)
    samples = np.arange(total * 64, dtype=np.float32).reshape(total, 1, 8, 8)
    starts = np.cumsum([0, *chunks])
    items = [{"input": samples[a:b]} for a, b in itertools.pairwise(starts)]
    if total < 8:
        with pytest.raises(intq.ShapeError, match="fewer than one batch"):
            list(calibration_batches(items, inputs))
        return
    batches = list(calibration_batches(items, inputs))
    assert len(batches) == total // 8
    for i, batch in enumerate(batches):
        assert np.array_equal(batch["input"], samples[8 * i : 8 * i + 8])


def test_import_intq_loads_no_heavy_optional_dependency():
    """``import intq`` stays cheap: TVM, PyTorch and transformers load when first used."""
    script = (
        "import sys, intq\n"
        "heavy = {'tvm', 'torch', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, f'import intq imported {sorted(heavy)}'\n"
    )
    root = Path(intq.__file__).parent.parent  # `python -c` imports from its working directory
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert done.returncode == 0, done.stderr


def test_save_refuses_a_name_for_another_kind_of_artifact(digits_int, digits_tvm, tmp_path):
    """Each backend's ``save`` writes only names with its record's suffixes (``intq.load``
    places a file by its suffix when its envelope does not say)."""
    for target, wrong, right in [
        ("reference", "m.onnx", "m.intq"),
        ("onnxruntime", "m.intq", "m.onnx"),
        ("tvm", "m.onnx", "m.so"),
    ]:
        exe = digits_tvm if target == "tvm" else intq.compile(digits_int, target=target)
        with pytest.raises(intq.ArtifactError, match=f"a {target} artifact") as info:
            exe.save(tmp_path / wrong)
        assert info.value.hint == f"save it as {right}"
        loaded = intq.load(exe.save(tmp_path / right))
        if target != "tvm":  # TVM cannot export a library it loaded (its file is the artifact)
            with pytest.raises(intq.ArtifactError, match=f"a {target} artifact"):
                loaded.save(tmp_path / f"again{Path(wrong).suffix}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.intq", "m.onnx", "m.so", "m.so.json"]


def test_saving_and_loading_a_tvm_library_after_running_it_prints_nothing(
    digits_model, digits_tvm, tmp_path, capfd
):
    """TVM logs one "Scope Saving:" / "Scope Loaded:" warning per constant once a VM has run;
    intq filters them out of stderr, and passes on anything else written meanwhile."""
    import os

    from intq.backends.tvm_runtime import without_scope_log

    exe = digits_tvm
    want = exe.run(digits_model.inputs)["logits"]  # running fills TVM's table of scopes
    capfd.readouterr()
    loaded = intq.load(exe.save(tmp_path / "m.so"))
    assert np.array_equal(loaded.run(digits_model.inputs)["logits"], want)
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
    assert without_scope_log(lambda: os.write(2, b"kept\n")) == 5
    assert capfd.readouterr().err == "kept\n"


# ----- the executables' API ----------------------------------------------------------------------


def test_run_takes_a_bare_array_for_a_single_input_model(
    digits_model, digits_int, digits_tvm, tmp_path
):
    x = digits_model.inputs["input"]
    want = intq.compile(digits_int).run({"input": x})["logits"]
    executables = {
        "reference": intq.compile(digits_int),
        "onnxruntime": intq.compile(digits_int, "onnxruntime"),
        "tvm": digits_tvm,
        "loaded onnxruntime": intq.load(
            intq.compile(digits_int, "onnxruntime").save(tmp_path / "m.onnx")
        ),
        "loaded tvm": intq.load(digits_tvm.save(tmp_path / "m.so")),
    }
    for name, exe in executables.items():
        assert np.array_equal(exe.run(x)["logits"], want), name
        assert np.array_equal(exe.run(torch.from_numpy(x))["logits"], want), name
        with pytest.raises(intq.ShapeError, match="must be a dict of input name -> array"):
            exe.run([x])


def test_run_with_one_array_for_several_inputs_names_them():
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"], name="add")],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    exe = intq.compile(intq.from_onnx(model))
    with pytest.raises(intq.ShapeError, match="the model takes 2 inputs: x, y") as info:
        exe.run(np.zeros((2, 3), np.float32))
    assert "x: f32[2,3]" in info.value.hint and "y: f32[2,3]" in info.value.hint


def test_quantize_takes_every_calibration_form_convert_takes(
    digits_model, digits_train, expected, tmp_path
):
    graph = intq.from_onnx(digits_model.path)
    npz = tmp_path / "calib.npz"
    np.savez(npz, input=digits_train)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(digits_train)), batch_size=16
    )
    for data in (digits_train, {"input": digits_train}, npz, loader, iter(list(digits_train))):
        int_graph = intq.quantize(graph, data, QUIET)
        got = intq.compile(int_graph).run(digits_model.inputs)["logits"]
        assert np.array_equal(got, expected), type(data)
    with pytest.raises(intq.ShapeError, match=r"samples of shape \[1, 4, 8\]"):
        intq.quantize(graph, digits_train[:, :, :4], QUIET)


def test_every_executable_has_the_per_layer_table(digits_int, digits_tvm, tmp_path):
    import json

    from intq.inspection import layer_table

    want = layer_table(digits_int)
    assert want and want[0]["weights"].startswith("s8")
    assert intq.compile(digits_int).layers == want
    assert intq.compile(digits_int, "onnxruntime").layers == want
    assert digits_tvm.layers == want
    path = digits_tvm.save(tmp_path / "m.so")
    assert intq.load(path).layers == want  # from the manifest
    manifest = path.with_name("m.so.json")
    old = json.loads(manifest.read_text())
    del old["layers"]  # as an earlier intq wrote it (the manifest holds the library's digest)
    manifest.write_text(json.dumps(old))
    with pytest.raises(intq.ArtifactError, match="holds no per-layer table"):
        _ = intq.load(path).layers
