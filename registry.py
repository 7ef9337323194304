"""A name -> builder table filled by a decorator at import time (the idea of timm's model registry)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from errors import UserError, did_you_mean

Builder = TypeVar("Builder", bound=Callable)


class Registry(Generic[Builder]):
    """Maps the names used in configs to builders; an unknown name lists the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        def add(builder: Builder) -> Builder:
            if name in self._builders:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            return builder
        return add

    def get(self, name: str) -> Builder:
        if name not in self._builders:
            raise UserError(f"unknown {self.kind} '{name}'{did_you_mean(name, self._builders)}; "
                            f"valid: {', '.join(self.names())}")
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)
