"""Regression tests for what the hostile artifact cases (tests/hostile_artifacts.py) found:
schema checks of manifests, headers, metadata and layer tables; saves that fail or are killed
leave nothing behind; signed artifacts refuse swapped libraries before loading them."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
from pathlib import Path

import hostile
import hostile_artifacts as ha
import numpy as np
import onnx
import pytest
from hostile import Case, Outcome

import intq
from intq.backends.base import remove_stale_temporaries
from intq.cli import main
from intq.signing import load_private_key, load_public_key, load_public_keys, write_key_pair


@pytest.fixture(scope="module")
def cache() -> Path:
    """Two tiny models saved by every backend, signed and unsigned (hostile_artifacts)."""
    return ha._cache(1234)


def _cli(*argv) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    return code, err.getvalue()


# ----- one schema for everything read from an artifact ---------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.pop("inputs"), "inputs is missing"),
        (lambda m: m["inputs"][0].update(shape="x"), "inputs[0].shape must be an array"),
        (lambda m: m["inputs"][0].update(dtype="object"), "inputs[0].dtype must be one of"),
        (lambda m: m["outputs"][0].update(quantization={"op": 3}), "outputs[0].quantization"),
        (lambda m: m.update(kernels=[1]), "kernels must be an object"),
        (lambda m: m.update(layers=[[]]), "layers must be null or a per-layer table"),
        (lambda m: m.update(schedules={"k": ["conv"]}), "schedules.k has 1 elements, not 2"),
        (lambda m: m["target"].update(kind=5), "target.kind must be a string"),
        (lambda m: m["inputs"][0].update(shape=[1 << 20] * 3), "would take"),
    ],
)
def test_a_manifest_field_of_the_wrong_type_names_the_file_and_field(
    cache, tmp_path, change, field
):
    path = ha._copy(cache, "A", "tvm", tmp_path)
    manifest = json.loads((tmp_path / "m.so.json").read_text())
    change(manifest)
    (tmp_path / "m.so.json").write_text(json.dumps(manifest))
    with pytest.raises(intq.ArtifactError, match="m.so.json: manifest") as err:
        intq.load(path)
    assert field in str(err.value)
    code, stderr = _cli("inspect", path)  # was: exit 3 with a KeyError or TypeError
    assert code == 1 and field in stderr, stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"\xff\xfe{}", "is not UTF-8 text (byte 0xff at offset 0)"),
        (b"[" * 100_000 + b"]" * 100_000, "nests more than 32 levels"),
        (b'{"format": "intq-tvm", "version": ' + b"1" * 5000 + b"}", "an integer of 5000 digits"),
        (b'{"format": "intq-tvm", "format": "intq-tvm"}', "appears twice"),
        (b'{"version": NaN}', "NaN is not a number JSON allows"),
        (b'{"format": "intq-tvm", "ver', "is not valid JSON"),
    ],
)
def test_a_manifest_that_is_not_json_text_is_refused_before_parsing(cache, tmp_path, text, message):
    path = ha._copy(cache, "A", "tvm", tmp_path)
    (tmp_path / "m.so.json").write_bytes(text)
    with pytest.raises(intq.ArtifactError, match="m.so.json") as err:
        intq.load(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ("format=" + "1" * 5000 + " target=reference sha256={sha}", "no end of line in its"),
        ("format=" + "1" * 900 + " target=reference sha256={sha}", "field format must be"),
        ("format=1 target=reference sha256={sha} extra=1", "unknown field 'extra'"),
        ("format=1 format=1 target=reference sha256={sha}", "the field format appears twice"),
        ("format=1 sha256={sha}", "the field target is missing"),
        ("format=1 target=reference sha256=" + "A" * 64, "field sha256"),
    ],
)
def test_odd_header_fields_are_refused_by_name(cache, tmp_path, fields, message):
    path = ha._copy(cache, "A", "reference", tmp_path)
    data = path.read_bytes()
    path.write_bytes(ha._reseal_text(data[data.index(b"\n") + 1 :], fields))
    with pytest.raises(intq.ArtifactError, match="intq artifact header") as err:
        intq.load(path)
    assert message in str(err.value)
    assert _cli("inspect", path)[0] == 1


@pytest.mark.parametrize("layers", ["[1, 2, 3]", '[{"layer": "a"}]', "{}", "[" * 50_000])
def test_a_resealed_layer_table_of_the_wrong_shape_is_refused(cache, tmp_path, layers):
    path = ha._copy(cache, "A", "onnxruntime", tmp_path)
    model = onnx.load_from_string(path.read_bytes())
    next(p for p in model.metadata_props if p.key == "intq.layers").value = layers
    path.write_bytes(ha._reseal_onnx(model))  # a valid checksum: anyone can compute one
    code, stderr = _cli("inspect", path)  # was: exit 3
    assert code == 1 and "intq.layers" in stderr, stderr
    with pytest.raises(intq.ArtifactError, match="intq.layers"):
        intq.load(path)


@pytest.mark.parametrize("change", ["symbolic", "external", "huge"])
def test_a_resealed_onnx_artifact_with_open_shapes_or_external_data_is_refused(
    cache, tmp_path, change
):
    path = ha._copy(cache, "A", "onnxruntime", tmp_path)
    model = onnx.load_from_string(path.read_bytes())
    if change == "symbolic":
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
        match = "static shapes"  # was: ValueError from int('batch')
    elif change == "huge":
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
        match = "would take"  # was: intq bench allocating 512 TiB of random inputs
    else:
        tensor = model.graph.initializer[0]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="/etc/hostname")
        match = "external file"
    path.write_bytes(ha._reseal_onnx(model))
    with pytest.raises(intq.ArtifactError, match=match):
        intq.load(path)


def test_a_manifest_that_does_not_describe_its_library_fails_as_an_artifact_error(cache, tmp_path):
    path = ha._copy(cache, "A", "tvm", tmp_path)
    manifest = json.loads((tmp_path / "m.so.json").read_text())
    manifest["inputs"][0]["shape"] = [3, 1, 8, 8]
    (tmp_path / "m.so.json").write_text(json.dumps(manifest))
    exe = intq.load(path)
    with pytest.raises(intq.ArtifactError, match="does not take or give the tensors"):
        exe.run({"x": np.zeros((3, 1, 8, 8), np.float32)})


# ----- saves leave nothing behind -------------------------------------------------------------


def _save_under_size_limit(directory: Path, root: str, kind: str, limit: int, sign: bool) -> None:
    """A save under RLIMIT_FSIZE: LLVM's "File too large" for TVM (which ends the process
    that writes the object file), a short write for the others."""
    cache = Path(root)
    exe = ha._executable(cache, kind)
    out = directory / "out"
    out.mkdir()
    ha._copy(cache, "B", kind, out)  # an earlier artifact, which must survive the failure
    before = ha._snapshot(out)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        exe.save(out / ha.NAMES[kind], sign_key=cache / "key.pem" if sign else None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        if ha._snapshot(out) != before:
            raise hostile.LeftBehind(f"the failed save changed {sorted(ha._snapshot(out))}")
        hostile.nothing_left(out, before)


@pytest.mark.parametrize(("kind", "limit"), [("tvm", 1000), ("tvm", 0), ("onnxruntime", 100)])
def test_a_save_over_the_file_size_limit_leaves_nothing_and_the_old_artifact(cache, kind, limit):
    case = Case("files left behind", kind, _save_under_size_limit, (str(cache), kind, limit, True))
    result = hostile.run_case(case)
    assert result.outcome is Outcome.REFUSED, result.detail
    if kind == "tvm":  # was: the process ended by LLVM, its temporary directory left behind
        assert "File too large" in result.detail, result.detail


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = ha._dead_pid()
    stale = [tmp_path / f".m.so.{dead}.abcd1234.tmp", tmp_path / f".m.so.json.{dead}.x_y_z_12.tmp"]
    for path in stale:
        path.write_bytes(b"half")
    (tmp_path / f".m.so.{dead}.dir12345.tmp").mkdir()
    live = tmp_path / f".m.so.{os.getppid()}.abcd1234.tmp"  # a running process's
    other = tmp_path / f".n.so.{dead}.abcd1234.tmp"  # another artifact's
    for path in (live, other, tmp_path / ".m.so.abc.tmp"):
        path.write_bytes(b"keep")
    removed = remove_stale_temporaries(tmp_path / "m.so", [".json"])
    assert sorted(p.name for p in removed) == sorted(
        [*(p.name for p in stale), f".m.so.{dead}.dir12345.tmp"]
    )
    assert live.exists() and other.exists()


def test_a_killed_save_is_cleaned_by_the_next(cache):
    for draw in range(2):
        result = hostile.run_case(
            Case("files left behind", "k", ha._killed_save, (str(cache), draw))
        )
        assert result.outcome is Outcome.OK, result.detail


@pytest.mark.parametrize("name", ["m\0.intq", "m\ud800.intq", "n" * 300 + ".intq"])
def test_a_name_the_file_system_cannot_hold_is_an_artifact_error(cache, tmp_path, name):
    exe = intq.load(cache / "A" / "m.intq")
    with pytest.raises(intq.ArtifactError):
        exe.save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# ----- signed artifacts -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ha.KINDS)
def test_signed_artifacts_load_with_their_key_and_refuse_everything_else(cache, tmp_path, kind):
    path = ha._copy(cache, "A-signed", kind, tmp_path)
    key = cache / "key.pub.pem"
    got = intq.load(path, trusted_keys=[key]).run(ha._inputs(cache))
    hostile.same_bits(got, ha._want(cache, "A"), f"signed {kind}")
    intq.load(path)  # unsigned loads keep working
    with pytest.raises(intq.ArtifactError, match="which is not trusted"):
        intq.load(path, trusted_keys=[cache / "other.pub.pem"])
    for victim in sorted(p for p in tmp_path.iterdir() if p.name != path.name + ".sig"):
        original = victim.read_bytes()
        victim.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(intq.ArtifactError, match=f"{victim.name} was changed after it was"):
            intq.load(path, trusted_keys=key)
        victim.write_bytes(original)
    sig = path.with_name(path.name + ".sig")
    document = json.loads(sig.read_text())
    document["signature"] = ("0" if document["signature"][0] != "0" else "1") + document[
        "signature"
    ][1:]
    sig.write_text(json.dumps(document))
    with pytest.raises(intq.ArtifactError, match="does not verify"):
        intq.load(path, trusted_keys=key)
    sig.unlink()
    with pytest.raises(intq.ArtifactError, match="is not signed"):
        intq.load(path, trusted_keys=key)


def test_an_unsigned_save_removes_the_signature_of_the_signed_one_before(cache, tmp_path):
    exe = intq.load(cache / "A" / "m.intq")
    exe.save(tmp_path / "m.intq", sign_key=cache / "key.pem")
    exe.save(tmp_path / "m.intq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.intq"]


def _swap_in(directory: Path, root: str, signed: bool) -> None:
    cache = Path(root)
    path = ha._copy(cache, "A-signed", "tvm", directory)
    shutil.copy(cache / "mark.so", path)
    manifest = json.loads((directory / "m.so.json").read_text())
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "m.so.json").write_text(json.dumps(manifest))
    os.environ["INTQ_HOSTILE_MARK"] = str(directory / "mark")
    try:
        intq.load(path, trusted_keys=cache / "key.pub.pem" if signed else None)
    finally:
        assert (directory / "mark").exists() == (not signed), "the constructor ran: signed"


@pytest.mark.parametrize("signed", [True, False])
def test_a_swapped_library_is_refused_before_its_constructor_runs_when_signed(cache, signed):
    if not (cache / "mark.so").is_file():
        pytest.skip("no C compiler to build the library with a constructor")
    result = hostile.run_case(Case("trust", "swap", _swap_in, (str(cache), signed)))
    # Unsigned, the checksum was recomputed: TVM loads the library (its constructor runs, as
    # docs/security.md says) and then finds no VM executable in it.
    assert result.outcome is Outcome.REFUSED, result.detail
    assert ("holds no Relax VM executable" in result.detail) == (not signed), result.detail


def test_the_library_loaded_is_the_bytes_checked(cache, tmp_path, monkeypatch):
    import tvm

    path = ha._copy(cache, "A-signed", "tvm", tmp_path)
    loaded = []
    real = tvm.runtime.load_module

    def recording(name):
        loaded.append((name, Path(name).read_bytes()))
        return real(name)

    monkeypatch.setattr(tvm.runtime, "load_module", recording)
    exe = intq.load(path, trusted_keys=cache / "key.pub.pem")
    ((name, data),) = loaded
    assert Path(name) != path and data == path.read_bytes()  # a private copy of the bytes
    path.write_bytes(b"changed after the check")  # cannot reach what runs
    hostile.same_bits(exe.run(ha._inputs(cache)), ha._want(cache, "A"), "loaded copy")


def test_keys_load_from_objects_raw_bytes_and_pem_files(tmp_path):
    from cryptography.hazmat.primitives import serialization

    private, public = write_key_pair(tmp_path / "k.pem")
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    key = load_private_key(private)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "k.raw").write_bytes(raw)
    for form in (public, private, raw, tmp_path / "k.raw", key, key.public_key()):
        assert load_public_key(form).public_bytes_raw() == raw
    with pytest.raises(intq.IntqError, match="trusted_keys is empty"):
        load_public_keys([])
    (tmp_path / "bad.pem").write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n")
    with pytest.raises(intq.IntqError, match="not an Ed25519 public key"):
        load_public_keys(tmp_path / "bad.pem")
    with pytest.raises(intq.IntqError, match="exists"):
        write_key_pair(tmp_path / "k.pem")


def test_cli_signs_with_sign_key_and_checks_trusted_key(tmp_path):
    rng = np.random.default_rng(0)
    model = tmp_path / "m.onnx"
    onnx.save(ha._model(1, 2), model)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 1, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "in.npz", x=rng.standard_normal(ha.SHAPE).astype(np.float32))
    assert _cli("keygen", "-o", tmp_path / "key.pem", "--quiet") == (0, "")
    assert _cli("keygen", "-o", tmp_path / "other.pem", "--quiet") == (0, "")
    out = tmp_path / "m.intq"
    code, err = _cli("compile", model, "--calib", tmp_path / "calib.npz", "-o", out,
                     "--sign-key", tmp_path / "key.pem", "--quiet")  # fmt: skip
    assert code == 0 and (tmp_path / "m.intq.sig").is_file(), err
    run = ["run", out, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "o.npz", "--quiet"]
    assert _cli(*run, "--trusted-key", tmp_path / "key.pub.pem")[0] == 0
    code, err = _cli(*run, "--trusted-key", tmp_path / "other.pub.pem")
    assert code == 1 and "not trusted" in err and "hint: trust the public key" in err, err
    assert "--trusted-key PUB.pem" in err and "trusted_keys" not in err, err  # CLI words
    assert _cli(*run, "--trusted-key", tmp_path / "other.pub.pem",
                "--trusted-key", tmp_path / "key.pub.pem")[0] == 0  # fmt: skip
    code, err = _cli("inspect", out, "--trusted-key", tmp_path / "other.pub.pem")
    assert code == 1 and "not trusted" in err, err
    (tmp_path / "m.intq.sig").unlink()
    code, err = _cli(*run, "--trusted-key", tmp_path / "key.pub.pem")
    assert code == 1 and "is not signed" in err and "--sign-key KEY.pem" in err, err
