"""The op registry: arity, attributes and shape rules of every IR op."""

from intq.ops.registry import OPS, get_op
from intq.ops.schema import Attr, InferContext, OpDef, OpTable

__all__ = ["OPS", "Attr", "InferContext", "OpDef", "OpTable", "get_op"]
