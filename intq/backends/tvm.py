"""The Apache TVM backend, re-exported from :mod:`intq.backends.tvm_lowering`.

A step of splitting the backend by concept: the module's code is renamed first, so that its
history follows it; the next commit splits it into layout, kernels, lowering and driver.
"""

from intq.backends.tvm_lowering import (
    LOWER,
    TensorSpec,
    TvmExecutable,
    compile_tvm,
    fuse_relax_ops,
    host_target,
    load_tvm,
    parse_target,
    to_relax,
)

__all__ = [
    "LOWER",
    "TensorSpec",
    "TvmExecutable",
    "compile_tvm",
    "fuse_relax_ops",
    "host_target",
    "load_tvm",
    "parse_target",
    "to_relax",
]
