"""Frontends: import models from other frameworks into the IR."""

from intq.frontends.onnx_import import from_onnx

__all__ = ["from_onnx"]
