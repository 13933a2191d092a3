"""What every IR op means, in one layer below the passes and the backends.

- :mod:`~intq.semantics.numerics`: dyadic numbers and the rounding rules of requantization.
- :mod:`~intq.semantics.kernels`: the integer transformer kernels, written once against a
  small vocabulary of int64 operations that every backend implements.
- :mod:`~intq.semantics.numpy_eval`: the numpy meaning of every IR op and the interpreter
  over a graph: the oracle every backend and test compares with.
- :mod:`~intq.semantics.torch_eval`: the same float semantics in PyTorch, for autograd.
- :mod:`~intq.semantics.feeds`: what a graph's run-time inputs must be.

Passes, frontends and backends import these modules; nothing here imports a pass, a
frontend or a backend. This package imports none of its modules eagerly, so the op
definitions can read kernel facts without pulling in the interpreter.
"""
