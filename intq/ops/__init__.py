"""The op registry: arity, attributes and shape rules of every IR op."""

from intq.ops.registry import OPS, get_op, ops_with
from intq.ops.schema import Attr, InferContext, KernelSpec, OpDef, OpTable, Trait

__all__ = [
    "OPS",
    "Attr",
    "InferContext",
    "KernelSpec",
    "OpDef",
    "OpTable",
    "Trait",
    "get_op",
    "ops_with",
]
