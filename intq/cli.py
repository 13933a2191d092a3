"""The ``intq`` command line.

Exit codes: 0 success, 1 an intq error (bad model, unsupported op, shape mismatch...: the
message says what and where), 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

import intq
from intq.backends import TARGETS
from intq.ir import Graph, from_text, to_text
from intq.passes.integer_only import census
from intq.quantization import CALIBRATION_METHODS

EXAMPLES = """examples:
  intq compile model.onnx --calib calib.npz --target onnxruntime -o model_int8.onnx
  intq compile model.onnx --calib calib.npz --target tvm -o model_int8.so
  intq quantize model.onnx --calib calib.npz -o model.intq
  intq quantize model.onnx --calib calib.npz --calibration mse --weight-bits 4 -o model.intq
  intq inspect model.onnx
  intq inspect model.onnx --input-shape input_ids=1,128 --input-shape attention_mask=1,128
  intq inspect model.onnx --ir          # print the IR, large constants elided
  intq inspect saved.intq               # a graph saved as textual IR
"""


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}") from None


def _add_input_shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        action="append",
        type=_input_shape,
        default=[],
        metavar="NAME=D1,D2,...",
        help="fix the shape of an input with symbolic dimensions (repeatable)",
    )


def load_graph(path: Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """An ONNX model (``.onnx``) or textual IR (anything else) as a graph."""
    if path.suffix == ".onnx":
        return intq.from_onnx(path, input_shapes=input_shapes)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise intq.ArtifactError(f"cannot read {path}: {err}") from None
    return from_text(text)


def summary(graph: Graph) -> str:
    """Inputs, outputs, sizes and the op census of ``graph``."""
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
    if any(node.op == "Quantize" for node in graph):
        result = census(graph)
        verdict = "yes" if not result.violations else "NO: " + "; ".join(result.violations[:5])
        lines.append(f"integer-only: {verdict}")
        if result.float_tail:
            lines.append(f"  float after the output dequantization: {', '.join(result.float_tail)}")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    graph = load_graph(args.model, dict(args.input_shape) or None)
    print(summary(graph))
    if args.ir:
        print()
        print(to_text(graph, elide_above=8), end="")
    return 0


def npz_batches(path: Path, graph: Graph) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the model's batch size from an ``.npz`` with one array per graph input,
    samples along the first axis; a last partial batch is dropped."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise intq.ArtifactError(f"cannot read calibration data {path}: {err}") from None
    with archive:
        arrays = {}
        for value in graph.inputs:
            if value.name not in archive.files:
                raise intq.ShapeError(
                    f"{path} has no array for input {value.name!r}",
                    hint=f"the archive holds {archive.files}; save one array per model input",
                )
            array = archive[value.name]
            if array.shape[1:] != value.type.shape[1:]:
                raise intq.ShapeError(
                    f"calibration samples for {value.name!r} have shape {list(array.shape[1:])},"
                    f" the model takes {list(value.type.shape[1:])} per sample"
                )
            arrays[value.name] = array
    batch = graph.inputs[0].type.shape[0]
    count = min(len(a) for a in arrays.values())
    if count < batch:
        raise intq.ShapeError(f"{path} holds {count} samples, fewer than one batch of {batch}")
    for start in range(0, count - batch + 1, batch):
        yield {name: a[start : start + batch] for name, a in arrays.items()}


def _quantize(args: argparse.Namespace) -> int:
    graph = load_graph(args.model, dict(args.input_shape) or None)
    config = intq.QuantConfig(
        weight_bits=args.weight_bits,
        activation_bits=args.activation_bits,
        calibration=args.calibration,
        percentile=args.percentile,
        progress=False if args.quiet else None,
    )
    quantized = intq.quantize(graph, npz_batches(args.calib, graph), config)
    options = {}
    if args.target == "tvm":
        options["tvm_target"] = getattr(args, "tvm_target", None)
    path = intq.compile(quantized, target=args.target, **options).save(args.output)
    if not args.quiet:
        print(summary(quantized))
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``intq`` command."""
    parser = argparse.ArgumentParser(
        prog="intq",
        description="Compile trained networks into integer-only networks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"intq {intq.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect",
        help="summarise a model: inputs, outputs, op census",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("model", type=Path, help="an .onnx file or a saved .intq graph")
    _add_input_shape(inspect)
    inspect.add_argument("--ir", action="store_true", help="also print the textual IR")
    inspect.set_defaults(run=_inspect)

    for name, target, help_text, output in (
        ("compile", None, "calibrate, convert to integers and compile for a target", "OUT"),
        (
            "quantize",
            "reference",
            "calibrate and convert to an integer-only .intq graph",
            "OUT.intq",
        ),
    ):
        command = commands.add_parser(
            name,
            help=help_text,
            epilog=EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_argument("model", type=Path, help="an .onnx file")
        command.add_argument(
            "--calib",
            type=Path,
            required=True,
            metavar="CALIB.npz",
            help="calibration samples: one array per model input, samples on the first axis",
        )
        command.add_argument("-o", "--output", type=Path, required=True, metavar=output)
        if target is None:
            command.add_argument(
                "--target",
                default="onnxruntime",
                choices=sorted(TARGETS),
                help="onnxruntime writes a standard .onnx file; reference a .intq graph;"
                " tvm a shared object (.tar of objects for a cross target) and a manifest",
            )
            command.add_argument(
                "--tvm-target",
                metavar="JSON",
                help='with --target tvm: a TVM target, e.g. \'{"kind": "llvm", "mtriple":'
                ' "aarch64-linux-gnu", "mattr": "+neon"}\' (default: this machine)',
            )
        else:
            command.set_defaults(target=target)
        command.add_argument("--calibration", default="minmax", choices=CALIBRATION_METHODS)
        command.add_argument("--percentile", type=float, default=99.99)
        command.add_argument("--weight-bits", type=int, default=8)
        command.add_argument("--activation-bits", type=int, default=8)
        _add_input_shape(command)
        command.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
        command.set_defaults(run=_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``intq`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except intq.IntqError as err:
        print(f"intq: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
