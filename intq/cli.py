"""The ``intq`` command line.

Exit codes: 0 success; 1 an intq error (bad model, unsupported op, wrong calibration data,
tampered artifact...: the message says what and where, and what to do); 2 bad command-line
usage; 3 an internal error (a bug in intq: please report it with the traceback).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import intq
from intq.artifacts import (
    check_self_contained,
    has_header,
    onnx_metadata,
    open_text,
    parse_onnx,
    read_artifact_bytes,
)
from intq.backends import TARGETS, artifact_files
from intq.backends.base import atomic_write
from intq.backends.onnxruntime import onnx_census
from intq.backends.tvm_rpc import DEFAULT_TIMEOUT, parse_tracker, remote_bench
from intq.backends.tvm_runtime import MANIFEST_SUFFIX, TensorSpec, fallback_summary, tvm_artifact
from intq.config import load_config
from intq.data import calibration_batches, first_batch_shapes, read_npz
from intq.distillation import DISTILL_LOSSES, DistillConfig
from intq.frontends.onnx_import import (
    declared_inputs,
    is_static,
    load_model,
    resolve_input_shapes,
    survey,
)
from intq.inspection import layer_sqnr, layer_table, table
from intq.ir import Graph, Value, from_text, to_text
from intq.mixed_precision import SENSITIVITY_METHODS
from intq.ops import Trait
from intq.passes.calibration import CALIBRATION_METHODS
from intq.passes.integer_only import census
from intq.passes.learned_rounding import ROUNDINGS
from intq.passes.model_quantization import ModelQuantization
from intq.quantization import SMOOTH_MODES
from intq.signing import write_key_pair
from intq.vectors import read_manifest

EXAMPLES = {
    "compile": """examples:
  intq compile model.onnx --calib calib.npz -o model_int8.onnx             # ONNX Runtime
  intq compile model.onnx --calib calib.npz --target reference -o model.intq
  intq compile model.onnx --calib calib.npz --target tvm -o model_int8.so     # TVM, this CPU
  intq compile model.onnx --calib calib.npz --target tvm -o model_arm.tar \\
      --tvm-target '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": "+neon"}'
  intq compile model.onnx --calib calib.npz --target tvm -o model_int8.so \\
      --tune-trials 64 --tuning-db tuning/   # MetaSchedule; later compiles reuse tuning/
  intq compile model.onnx --calib calib.npz --config cfg.toml -o model_int8.onnx
  intq compile model.onnx --calib calib.npz --size-mb 2.5 --mp-report mp -o model_int8.onnx
  intq compile bert.onnx --calib calib.npz --input-shape input_ids=1,128 -o bert_int8.onnx
  intq keygen -o key.pem        # then sign: intq compile ... -o model.so --sign-key key.pem

Without --target, the suffix of -o picks the target: .onnx onnxruntime, .intq reference,
.so/.tar tvm. calib.npz holds one array per model input (numpy.savez(path, input=x)),
samples on the first axis; cfg.toml holds QuantConfig's fields (weight_bits,
activation_bits, calibration, percentile, [layer_bits."name"]); flags given on the command
line win over the file.""",
    "quantize": """examples:
  intq quantize model.onnx --calib calib.npz -o model.intq
  intq quantize model.onnx --calib calib.npz --calibration mse --weight-bits 4 -o model.intq""",
    "run": """examples:
  intq run model_int8.onnx --inputs in.npz -o out.npz
  intq run model.intq --inputs in.npz -o out.npz --quiet
  intq run model.so --inputs in.npz -o out.npz --trusted-key key.pub.pem   # signed only

in.npz holds one array per model input, of the exact shape the model takes; out.npz gets one
array per model output.""",
    "vectors": """examples:
  intq vectors model.intq --inputs in.npz -o vectors/
  intq vectors model.intq --inputs in.npz -o vectors/ --force    # replace vectors/

Writes vectors/vectors.json (the manifest: every integer node's op, name, tensors with their
quantization, and exact parameters) and one .npz per node holding its inputs in0, in1, ...
and outputs out0, ...; the format is documented in intq/vectors.py and
docs/golden-vectors.md. in.npz holds one array per model input, as for intq run.""",
    "inspect": """examples:
  intq inspect model.onnx                  # a float model: inputs, outputs, op census
  intq inspect model_int8.onnx             # an artifact: integer-only check, per-layer bits
  intq inspect model.intq --ir             # a saved graph, with its IR
  intq inspect model_int8.so               # a TVM library: its manifest (target, tensors)
  intq inspect model_int8.so --trusted-key pub.pem   # and check its signature
  intq inspect bert.onnx --input-shape input_ids=1,128 --input-shape attention_mask=1,128""",
    "bench": """examples:
  intq bench model_int8.onnx                          # latency percentiles p50/p90/p99
  intq bench model_int8.onnx --fp32 model.onnx        # and against the FP32 model
  intq bench model_int8.onnx --inputs in.npz --repeat 200
  intq bench model.so --profile --top 10              # and its 10 slowest kernels
  intq bench model.so --rpc-tracker 10.0.0.5:9190 --rpc-key rasp4   # on a device, via TVM RPC

--rpc-tracker runs a TVM artifact on a device that registered with a TVM RPC tracker:
  python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190            # anywhere
  python -m tvm.exec.rpc_server --tracker 10.0.0.5:9190 --key rasp4    # on each device
A .tar (cross target) is linked on the device by its C++ compiler.""",
    "keygen": """examples:
  intq keygen -o key.pem                   # key.pem (private, 0600) and key.pub.pem
  intq compile model.onnx --calib calib.npz -o model.so --sign-key key.pem
  intq run model.so --inputs in.npz -o out.npz --trusted-key key.pub.pem

The same keys from openssl: openssl genpkey -algorithm ed25519 -out key.pem, then
openssl pkey -in key.pem -pubout -out key.pub.pem. Signing writes OUT.sig next to the
artifact: an Ed25519 signature over every file of it (a TVM library and its manifest);
--trusted-key refuses an unsigned, otherwise signed or altered artifact before reading it.""",
    "report": """examples:
  intq report model.onnx --calib calib.npz -o report.png
  intq report model.onnx --calib calib.npz --config cfg.toml -o report.png --top 10

