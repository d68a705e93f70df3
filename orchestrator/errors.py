"""The one-line error for bad input: the key, the value, what is wrong and what is allowed."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad config or input: names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str, problem: str = "invalid value"):
        self.key, self.value, self.allowed = key, value, allowed
        shown = "null" if value is None else value
        super().__init__(f"{key}={shown}: {problem}; {allowed}")
