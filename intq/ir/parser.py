"""Parse the textual IR written by :mod:`intq.ir.printer` back into a graph.

Errors are :class:`~intq.errors.ParseError` with the line and a caret under
the offending token.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

import numpy as np

from intq import limits
from intq.errors import IntqError, ParseError
from intq.ir.graph import AttrValue, Graph, Node, Value
from intq.ir.int4 import packed_int4, unpack_int4
from intq.ir.types import DType, QuantParams, TensorType

T = TypeVar("T")

_MAX_LISTED = 1 << 16
"""Values a constant may list one by one (the printer lists at most 16; larger constants are
base64 data, one token)."""

_MAX_ITEMS = 1 << 20
"""Items any bracketed list may hold (operands, dimensions, attribute values, per-channel
scales): a bound on the memory a list of a hostile text takes, far above real models'."""

_MAX_DIGITS = 20
"""Digits an integer may have: every integer the IR holds (a dimension, an attribute, an
element of a 64-bit constant) has at most 20."""

# Strings use the unrolled-loop form: weights are long base64 strings, and a per-character
# alternation made parsing a ResNet-18 take 14 s instead of a fraction of a second. Each match
# is the blanks and comments before a token, then the token (or the end of the text): one
# match per token, which halves the tokenizer's time on a 50,000-node graph.
_SPACE = r"(?:[ \t\r\n]+|\#[^\n]*)*+"  # possessive: blanks never backtrack (no blowup)
_TOKEN = re.compile(
    _SPACE
    + r"""(?:
    (?P<value>%(?:[A-Za-z0-9_.$]+|"[^"\\\n]*(?:\\.[^"\\\n]*)*"))
  | (?P<origin>@"[^"\\\n]*(?:\\.[^"\\\n]*)*")
  | (?P<string>"[^"\\\n]*(?:\\.[^"\\\n]*)*")
  | (?P<number>[-+]?(?:(?:inf|nan)(?![A-Za-z0-9_])|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<arrow>->)
  | (?P<punct>[()\[\]{},:=<>])
  | (?P<eof>\Z)
    )""",
    re.VERBOSE,
)
_BLANKS = re.compile(_SPACE)


class Token(NamedTuple):
    """One lexical token and where it starts (a tuple: a 50,000-node graph has a million)."""

    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> Iterator[Token]:
    pos = 0
    match_at = _TOKEN.match  # anchored at pos: a search (finditer) would rescan the blanks
    while True:  # before a bad character from each of their positions, quadratic in them
        match = match_at(text, pos)
        kind = match.lastgroup if match is not None else None
        if match is None or kind is None:
            pos = _BLANKS.match(text, pos).end()  # type: ignore[union-attr]
            raise _error(text, pos, f"unexpected character {text[pos]!r}")
        start = match.start(kind)
        if kind == "eof":
            yield Token("eof", "", start)
            return
        yield Token(kind, match.group(kind), start)
        pos = match.end()