Prints the SQNR (dB) of each layer's output against the FP32 model on the calibration data,
worst first, and plots it to the PNG. Low SQNR marks the layers that hurt accuracy: give them
more bits with [layer_bits."name"] in a --config file.""",
}
OVERVIEW = "examples:\n" + "\n".join(
    line for text in EXAMPLES.values() for line in text.splitlines()[1:3]
)


API_FLAGS = {
    "checkpoint": "--checkpoint",
    "resume": "--resume",
    "input_shapes": "--input-shape",
    "tune_trials": "--tune-trials",
    "tuning_db": "--tuning-db",
    "tvm_target": "--tvm-target",
    "sign_key": "--sign-key",
    "trusted_keys": "--trusted-key",
}
"""Keyword argument of the Python API -> the flag that sets it, for hints shown by the CLI."""

_KEYWORDS = "|".join(API_FLAGS)
_HINT_RULES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # "tune_trials=N (--tune-trials N)": the hint names both; the CLI keeps the flag.
    (re.compile(rf"\b(?:{_KEYWORDS})(?:=\S+)?(?:/(?:{_KEYWORDS}))* \((--[^()]*)\)"), r"\1"),
    (re.compile(r"\binput_shapes=\{'([^']+)': \(\.\.\.\)\}"), r"--input-shape \1=D1,D2,..."),
    (re.compile(r"\binput_shapes=(?:\.\.\.)?"), "--input-shape NAME=D1,D2,..."),
    (re.compile(rf"\b({_KEYWORDS})=(?=\S)"), lambda m: API_FLAGS[m[1]] + " "),
]


def cli_hint(hint: str) -> str:
    """``hint`` as the command line should say it: the flags for the Python keywords it
    names (``pass input_shapes={'x': (...)}`` -> ``pass --input-shape x=D1,D2,...``)."""
    for pattern, replacement in _HINT_RULES:
        hint = pattern.sub(replacement, hint)
    return hint


def error_text(err: intq.IntqError) -> str:
    """The message the CLI prints for ``err``: as ``str(err)``, its hint in CLI terms."""
    text = str(err)
    if err.hint and text.endswith(err.hint):
        text = text[: -len(err.hint)] + cli_hint(err.hint)
    return text


NAME_MAX = 255
"""The longest file name (one path component, in bytes) Linux file systems take."""


def _path(text: str) -> Path:
    """A path argument, refused at parse time when no file system could hold it (the
    checks on the file would otherwise fail inside ``stat`` with ``File name too long``)."""
    encoded = os.fsencode(text)
    if b"\x00" in encoded:
        raise argparse.ArgumentTypeError("a path cannot hold a NUL byte")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise argparse.ArgumentTypeError(
            f"the name {os.fsdecode(longest[:40])!r}... is {len(longest)} bytes long;"
            f" file names take at most {NAME_MAX}"
        )
    return Path(text)


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        # A dimension has at most 18 digits: int() of 5,000 digits is slow or refused.
        if not sep or not name or any(len(d.strip()) > 18 for d in dims.split(",")):
            raise ValueError
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}") from None
    if any(d < 1 for d in shape):
        # A zero-size input holds no sample: calibration would wait forever for a batch.
        raise argparse.ArgumentTypeError(
            f"{text!r}: every dimension must be at least 1, got {list(shape)}"
        )
    return name, shape


def _add_input_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        action="append",
        type=_input_shape,
        default=[],
        metavar="NAME=D1,D2,...",
        help="fix the shape of an input (repeatable); symbolic dimensions it leaves open come"
        " from the first --calib sample",
    )


def _say(args: argparse.Namespace, *lines: str) -> None:
    if not getattr(args, "quiet", False):
        for line in lines:
            print(line)


def load_graph(
    path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None, calib: Path | None = None
) -> Graph:
    """An ONNX model (``.onnx``) or textual IR (anything else) as a graph.

    An ONNX model's symbolic dimensions are fixed by ``--input-shape`` where given, else by
    the calibration archive ``calib`` (batches of one sample). A saved ``.intq`` artifact's
    checksum is checked before its text is parsed: a damaged file says so, rather than
    failing to parse where it was cut.
    """
    if path.suffix == ".onnx":
        proto = load_model(path)
        declared = declared_inputs(proto)
        observed: dict[str, tuple[int, ...]] = {}
        if calib is not None and not all(is_static(d) for d in declared.values()):
            ranks = {name: None if d is None else len(d) for name, d in declared.items()}
            observed, _ = first_batch_shapes(calib, ranks)
        shapes = resolve_input_shapes(declared, input_shapes or {}, observed, cli=True)
        return intq.from_onnx(proto, shapes, base_dir=path.resolve().parent)
    if not path.is_file():
        raise intq.ArtifactError(f"no file at {path}", hint="check the path")
    path, data = read_artifact_bytes(path)
    if has_header(data):
        return from_text(open_text(data, path))
    try:
        return from_text(data.decode())
    except UnicodeDecodeError:
        raise intq.ArtifactError(
            f"{path} is neither textual IR nor an ONNX model",
            hint="intq reads .onnx models and .intq graphs (and TVM libraries in intq inspect)",
        ) from None


def summary(graph: Graph) -> str:
    """Inputs, outputs, sizes, the op census and (for integer graphs) the integer-only check."""
    params = sum(v.type.size for v in graph.constants)
    nbytes = sum(v.type.nbytes for v in graph.constants)
    lines = [
        f"graph {graph.name}: {len(graph.nodes)} nodes, {params:,} constant elements"
        f" ({nbytes / 2**20:.1f} MiB)"
    ]
    lines += [f"  input  {v.name}: {v.type}" for v in graph.inputs]
    lines += [f"  output {v.name}: {v.type}" for v in graph.outputs]
    lines.append("op census:")
    lines += [f"  {op:<24} {n}" for op, n in sorted(Counter(n.op for n in graph).items())]
    if any(node.opdef.has(Trait.BOUNDARY) for node in graph):
        result = census(graph)
        verdict = "yes" if not result.violations else "NO: " + "; ".join(result.violations[:5])
        lines.append(f"integer-only: {verdict}")
        if result.float_tail:
            lines.append(f"  float after the output dequantization: {', '.join(result.float_tail)}")
        lines.append("per-layer bits @ scales:")
        lines += ["  " + line for line in table(layer_table(graph)).splitlines()]
    return "\n".join(lines)


def _trusted(args: argparse.Namespace) -> list[Path] | None:
    """The ``--trusted-key`` files, or None (no flag: unsigned artifacts load)."""
    return getattr(args, "trusted_key", None) or None


def _onnx_artifact_summary(path: Path, trusted: list[Path] | None = None) -> str | None:
    """The summary of an intq ``.onnx`` artifact, or None for a plain ONNX model (with
    ``trusted`` keys: a signed artifact, or an error)."""
    if trusted is not None:
        path, _, files = artifact_files(path, trusted)
        data = files[""]
    else:
        path, data = read_artifact_bytes(path)
    model = parse_onnx(data, path)
    if trusted is None and not any(p.key == "intq.format" for p in model.metadata_props):
        return None
    meta = onnx_metadata(model, path)
    check_self_contained(model, path)
    lines = [f"{path}: intq artifact format {meta['intq.format']}, target {meta['intq.target']}"]
    lines += [f"  input  {i.name}: {_onnx_type(i)}" for i in model.graph.input]
    lines += [f"  output {o.name}: {_onnx_type(o)}" for o in model.graph.output]
    lines.append("op census (ONNX):")
    counts = Counter(node.op_type for node in model.graph.node)
    lines += [f"  {op:<24} {n}" for op, n in sorted(counts.items())]
    try:
        onnx_census(model)
        lines.append("integer-only: yes")
    except intq.NumericsError as err:
        lines.append(f"integer-only: NO: {err.message}")
    lines.append("per-layer bits @ scales:")
    lines += ["  " + line for line in table(meta["intq.layers"]).splitlines()]
    return "\n".join(lines)


def _tvm_artifact_summary(path: Path, trusted: list[Path] | None = None) -> str:
    """The summary of a TVM library from its manifest (the library's checksum verified, and
    its signature with ``trusted`` keys; its code is not loaded): target, tensors and how
    they are (de)quantized, kernels, layers."""
    artifact = _read_tvm(path, trusted)
    kind = "object files to link" if artifact.needs_linker else "a shared object"
    lines = [f"{path}: intq TVM artifact ({kind}), target {json.dumps(artifact.target)}"]
    for role, specs in (("input ", artifact.inputs), ("output", artifact.outputs)):
        lines += [f"  {role} {s.name}: {_spec_text(s)}" for s in specs]
    nodes = sum(len(v) for v in artifact.kernels.values())
    lines.append(f"kernels: {len(artifact.kernels)} TVM functions computing {nodes} graph nodes")
    if artifact.layers is not None:  # manifests written before the table have none
        lines.append("per-layer bits @ scales:")
        lines += ["  " + line for line in table(artifact.layers).splitlines()]
    return "\n".join(lines)


def _read_tvm(path: Path, trusted: list[Path] | None) -> Any:
    """A TVM artifact's checked files (:func:`intq.backends.artifact_files`), not loaded;
    what ``bench --rpc-tracker`` uploads (``inspect`` places libraries by their suffix)."""
    path, backend, files = artifact_files(path, trusted)
    if backend.name != "tvm" or MANIFEST_SUFFIX not in files:
        raise intq.IntqError(
            f"{path} is a {backend.name} artifact; --rpc-tracker runs TVM artifacts only",
            hint="compile it with --target tvm (and --tvm-target for a device)",
        )
    return tvm_artifact(path, files)


def _spec_text(spec: TensorSpec) -> str:
    """``float32[8,1,8,8], quantized to u8 @ 0.00392`` for a manifest's tensor."""
    text = f"{spec.dtype}[{','.join(str(d) for d in spec.shape)}]"
    quant = spec.quantization
    if quant is None:
        return text
    bits = f"{'s' if quant['signed'] else 'u'}{quant['bits']}"
    scales = quant["scale"] if isinstance(quant["scale"], list) else [quant["scale"]]
    low, high = min(scales), max(scales)
    scale = f"{low:.3g}" if low == high else f"{low:.3g}..{high:.3g}"
    how = {"quantize": "quantized to", "dequantize": "dequantized from"}.get(quant["op"], "")
    return f"{text}, {how} {bits} @ {scale}" if how else f"{text}, {bits} @ {scale}"


