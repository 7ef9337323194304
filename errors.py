"""The one exception type for mistakes in user input, and the 'did you mean' hint its messages use."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A bad path, name, config value or input file. main.py prints the message alone (no traceback)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or '' when none is close; case is ignored first
    ('K' -> 'k'), then in the fuzzy match. ood_detectors.base has the same rule for the library's own messages:
    importing it from there would load torch and scikit-learn into every light tool (pipeline.aggregate)."""
    choices = list(choices)
    same_but_case = [choice for choice in choices if choice.lower() == name.lower()]
    by_lowercase = {choice.lower(): choice for choice in choices}
    close = same_but_case or [by_lowercase[match] for match in
                              difflib.get_close_matches(name.lower(), by_lowercase, n=1, cutoff=0.5)]
    return f" (did you mean '{close[0]}'?)" if close else ""