def _error(text: str, pos: int, message: str) -> ParseError:
    line_no = text.count("\n", 0, pos) + 1
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    line = text[start : end if end >= 0 else len(text)]
    shown = line[:200]
    caret = " " * min(pos - start, len(shown)) + "^"
    return ParseError(f"line {line_no}: {message}\n  {shown}\n  {caret}")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        # One token at a time: a list of every token would hold ~100 bytes per token, 50
        # times the text of a hostile file of 2-character tokens.
        self.tokens = _tokenize(text)
        self.current = next(self.tokens)
        self.graph = Graph()

    # ----- token helpers ---------------------------------------------------------

    @property
    def tok(self) -> Token:
        return self.current

    def _advance(self) -> None:
        if self.current.kind != "eof":
            self.current = next(self.tokens)

    def fail(self, message: str, token: Token | None = None) -> ParseError:
        token = token or self.tok
        return _error(self.text, token.pos, message)

    def take(self, kind: str, text: str | None = None) -> Token:
        token = self.tok
        if token.kind != kind or (text is not None and token.text != text):
            want = repr(text) if text is not None else kind
            got = repr(token.text) if token.text else "end of text"
            raise self.fail(f"expected {want}, got {got}")
        self._advance()
        return token

    def accept(self, kind: str, text: str | None = None) -> Token | None:
        token = self.tok
        if token.kind == kind and (text is None or token.text == text):
            self._advance()
            return token
        return None

    def string(self, token: Token, skip: int = 0) -> str:
        try:
            text = str(json.loads(token.text[skip:]))
            text.encode("utf-8")  # a lone surrogate ("\\udc80") is no text
        except json.JSONDecodeError as err:
            raise self.fail(f"bad string literal: {err.msg}", token) from None
        except UnicodeEncodeError:
            raise self.fail("bad string literal: a lone surrogate is not text", token) from None
        return text

    def name(self) -> tuple[str, Token]:
        token = self.take("value")
        raw = token.text[1:]
        return (self.string(token, 1) if raw.startswith('"') else raw), token

    def comma_list(
        self, close: str, item: Callable[[], T], most: int = 0, what: str = "items"
    ) -> list[T]:
        most = most or _MAX_ITEMS
        items: list[T] = []
        start = self.tok
        if self.accept("punct", close):
            return items
        while True:
            if len(items) == most:
                raise self.fail(f"a list of more than {most} {what}", start)
            items.append(item())
            if self.accept("punct", close):
                return items
            self.take("punct", ",")

    # ----- grammar ---------------------------------------------------------------

    def lookup(self) -> Value:
        name, token = self.name()
        value = self.graph.find(name)
        if value is None:
            raise self.fail(f"use of undefined value %{name}", token)
        return value

    def fresh(self) -> tuple[str, Token]:
        name, token = self.name()
        if self.graph.find(name) is not None:
            raise self.fail(f"redefinition of value %{name}", token)
        return name, token

    def number(self) -> float | int:
        token = self.take("number")
        text = token.text
        if any(c in text for c in ".eEin"):
            return float(text)
        if len(text.lstrip("+-")) > _MAX_DIGITS:
            # Python refuses int() of over 4,300 digits (a ValueError) and is slow below.
            raise self.fail(f"an integer of {len(text)} digits is out of range", token)
        return int(text)

    def int_(self) -> int:
        token = self.tok
        value = self.number()
        if not isinstance(value, int):
            raise self.fail("expected an integer", token)
        return value

    def type_(self) -> TensorType:
        token = self.take("word")
        try:
            dtype = DType(token.text)
        except ValueError:
            raise self.fail(f"unknown dtype {token.text!r}", token) from None
        self.take("punct", "[")
        shape = self.comma_list("]", self.int_, limits.MAX_RANK, "dimensions")
        quant = None
        if self.tok.kind == "word" and self.tok.text == "q":
            quant = self.quant()
        try:
            limits.check_size(shape, dtype.numpy.itemsize, f"a value ({dtype.value})")
            return TensorType(dtype, tuple(shape), quant)
        except IntqError as err:
            raise self.fail(err.message, token) from None

    def quant(self) -> QuantParams:
        start = self.take("word", "q")
        self.take("punct", "(")
        fields: dict[str, object] = {}

        def field() -> None:
            key = self.take("word")
            if key.text in ("signed", "unsigned"):
                fields["signed"] = key.text == "signed"
            elif key.text == "narrow":
                fields["narrow"] = True
            elif key.text in ("bits", "axis"):
                self.take("punct", "=")
                fields[key.text] = self.int_()
            elif key.text == "scale":
                self.take("punct", "=")
                if self.accept("punct", "["):
                    fields["scale"] = tuple(float(x) for x in self.comma_list("]", self.number))
                else:
                    fields["scale"] = (float(self.number()),)
            else:
                raise self.fail(f"unknown quantization field {key.text!r}", key)

        self.comma_list(")", field)
        if "bits" not in fields or "signed" not in fields or "scale" not in fields:
            raise self.fail("quantization needs bits, signed/unsigned and scale", start)
        try:
            return QuantParams(**fields)  # type: ignore[arg-type]
        except IntqError as err:
            raise self.fail(err.message, start) from None

    def attr_value(self) -> AttrValue:
        # One level of list only: no attribute kind nests, and recursing on "[[[[..." would
        # let a hostile text exhaust the stack (a RecursionError instead of a ParseError).
        if self.accept("punct", "["):
            return tuple(self.comma_list("]", self.attr_scalar))  # type: ignore[return-value]
        return self.attr_scalar()

    def attr_scalar(self) -> str | float | int:
        if self.tok.kind == "string":
            return self.string(self.take("string"))
        if self.tok.kind != "number":
            raise self.fail("expected a number or a string (attribute lists do not nest)")
        return self.number()

    def data(self, type_: TensorType, token: Token) -> np.ndarray:
        dtype = type_.dtype.numpy
        if self.tok.kind == "punct" and self.tok.text == "[":
            if type_.size > _MAX_LISTED:  # before the list: it costs ~40 bytes a value
                raise self.fail(
                    f"a constant of {type_.size} values listed one by one; at most"
                    f" {_MAX_LISTED} may be, larger ones are written as b64 data",
                    token,
                )
            self.take("punct", "[")
            items = self.comma_list("]", self.number)
            if len(items) != type_.size:
                raise self.fail(f"{len(items)} values for a constant of {type_.size}", token)
            if dtype.kind in "iub":
                info = np.iinfo(dtype) if dtype.kind != "b" else None
                low, high = (0, 1) if info is None else (int(info.min), int(info.max))
                bad = [x for x in items if not isinstance(x, int) or not low <= x <= high]
                if bad:
                    raise self.fail(f"{bad[0]} is not a value of {type_.dtype.value}", token)
            return np.array(items, dtype=dtype).reshape(type_.shape)
        word = self.accept("word", "i4") or self.take("word", "b64")
        blob = self.take("string")
        try:
            raw = base64.b64decode(blob.text[1:-1], validate=True)
        except (binascii.Error, ValueError):
            raise self.fail("bad base64 data", blob) from None
        if word.text == "i4":
            return self._int4(type_, raw, word)
        if len(raw) != type_.nbytes:
            raise self.fail(f"{len(raw)} bytes of data for a constant of {type_.nbytes}", word)
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(type_.shape)

    def _int4(self, type_: TensorType, raw: bytes, word: Token) -> np.ndarray:
        """A constant written packed two per byte (``i4"..."``): 4-bit quantized only."""
        signed = packed_int4(type_)
        if signed is None:
            raise self.fail(
                f"i4 data needs an i8/u8 type with 4-bit quantization, not {type_}", word
            )
        try:
            values = unpack_int4(raw, type_.size, signed)
        except ValueError as err:
            raise self.fail(f"bad i4 data: {err}", word) from None
        return values.astype(type_.dtype.numpy).reshape(type_.shape)

    def statement(self) -> bool:
        if self.accept("word", "return"):
            outputs = [self.lookup()]
            while self.accept("punct", ","):
                outputs.append(self.lookup())
            self.graph.set_outputs(outputs)
            return False
        if self.tok.kind != "value":
            raise self.fail("expected a definition (%name = ...) or 'return'")
        names = [self.fresh()]
        while self.accept("punct", ","):
            names.append(self.fresh())
        self.take("punct", "=")
        if self.accept("word", "const"):
            if len(names) != 1:
                raise self.fail("a constant defines one value", names[1][1])
            type_ = self.type_()
            value = Value(names[0][0], type_, self.data(type_, names[0][1]))
            self.graph._register(value)
            self.graph._constants[value.name] = value
            return True
        op = self.take("word")
        self.take("punct", "(")

        def operand() -> Value | None:
            if self.accept("word", "_"):
                return None
            return self.lookup()

        inputs = self.comma_list(")", operand)
        attrs: dict[str, AttrValue] = {}
        if self.accept("punct", "{"):

            def attr() -> None:
                key = self.take("word")
                self.take("punct", "=")
                attrs[key.text] = self.attr_value()

            self.comma_list("}", attr)
        self.take("punct", ":")
        types = [self.type_()]
        while self.accept("punct", ","):
            types.append(self.type_())
        if len(types) != len(names):
            raise self.fail(f"{len(names)} results but {len(types)} types", op)
        origin = ""
        if self.tok.kind == "origin":
            origin = self.string(self.take("origin"), 1)
        try:
            from intq.ops.registry import get_op

            opdef = get_op(op.text, node=origin)
            opdef.check_arity(len(inputs), node=origin)
            full = opdef.complete_attrs(attrs, node=origin, inputs=inputs)
        except IntqError as err:
            raise self.fail(str(err), op) from None
        outputs = [Value(name, t) for (name, _), t in zip(names, types)]
        self.graph.insert(Node(op.text, inputs, outputs, full, origin))
        return True

    def parse(self) -> Graph:
        self.take("word", "graph")
        token = self.tok
        if token.kind == "word":
            self.graph.name = self.take("word").text
        else:
            self.graph.name = self.string(self.take("string"))

        def param() -> None:
            name, _ = self.fresh()
            self.take("punct", ":")
            self.graph.add_input(name, self.type_())

        self.take("punct", "(")
        self.comma_list(")", param)
        self.take("punct", "{")
        while self.statement():
            pass
        self.take("punct", "}")
        self.take("eof")
        return self.graph


def from_text(text: str) -> Graph:
    """Parse textual IR into a :class:`Graph`; raises :class:`ParseError` with a caret."""
    return _Parser(text).parse()