def _onnx_type(info: Any) -> str:
    import onnx

    t = info.type.tensor_type
    dims = ",".join(
        str(d.dim_value) if d.HasField("dim_value") else d.dim_param or "?" for d in t.shape.dim
    )
    if t.elem_type in onnx.TensorProto.DataType.values():
        elem = onnx.TensorProto.DataType.Name(t.elem_type).lower()
    else:  # a number this onnx has no name for
        elem = f"type {t.elem_type} (unknown)"
    return f"{elem}[{dims}]"


def _inspect(args: argparse.Namespace) -> int:
    if args.model.suffix in TARGETS["tvm"].suffixes:
        if args.ir:
            raise intq.IntqError(
                f"{args.model} is a TVM library: it holds compiled code, not the IR graph",
                hint="inspect --ir the .intq or .onnx the model was compiled from",
            )
        _say(args, _tvm_artifact_summary(args.model, _trusted(args)))
        return 0
    if args.model.suffix == ".onnx" and not args.ir:
        text = _onnx_artifact_summary(args.model, _trusted(args)) if args.model.is_file() else None
        if text is not None:
            _say(args, text)
            return 0
    if _trusted(args) is not None:  # a signed .intq (or an .onnx artifact with --ir)
        path, _, files = artifact_files(args.model, _trusted(args))
        graph = from_text(open_text(files[""], path))
        _say(args, summary(graph))
        if args.ir:
            _say(args, "", to_text(graph, elide_above=8).rstrip("\n"))
        return 0
    if args.model.suffix == ".onnx":
        # A plain ONNX model: which of its ops intq converts, also when some are missing.
        proto = load_model(args.model)
        given = dict(args.input_shape)
        shapes = resolve_input_shapes(declared_inputs(proto), given, cli=True)
        result = survey(proto, shapes, args.model.resolve().parent)
        _say(
            args, "ONNX op census:", *(f"  {u.op:<24} {u.count:>5}  {u.status}" for u in result.ops)
        )
        if result.error is not None:
            raise result.error
        assert result.graph is not None
        graph = result.graph
    else:
        graph = load_graph(args.model, dict(args.input_shape) or None)
    _say(args, summary(graph))
    if args.ir:
        _say(args, "", to_text(graph, elide_above=8).rstrip("\n"))
    return 0


