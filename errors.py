"""The one exception type for mistakes in user input; its messages' 'did you mean' hint is the library's."""
from __future__ import annotations

from ood_detectors.base import did_you_mean

__all__ = ["UserError", "did_you_mean"]


class UserError(Exception):
    """A bad path, name, config value or input file. main.py prints the message alone (no traceback)."""
