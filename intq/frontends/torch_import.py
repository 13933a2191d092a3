"""The PyTorch frontend, re-exported from :mod:`intq.frontends.torch_ops`.

A step of splitting the frontend into converters and importer: the module is renamed first,
so that its history follows the converters; the next commit splits it.
"""

from intq.frontends.torch_ops import (
    ATEN_CONVERTERS,
    TorchExportFallbackWarning,
    from_torch,
    supported_aten_ops,
)

__all__ = ["ATEN_CONVERTERS", "TorchExportFallbackWarning", "from_torch", "supported_aten_ops"]