def add_mixed_precision_args(command: argparse.ArgumentParser) -> None:
    """The mixed-precision flags (``--size-mb``, ``--bops``, ``--latency-ms``...) of a command
    that quantizes; :func:`mixed_precision_from_args` reads them back."""
    group = command.add_argument_group(
        "mixed precision",
        "choose weight (and input activation) bits per layer to meet a budget (HAWQ-V3 ILP)",
    )
    group.add_argument("--size-mb", type=float, help="weight storage budget in MB (2^20 bytes)")
    group.add_argument("--bops", type=float, help="bit operations budget per sample")
    group.add_argument(
        "--latency-ms", type=float, help="latency budget: sum of the layers' measured latencies"
    )
    group.add_argument(
        "--latency-table",
        type=_path,
        metavar="TABLE.json",
        help="per-layer latency table (JSON) to use; without it one is measured on ONNX"
        " Runtime (and saved as PREFIX.latency.json with --mp-report)",
    )
    group.add_argument(
        "--sensitivity", default="hessian", choices=SENSITIVITY_METHODS, help="how Ω is measured"
    )
    group.add_argument(
        "--activation-candidates",
        type=_bit_list,
        default=(),
        metavar="BITS",
        help="also choose each layer's input activation width among these, e.g. 8,16"
        " (default: every activation at --activation-bits)",
    )
    group.add_argument(
        "--mp-report", type=_path, metavar="PREFIX", help="write PREFIX.txt and PREFIX.png"
    )


def _bit_list(text: str) -> tuple[int, ...]:
    """``8,16`` -> ``(8, 16)``; argparse reports the ValueError as a usage error."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def mixed_precision_from_args(args: argparse.Namespace) -> intq.MixedPrecision | None:
    """The :class:`intq.MixedPrecision` the flags ask for, or ``None`` when no budget is set."""
    if args.size_mb is None and args.bops is None and args.latency_ms is None:
        given = (args.latency_table, args.mp_report, args.activation_candidates or None)
        if any(flag is not None for flag in given):
            raise intq.IntqError(
                "--latency-table, --activation-candidates and --mp-report need a budget",
                hint="add --size-mb, --bops or --latency-ms",
            )
        return None
    return intq.MixedPrecision(
        size_mb=args.size_mb,
        bops=args.bops,
        latency_ms=args.latency_ms,
        sensitivity=args.sensitivity,
        latency_table=args.latency_table,
        report=args.mp_report,
        activation_bits=args.activation_candidates,
    )


def add_distill_args(command: argparse.ArgumentParser) -> None:
    """The distillation flags (``--distill-steps``, ``--checkpoint``, ``--resume``...) of a
    command that quantizes; :func:`distill_from_args` reads them back."""
    group = command.add_argument_group(
        "distillation",
        "train the integer model on the FP32 model's outputs over the --calib samples"
        " (no labels): weights, biases and step sizes",
    )
    group.add_argument("--distill-steps", type=int, metavar="N", help="distill for N steps")
    group.add_argument("--distill-lr", type=float, help="learning rate of the weights (1e-5)")
    group.add_argument("--distill-loss", choices=DISTILL_LOSSES, help="default kl")
    group.add_argument(
        "--distill-batch", type=int, help="model batches per step (default 4), split by torchrun"
    )
    group.add_argument(
        "--checkpoint", type=Path, metavar="FILE.pt", help="write the training state to FILE.pt"
    )
    group.add_argument("--resume", action="store_true", help="continue from --checkpoint")


def distill_from_args(args: argparse.Namespace) -> DistillConfig | None:
    """The :class:`intq.DistillConfig` the flags ask for, or ``None`` without
    ``--distill-steps``."""
    if args.distill_steps is None:
        given = [args.distill_lr, args.distill_loss, args.distill_batch, args.checkpoint]
        if any(v is not None for v in given) or args.resume:
            raise intq.IntqError(
                "--distill-lr, --distill-loss, --distill-batch, --checkpoint and --resume"
                " tune distillation, which is off",
                hint="add --distill-steps N",
            )
        return None
    options = {
        "lr": args.distill_lr,
        "loss": args.distill_loss,
        "batch": args.distill_batch,
        "checkpoint": args.checkpoint,
    }
    return DistillConfig(
        steps=args.distill_steps,
        resume=args.resume,
        progress=False if args.quiet else None,
        **{k: v for k, v in options.items() if v is not None},
    )


def _config(args: argparse.Namespace) -> intq.QuantConfig:
    overrides = {
        "weight_bits": args.weight_bits,
        "activation_bits": args.activation_bits,
        "calibration": args.calibration,
        "percentile": args.percentile,
        "bias_correction": args.bias_correction,
        "rounding": args.rounding,
        "smooth": args.smooth,
        "mixed_precision": mixed_precision_from_args(args),
        "distill": distill_from_args(args),
    }
    progress = False if args.quiet else None
    if args.config is not None:
        return load_config(args.config, progress=progress, **overrides)
    return intq.QuantConfig(
        **{k: v for k, v in overrides.items() if v is not None}, progress=progress
    )


def _check_output(path: Path) -> None:
    if path.is_dir():
        raise intq.ArtifactError(f"output {path} is a directory", hint="give a file name")


def _suffixes() -> dict[str, str]:
    """Artifact suffix -> the target that writes it, from the backend records."""
    return {s: b.name for b in TARGETS.values() for s in b.suffixes}


def _suffix_list() -> str:
    """Each target's suffixes, for help texts: ``.intq reference, .onnx onnxruntime, ...``."""
    return ", ".join(f"{'/'.join(b.suffixes)} {b.name}" for b in TARGETS.values())


