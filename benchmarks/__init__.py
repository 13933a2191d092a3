"""The benchmarks: scripts run from the repository's root as ``python -m benchmarks.NAME``
(see ``benchmarks/README.md``), so that they import ``examples`` and each other by name."""
