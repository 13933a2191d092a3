"""The intq IR: typed values, nodes, graphs, their text form and verifier."""

from intq.ir.graph import AttrValue, Graph, Node, Use, Value, ValueMap
from intq.ir.parser import from_text
from intq.ir.printer import to_text
from intq.ir.types import DType, QuantParams, TensorType
from intq.ir.verifier import verify

__all__ = [
    "AttrValue",
    "DType",
    "Graph",
    "Node",
    "QuantParams",
    "TensorType",
    "Use",
    "Value",
    "ValueMap",
    "from_text",
    "to_text",
    "verify",
]