def _output_target(output: Path, target: str | None, command: str = "compile") -> str:
    """The target ``intq compile`` writes ``output`` for: ``target`` (``--target``) when
    given, else the one whose artifacts end in ``output``'s suffix. Refused, before any work,
    when the suffix is not one the target writes (an ELF file named ``.onnx`` misleads; and
    ``intq.load`` places some artifacts by their suffix)."""
    writers = _suffixes()
    if target is None:
        if output.suffix not in writers:
            raise intq.IntqError(
                f"-o {output}: cannot tell the target from the name's suffix"
                f" ({output.suffix or 'none'})",
                hint=f"name the output for its target ({_suffix_list()}), or give --target",
            )
        return writers[output.suffix]
    backend = TARGETS[target]
    if output.suffix not in backend.suffixes:
        names = " or ".join(backend.suffixes)
        hint = f"name it {output.with_suffix(backend.suffixes[0]).name}"
        if command == "quantize":
            hint += "; intq compile --target writes the other targets' artifacts"
        elif output.suffix in writers:
            hint += f", or drop --target {target}: {output.suffix} means {writers[output.suffix]}"
        what = f"intq {command}" if command == "quantize" else f"--target {target}"
        raise intq.IntqError(
            f"-o {output}: {what} writes {backend.artifact}, named {names}", hint=hint
        )
    return target


def _compile(args: argparse.Namespace) -> int:
    _check_output(args.output)
    args.target = _output_target(args.output, args.target, args.command)
    config = _config(args)
    graph = load_graph(args.model, dict(args.input_shape) or None, args.calib)
    batches = None
    if args.calib is not None:
        batches = calibration_batches(args.calib, graph.inputs)
    elif graph.analysis(ModelQuantization) is None:
        raise intq.IntqError(
            f"{args.model} is a float model: it needs --calib samples to choose its ranges",
            hint="add --calib CALIB.npz (numpy.savez(path, input=x), samples on the first"
            " axis); only a pre-quantized (QDQ) model brings its own",
        )
    tvm_target = getattr(args, "tvm_target", None)
    if tvm_target is not None and args.target != "tvm":
        raise intq.IntqError("--tvm-target applies to --target tvm only", hint="add --target tvm")
    # `intq quantize` shares this function and has no TVM flags.
    tuning = {
        "tune_trials": getattr(args, "tune_trials", 0),
        "tuning_db": getattr(args, "tuning_db", None),
    }
    if args.target != "tvm" and (tuning["tune_trials"] or tuning["tuning_db"] is not None):
        raise intq.IntqError(
            "--tune-trials and --tuning-db apply to --target tvm only", hint="add --target tvm"
        )
    quantized = intq.quantize(graph, batches, config)
    options: dict[str, object] = {}
    if args.target == "tvm":
        options = {"tvm_target": tvm_target, **tuning, "progress": False if args.quiet else None}
    exe = intq.compile(quantized, target=args.target, **options)
    path = exe.save(args.output, sign_key=getattr(args, "sign_key", None))
    _say(args, summary(quantized), f"wrote {path}")
    return 0


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return atomic_write(path, buffer.getvalue())


def _run(args: argparse.Namespace) -> int:
    _check_output(args.output)
    exe = intq.load(args.artifact, trusted_keys=_trusted(args))
    feeds = read_npz(args.inputs, "inputs")
    outputs = exe.run(feeds)
    path = _write_npz(args.output, outputs)
    _say(
        args,
        *(f"  output {k}: {v.dtype}{list(v.shape)}" for k, v in outputs.items()),
        f"wrote {path}",
    )
    return 0


def _vectors(args: argparse.Namespace) -> int:
    exe = intq.load(args.artifact, trusted_keys=_trusted(args))
    feeds = read_npz(args.inputs, "inputs")
    out_dir = exe.golden_vectors(feeds, args.output, overwrite=args.force)
    manifest = read_manifest(out_dir)
    _say(args, f"wrote golden vectors of {len(manifest['nodes'])} nodes to {out_dir}")
    return 0


def _input_values(exe: Any) -> list[Value]:
    """The inputs ``exe.run`` takes, as IR values: a graph's, a loaded ONNX artifact's, or
    (TVM) the manifest's tensor specs turned into values."""
    inputs = getattr(exe, "inputs", None) or exe.graph.inputs
    return [v.value() if isinstance(v, TensorSpec) else v for v in inputs]


