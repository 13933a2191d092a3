"""Pass infrastructure: passes as frozen dataclasses, pipelines, the manager.

A pass is a frozen dataclass whose fields are its options and whose class
attribute ``name`` is how pipelines spell it: ``"fold-batchnorm,dce"`` or,
with options, ``"fold-constants{max_bytes=1048576}"``. ``apply`` mutates the
graph in place and returns whether it changed anything; a pass that builds a
new graph (``integerize``) overrides ``run`` and returns it in its
:class:`PassResult`. Optional ``requires``/``ensures`` check pre- and
postconditions and raise :class:`~intq.errors.PassError`.

The :class:`PassManager` runs a pipeline, optionally verifying the graph
after every pass (``verify_each``) and calling ``dump(pass, graph, result)``
after each pass for debugging. An error in a pass names the pass and the
passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from intq.errors import IntqError, PassError, VerificationError
from intq.ir.graph import Graph
from intq.ir.verifier import verify


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the graph and whether it was modified."""

    graph: Graph
    modified: bool


@dataclass(frozen=True)
class Pass:
    """Base of all passes. Subclasses set ``name`` and implement :meth:`apply`."""

    name: ClassVar[str] = ""

    def apply(self, graph: Graph) -> bool:
        """Rewrite ``graph`` in place; return True when anything changed."""
        raise NotImplementedError

    def run(self, graph: Graph) -> PassResult:
        """Apply the pass; the result holds the graph to continue with (``graph`` itself,
        unless the pass builds a new one)."""
        return PassResult(graph, self.apply(graph))

    def requires(self, graph: Graph) -> None:
        """Raise :class:`PassError` when ``graph`` does not meet this pass's preconditions."""

    def ensures(self, graph: Graph) -> None:
        """Raise :class:`PassError` when the result misses this pass's postconditions."""

    def __call__(self, graph: Graph) -> PassResult:
        self.requires(graph)
        result = self.run(graph)
        self.ensures(result.graph)
        return result

    def __str__(self) -> str:
        options = [
            f"{f.name}={_format_option(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.repr and getattr(self, f.name) != _default(f)
        ]
        return self.name + ("{" + ",".join(options) + "}" if options else "")


DumpHook = Callable[[Pass, Graph, PassResult], None]


@dataclass
class PassManager:
    """Runs passes in order; ``verify_each`` checks the IR after every pass."""

    passes: Sequence[Pass]
    verify_each: bool = False
    dump: DumpHook | None = None

    def __call__(self, graph: Graph) -> PassResult:
        modified = False
        done: list[str] = []
        if self.verify_each:
            self._verify(graph, "before the first pass", done)
        for pass_ in self.passes:
            try:
                result = pass_(graph)
            except IntqError as err:
                err.add_note(_where(pass_, done))
                raise
            except Exception as err:
                raise PassError(
                    f"pass {pass_} failed with {type(err).__name__}: {err} ({_where(pass_, done)})"
                ) from err
            graph = result.graph
            modified |= result.modified
            if self.dump is not None:
                self.dump(pass_, graph, result)
            done.append(str(pass_))
            if self.verify_each:
                self._verify(graph, f"after pass {pass_}", done)
        return PassResult(graph, modified)

    @staticmethod
    def _verify(graph: Graph, when: str, done: list[str]) -> None:
        try:
            verify(graph)
        except VerificationError as err:
            ran = ", ".join(done) or "none"
            raise VerificationError(f"invalid IR {when} (passes run: {ran}): {err}") from None


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _where(pass_: Pass, done: list[str]) -> str:
    return f"in pass {pass_}, after: {', '.join(done) or 'no other pass'}"


def _format_option(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(_format_option(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_format_option(v)}" for k, v in value.items()) + "}"
    return str(value)


_STEP = re.compile(r"\s*([A-Za-z][A-Za-z0-9_-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str, registry: dict[str, type[Pass]]) -> list[Pass]:
    """Parse ``"name{opt=value,...},name,..."`` into pass instances from ``registry``."""
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _STEP.match(text, pos)
        if match is None or match.end() == pos:
            raise PassError(f"cannot parse pipeline at {text[pos:]!r}")
        name, options = match.group(1), match.group(2)
        cls = registry.get(name)
        if cls is None:
            raise PassError(f"unknown pass {name!r}; passes: {', '.join(sorted(registry))}")
        passes.append(_instantiate(cls, options or ""))
        pos = match.end()
    return passes


def _instantiate(cls: type[Pass], options: str) -> Pass:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_options(options))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            known = ", ".join(fields) or "none"
            raise PassError(f"pass {cls.name!r} has no option {key!r} (options: {known})")
        kwargs[key] = _parse_option(cls.name, key, raw.strip(), _default(fields[key]))
    return cls(**kwargs)


def _split_options(text: str) -> Iterable[str]:
    depth, start = 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def _parse_option(pass_name: str, key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw not in ("true", "false"):
                raise ValueError("expected true or false")
            return raw == "true"
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Mapping):
            raise ValueError("a mapping option is set from Python, not in a pipeline string")
        if isinstance(default, tuple):
            inner = raw.strip("[]")
            return tuple(int(x) for x in inner.split(",") if x.strip())
        return raw
    except ValueError as err:
        raise PassError(f"pass {pass_name!r} option {key}={raw!r}: {err}") from None
