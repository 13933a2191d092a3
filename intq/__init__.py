"""intq: compile trained networks into integer-only networks for TVM and ONNX Runtime.

The public entry points::

    graph = intq.from_onnx("model.onnx", input_shapes={"x": (1, 3, 224, 224)})
    exe = intq.compile(graph, target="reference")
    outputs = exe.run({"x": array})

    exe = intq.convert("model.onnx", calibration_data, target="onnxruntime")  # all in one
    exe.save("model_int8.onnx"); exe = intq.load("model_int8.onnx")
    graph = intq.from_torch(module, example_inputs)
"""

from intq import ir, passes
from intq.api import convert, distill, load
from intq.backends import compile
from intq.distillation import DistillConfig
from intq.errors import (
    ArtifactError,
    IntqError,
    ModelImportError,
    NumericsError,
    ParseError,
    PassError,
    RemoteError,
    ShapeError,
    UnsupportedOpError,
    VerificationError,
)
from intq.frontends import from_onnx, from_torch
from intq.mixed_precision import MixedPrecision
from intq.passes.precision import LayerBits
from intq.quantization import QuantConfig, quantize

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "DistillConfig",
    "IntqError",
    "ModelImportError",
    "NumericsError",
    "ParseError",
    "PassError",
    "RemoteError",
    "ShapeError",
    "UnsupportedOpError",
    "VerificationError",
    "LayerBits",
    "MixedPrecision",
    "QuantConfig",
    "compile",
    "convert",
    "distill",
    "from_onnx",
    "from_torch",
    "ir",
    "load",
    "passes",
    "quantize",
]