def _random_inputs(inputs: Sequence[Value], seed: int) -> dict[str, np.ndarray]:
    """Random feeds of each input's shape and dtype (``bench`` without ``--inputs``)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in inputs:
        dtype = value.type.dtype.numpy
        shape = value.type.shape
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = np.ones(shape, dtype)
        else:
            feeds[value.name] = rng.integers(0, 100, shape).astype(dtype)
    return feeds


def _percentiles(fn: Callable[[], object], repeat: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return {f"p{p}": float(np.percentile(times, p)) for p in (50, 90, 99)}


def _bench(args: argparse.Namespace) -> int:
    if args.repeat < 1 or args.warmup < 0 or args.top < 0:
        raise intq.IntqError("--repeat must be at least 1, --warmup and --top at least 0")
    if args.rpc_tracker is not None or args.rpc_key is not None:
        if args.profile:
            raise intq.IntqError(
                "--profile times the kernels on this machine, not through --rpc-tracker",
                hint="bench the device without --profile, or profile a host build here",
            )
        return _bench_remote(args)
    exe = intq.load(args.artifact, trusted_keys=_trusted(args))
    if args.profile and not hasattr(exe, "profile"):
        raise intq.IntqError(
            f"--profile times the kernels of TVM and ONNX Runtime artifacts, not {exe.target}",
            hint="compile with --target tvm or --target onnxruntime",
        )
    if args.inputs is not None:
        feeds = read_npz(args.inputs, "inputs")
    else:
        feeds = _random_inputs(_input_values(exe), seed=0)
    rows = [
        {
            "model": f"{args.artifact} ({exe.target})",
            **_percentiles(lambda: exe.run(feeds), args.repeat, args.warmup),
        }
    ]
    if args.fp32 is not None:
        import onnxruntime as ort

        if not args.fp32.is_file():
            raise intq.ArtifactError(f"no FP32 model at {args.fp32}", hint="check the path")
        try:
            session = ort.InferenceSession(str(args.fp32), providers=["CPUExecutionProvider"])
        except Exception as err:  # ORT raises its own types
            raise intq.ModelImportError(f"ONNX Runtime cannot open {args.fp32}: {err}") from None
        fp32_feeds = {i.name: feeds[i.name] for i in session.get_inputs() if i.name in feeds}
        missing = [i.name for i in session.get_inputs() if i.name not in feeds]
        if missing:
            raise intq.ShapeError(
                f"the FP32 model takes inputs {missing} the artifact does not",
                hint="pass the FP32 model the artifact was converted from",
            )
        _same_inputs(args.fp32, session.get_inputs(), fp32_feeds)
        rows.append(
            {
                "model": f"{args.fp32} (FP32, onnxruntime)",
                **_percentiles(lambda: session.run(None, fp32_feeds), args.repeat, args.warmup),
            }
        )
    _print_latency(args, rows)
    if args.profile:
        _print_profile(args, exe, feeds)
    return 0


_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}
_ORT_TYPES |= {"tensor(int32)": "int32", "tensor(bool)": "bool", "tensor(float16)": "float16"}
_ORT_TYPES |= {"tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def _same_inputs(path: Path, inputs: Sequence[Any], feeds: dict[str, np.ndarray]) -> None:
    """Refuse an FP32 model whose inputs take other shapes or dtypes than the artifact's
    feeds (ONNX Runtime would refuse the first run with an error of its own)."""
    for info in inputs:
        array = feeds[info.name]
        dims = list(info.shape)
        fits = len(dims) == array.ndim and all(
            not isinstance(d, int) or d == n for d, n in zip(dims, array.shape)
        )
        dtype = _ORT_TYPES.get(info.type)
        if not fits or (dtype is not None and array.dtype != np.dtype(dtype)):
            shown = ",".join(str(d) if isinstance(d, int) else str(d or "?") for d in dims)
            raise intq.ShapeError(
                f"--fp32 {path}: input {info.name!r} takes {info.type}[{shown}], the artifact"
                f" {array.dtype}{list(array.shape)}",
                hint="pass the FP32 model the artifact was converted from (same input shapes)",
            )


def _print_profile(args: argparse.Namespace, exe: Any, feeds: dict[str, np.ndarray]) -> None:
    """``bench --profile``: the artifact's kernels, slowest first, with their graph nodes."""
    kernels = exe.profile(feeds, runs=args.repeat, warmup=args.warmup)
    total = sum(k.ms for k in kernels) or 1.0
    shown = kernels[: args.top] if args.top > 0 else kernels
    scheduled = bool(getattr(exe, "schedules", None))  # TVM, its manifest recording them
    rows = []
    for k in shown:
        nodes = k.nodes[0] if k.nodes else "-"
        if len(k.nodes) > 1:
            nodes += f" (+{len(k.nodes) - 1} more)"
        share = f"{100 * k.ms / total:.1f}%"
        rows.append(
            {
                "kernel": k.kernel,
                "calls": k.calls,
                "ms": f"{k.ms:.3f}",
                "share": share,
                **({"schedule": _schedule_text(exe, k.kernel)} if scheduled else {}),
                "node": nodes,
            }
        )
    print(f"\nkernels, median ms per run over {args.repeat} profiled runs:")
    print(table(rows))
    rest = kernels[len(shown) :]
    if rest:
        print(f"... {len(rest)} more kernels: {sum(k.ms for k in rest):.3f} ms")
    fallbacks = getattr(exe, "fallbacks", None)
    if fallbacks:
        slow = sum(k.ms for k in kernels if k.kernel in fallbacks)
        print(f"fallback: {fallback_summary(fallbacks)} ({slow:.3f} ms per run)")
    elif scheduled:
        print(f"every one of the {len(exe.schedules)} kernels ran its own schedule (no fallback)")


def _schedule_text(exe: Any, kernel: str) -> str:
    """The schedule a TVM kernel ran (``conv``; ``elementwise (fallback)`` when its own
    failed); ``-`` for the VM's builtins, ONNX Runtime nodes and older manifests."""
    _, applied = getattr(exe, "schedules", {}).get(kernel, ("-", "-"))
    return applied if kernel not in getattr(exe, "fallbacks", {}) else f"{applied} (fallback)"


def _print_latency(args: argparse.Namespace, rows: list[dict[str, Any]], where: str = "") -> None:
    text = [
        {"model": r["model"], **{k: f"{r[k]:.3f}" for k in ("p50", "p90", "p99")}} for r in rows
    ]
    if len(rows) == 2:
        for row, raw in zip(text, rows):
            row["vs FP32 (p50)"] = f"{raw['p50'] / rows[1]['p50']:.2f}x"
    print(f"latency in ms over {args.repeat} runs ({args.warmup} warm-up){where}:")
    print(table(text))


