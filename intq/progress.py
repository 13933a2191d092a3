"""When long work (calibration, sensitivity, tuning) shows a progress bar."""

from __future__ import annotations

import sys


def show_progress(progress: bool | None) -> bool:
    """``progress`` if given, else whether standard error is a terminal: a bar for a person
    watching, nothing in logs, pipes and CI."""
    if progress is not None:
        return progress
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty is not None and isatty())


__all__ = ["show_progress"]
