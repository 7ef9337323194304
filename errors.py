"""The one exception type for mistakes in user input, and the 'did you mean' hint its messages use."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A bad path, name, config value or input file. main.py prints the message alone (no traceback)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