def _bench_remote(args: argparse.Namespace) -> int:
    """``bench --rpc-tracker``: the artifact runs on a device the tracker hands out."""
    if args.rpc_tracker is None or args.rpc_key is None:
        raise intq.IntqError(
            "--rpc-tracker and --rpc-key go together",
            hint="e.g. --rpc-tracker 10.0.0.5:9190 --rpc-key rasp4",
        )
    if args.fp32 is not None:
        raise intq.IntqError(
            "--fp32 runs here while --rpc-tracker runs the artifact on a device:"
            " their times do not compare",
            hint="bench the FP32 model on the device separately",
        )
    artifact = _read_tvm(args.artifact, _trusted(args))
    path = artifact.path
    if args.inputs is not None:
        feeds = read_npz(args.inputs, "inputs")
    else:
        feeds = _random_inputs([s.value() for s in artifact.inputs], seed=0)
    result = remote_bench(
        artifact,
        args.rpc_tracker,
        args.rpc_key,
        feeds,
        repeat=args.repeat,
        warmup=args.warmup,
        timeout=args.rpc_timeout,
    )
    row = {"model": f"{path} (tvm, remote {args.rpc_key})", **result.percentiles()}
    where = f" on {args.rpc_key!r} via the tracker at {result.tracker}, timed on the device"
    _print_latency(args, [row], where)
    return 0


def _tracker_address(text: str) -> tuple[str, int]:
    try:
        return parse_tracker(text)
    except intq.IntqError as err:
        raise argparse.ArgumentTypeError(err.message) from None


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    finite = [r for r in rows if np.isfinite(r["sqnr_db"])]
    labels = [r["layer"] for r in finite][::-1]
    values = [r["sqnr_db"] for r in finite][::-1]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * len(labels) + 1)))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("SQNR of the layer output vs FP32 (dB), higher is better")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


def _report(args: argparse.Namespace) -> int:
    _check_output(args.output)
    if args.output.suffix.lower() != ".png":
        raise intq.IntqError(f"the report plot {args.output} must be a .png file")
    config = _config(args)
    if args.calib is None:
        raise intq.IntqError(
            "intq report compares the float and integer models on samples: give --calib",
            hint="add --calib CALIB.npz (numpy.savez(path, input=x), samples on the first axis)",
        )
    graph = load_graph(args.model, dict(args.input_shape) or None, args.calib)
    batches = list(calibration_batches(args.calib, graph.inputs))
    quantized = intq.quantize(graph, batches, config)
    rows = layer_sqnr(graph, quantized, batches, progress=config.progress)
    shown = rows[: args.top] if args.top else rows
    print(f"per-layer SQNR vs FP32 on {len(batches)} calibration batches, worst first:")
    print(
        table(
            [
                {
                    "layer": r["layer"],
                    "op": r["op"],
                    "clip": r["clip"],
                    "rounding (weights' SQNR)": r["rounding"],
                    "SQNR dB": f"{r['sqnr_db']:.1f}",
                }
                for r in shown
            ]
        )
    )
    # A name decoded with surrogateescape is no text the font renderer takes.
    name = args.model.name.encode("utf-8", "backslashreplace").decode()
    path = _plot(shown, args.output, f"{name}: per-layer SQNR (worst at the top)")
    _say(args, f"wrote {path}")
    return 0


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _command(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=EXAMPLES[name],
        formatter_class=_formatter,
    )


def _add_exact_inputs(command: argparse.ArgumentParser) -> None:
    """``--inputs IN.npz``, required: what ``run`` and ``vectors`` feed the artifact."""
    command.add_argument(
        "--inputs",
        type=_path,
        required=True,
        metavar="IN.npz",
        help="one array per model input (numpy.savez(path, input=x)), of the exact shape and"
        " dtype the model takes",
    )


def _add_quant_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--calib",
        type=_path,
        metavar="CALIB.npz",
        help="calibration samples: one array per model input, samples on the first axis"
        " (optional for a model already quantized in QDQ format: it brings its own ranges)",
    )
    command.add_argument(
        "--config",
        type=_path,
        metavar="CFG.toml",
        help="QuantConfig as TOML (flags given here override it)",
    )
    command.add_argument(
        "--calibration",
        choices=CALIBRATION_METHODS,
        help="default auto: per tensor, the clip that least disturbs the layers reading it",
    )
    command.add_argument("--percentile", type=float, help="for --calibration percentile")
    command.add_argument(
        "--bias-correction",
        action=argparse.BooleanOptionalAction,
        help="remove the mean output shift of weight rounding from every layer's integer bias"
        " (default: from the layers under 8 bits; --no-bias-correction: from none)",
    )
    command.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        help="default auto: layers under 8 bits learn their integer weights from the"
        " calibration data (learned: every layer; nearest: none)",
    )
    command.add_argument(
        "--smooth",
        choices=SMOOTH_MODES,
        help="layernorm: migrate LayerNorm outputs' outlier channels into the MatMuls reading"
        " them (SmoothQuant), which then read them at 8 bits (default off)",
    )
    command.add_argument(
        "--weight-bits",
        type=int,
        help="default 8; 7 lets the TVM backend use its faster byte kernel on AVX2 without VNNI",
    )
    command.add_argument("--activation-bits", type=int, help="default 8")
    _add_input_shape(command)
    command.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    add_mixed_precision_args(command)
    add_distill_args(command)


def _add_sign_key(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--sign-key",
        type=Path,
        metavar="KEY.pem",
        help="sign the artifact with this Ed25519 private key (PEM or raw 32 bytes; intq"
        " keygen makes one): writes OUT.sig, which --trusted-key checks when loading",
    )


def _add_trusted_key(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        metavar="PUB.pem",
        help="accept the artifact only if signed by this Ed25519 public key (repeatable):"
        " checked before the artifact is parsed or its library loaded",
    )


