"""The one exception type for mistakes in user input, and the 'did you mean' hint its messages use."""
from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A bad path, name, config value or input file. main.py prints the message alone (no traceback)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close (ood_detectors.base's rule)."""
    # imported here, on the error path, so that light tools importing this module (pipeline.tools.aggregate)
    # do not load torch and scikit-learn
    from ood_detectors.base import did_you_mean as library_rule
    return library_rule(name, choices)
