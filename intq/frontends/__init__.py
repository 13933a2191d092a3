"""Frontends: ONNX models and PyTorch modules into the IR."""

from intq.frontends.onnx_import import from_onnx
from intq.frontends.torch_import import from_torch

__all__ = ["from_onnx", "from_torch"]