def _keygen(args: argparse.Namespace) -> int:
    private, public = write_key_pair(args.output, overwrite=args.force)
    _say(args, f"wrote {private} (private: keep it secret) and {public} (public)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``intq`` command."""
    parser = argparse.ArgumentParser(
        prog="intq",
        description="Compile trained networks into integer-only networks.",
        epilog=OVERVIEW + "\n\nexit codes: 0 success, 1 intq error, 2 bad usage, 3 internal error",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"intq {intq.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    command = _command(commands, "compile", "calibrate, convert to integers and compile")
    command.add_argument("model", type=_path, help="an .onnx file (or a float .intq graph)")
    command.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="OUT",
        help="the artifact to write; its suffix picks the target when --target is not given: "
        + _suffix_list(),
    )
    command.add_argument(
        "--target",
        choices=sorted(TARGETS),
        help="; ".join(f"{b.name} writes {b.artifact}" for b in TARGETS.values())
        + " (default: the target of OUT's suffix; a suffix the target does not write is"
        " refused)",
    )
    command.add_argument(
        "--tvm-target",
        metavar="JSON",
        help='with --target tvm: a TVM target, e.g. \'{"kind": "llvm", "mtriple":'
        ' "aarch64-linux-gnu", "mattr": "+neon"}\' (default: this machine)',
    )
    command.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="N",
        help="with --target tvm: tune the depthwise and generic kernels that --tuning-db has"
        " no record for with MetaSchedule, N candidates each, measured on this machine",
    )
    command.add_argument(
        "--tuning-db",
        type=_path,
        metavar="DIR",
        help="with --target tvm: MetaSchedule database directory; kernels it has records for"
        " use the best one (created by --tune-trials)",
    )
    _add_quant_options(command)
    _add_sign_key(command)
    command.set_defaults(run=_compile)

    command = _command(commands, "quantize", "calibrate and convert to an integer-only .intq")
    command.add_argument("model", type=_path, help="an .onnx file")
    command.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="OUT.intq",
        help="the integer-only graph to write (a .intq artifact: textual IR, checksummed)",
    )
    _add_quant_options(command)
    _add_sign_key(command)
    command.set_defaults(run=_compile, target="reference")

    command = _command(commands, "run", "run a compiled artifact on inputs from an .npz")
    command.add_argument("artifact", type=_path, help="an artifact intq compile wrote")
    _add_exact_inputs(command)
    command.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="OUT.npz",
        help="where to write the outputs: one array per model output",
    )
    command.add_argument("--quiet", action="store_true", help="print nothing")
    _add_trusted_key(command)
    command.set_defaults(run=_run)

    command = _command(
        commands, "vectors", "write golden vectors: each integer node's inputs and outputs"
    )
    command.add_argument(
        "artifact", type=_path, help="a .intq artifact (intq quantize; the integer graph)"
    )
    _add_exact_inputs(command)
    command.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="DIR",
        help="the directory to write (vectors.json and one .npz per node), written atomically",
    )
    command.add_argument(
        "--force", action="store_true", help="replace DIR when it exists and is not empty"
    )
    command.add_argument("--quiet", action="store_true", help="print nothing")
    _add_trusted_key(command)
    command.set_defaults(run=_vectors)

    command = _command(commands, "inspect", "summarise a model or artifact")
    command.add_argument(
        "model", type=_path, help="an .onnx model or artifact, a .intq graph or a TVM .so/.tar"
    )
    _add_input_shape(command)
    command.add_argument("--ir", action="store_true", help="also print the textual IR")
    command.add_argument(
        "--quiet",
        action="store_true",
        help="print nothing: the exit code says whether the file reads (checksums verified)",
    )
    _add_trusted_key(command)
    command.set_defaults(run=_inspect)

    command = _command(commands, "bench", "measure an artifact's latency (p50/p90/p99)")
    command.add_argument("artifact", type=_path, help="an artifact intq compile wrote")
    command.add_argument("--fp32", type=_path, metavar="MODEL.onnx", help="compare with it")
    command.add_argument(
        "--inputs",
        type=_path,
        metavar="IN.npz",
        help="one array per model input (numpy.savez(path, input=x)); default: random arrays"
        " of the shapes and dtypes the artifact takes",
    )
    command.add_argument("--repeat", type=int, default=50, help="timed runs (default 50)")
    command.add_argument("--warmup", type=int, default=5, help="untimed runs (default 5)")
    command.add_argument(
        "--profile", action="store_true", help="also time each kernel (TVM, ONNX Runtime)"
    )
    command.add_argument(
        "--top", type=int, default=20, metavar="N", help="profile rows shown (0: all; default 20)"
    )
    command.add_argument(
        "--quiet",
        action="store_true",
        help="accepted as by every command; bench prints its results only, no progress",
    )
    group = command.add_argument_group("remote (TVM artifacts)", "run on a device via TVM RPC")
    group.add_argument(
        "--rpc-tracker", type=_tracker_address, metavar="HOST:PORT", help="the RPC tracker"
    )
    group.add_argument("--rpc-key", metavar="KEY", help="the key the device's server registered")
    group.add_argument(
        "--rpc-timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"wait this long for the tracker and a free device (default {DEFAULT_TIMEOUT:g})",
    )
    _add_trusted_key(command)
    command.set_defaults(run=_bench)

    command = _command(commands, "keygen", "make an Ed25519 key pair to sign artifacts with")
    command.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="KEY.pem",
        help="the private key to write (PEM, mode 0600); the public key goes to KEY.pub.pem",
    )
    command.add_argument("--force", action="store_true", help="replace existing key files")
    command.add_argument("--quiet", action="store_true", help="print nothing")
    command.set_defaults(run=_keygen)

    command = _command(commands, "report", "per-layer SQNR vs FP32: which layer hurts")
    command.add_argument("model", type=_path, help="the float .onnx model")
    command.add_argument(
        "-o",
        "--output",
        type=_path,
        required=True,
        metavar="REPORT.png",
        help="the plot of the per-layer SQNR to write (PNG)",
    )
    command.add_argument("--top", type=int, default=0, help="show only the N worst layers")
    _add_quant_options(command)
    command.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``intq`` command; returns the exit code."""
    for stream in (sys.stdout, sys.stderr):
        # Paths come from argv, decoded with surrogateescape: printing them must not fail.
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except intq.IntqError as err:
        print(f"intq: error: {error_text(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("intq: interrupted", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(
            "intq: internal error (a bug in intq): please report it with the traceback above",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
