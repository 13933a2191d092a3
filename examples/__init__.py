"""Examples that live in the repository, not in the installed ``intq`` package.

:mod:`examples.zoo` builds the real offline models the tests, benchmarks and demo run on;
:mod:`examples.demo` is ``make demo``. Both need the ``dev`` extra and are run from the
repository's root (``python -m examples.demo``), which puts this package on the path.
"""
