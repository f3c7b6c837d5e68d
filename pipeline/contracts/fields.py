"""Typed access to the fields of a JSON object, for the contracts' ``from_dict`` validators.

Every problem becomes one error that names the file (``where``) and the dotted field, so a user
can open the file and fix it: ``.../manifest.json: field 'latent.dtype' must be one of [...]``.
"""

from __future__ import annotations

import math
from typing import Any


class Fields:
    """The fields of one JSON object; ``path`` is its dotted position inside the file."""

    def __init__(self, data: Any, where: str, error: type[ValueError], path: str = "") -> None:
        if not isinstance(data, dict):
            what = f"field {path!r}" if path else "the document"
            raise error(f"{where}: {what} must be a JSON object, got {_kind(data)}")
        self.data = data
        self.where = where
        self.error = error
        self.path = path

    def name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str) -> ValueError:
        value = self.data.get(key)
        return self.error(
            f"{self.where}: field {self.name(key)!r} must be {expected}, got {value!r}"
        )

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, optional: bool = False) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise self.error(f"{self.where}: missing required field {self.name(key)!r}")
        return self.data[key]

    def str(
        self, key: str, *, optional: bool = False, choices: tuple[str, ...] | None = None
    ) -> str | None:
        value = self.raw(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "a string")
        if choices is not None and value not in choices:
            raise self.fail(key, f"one of {list(choices)}")
        return value

    def int(self, key: str, *, optional: bool = False, minimum: int | None = None) -> int | None:
        value = self.raw(key, optional)
        if value is None and optional:
            return None
        if not _is_int(value):
            raise self.fail(key, "an integer")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"an integer >= {minimum}")
        return int(value)

    def float(self, key: str, *, optional: bool = False, finite: bool = True) -> float | None:
        value = self.raw(key, optional)
        if value is None and optional:
            return None
        if not (_is_int(value) or isinstance(value, float)):
            raise self.fail(key, "a number")
        if finite and not math.isfinite(value):
            raise self.fail(key, "a finite number")
        return float(value)

    def dict(self, key: str, *, optional: bool = False) -> dict[str, Any] | None:
        value = self.raw(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, dict):
            raise self.fail(key, "a JSON object")
        return dict(value)

    def sub(self, key: str) -> Fields:
        """The nested object ``key`` (required)."""
        return Fields(self.raw(key), self.where, self.error, self.name(key))

    def list(self, key: str, *, optional: bool = False) -> list[Any] | None:
        value = self.raw(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, list):
            raise self.fail(key, "a JSON array")
        return list(value)

    def ints(
        self, key: str, *, optional: bool = False, length: int | None = None
    ) -> list[int] | None:
        """A list of integers (of ``length`` items when given)."""
        value = self.list(key, optional=optional)
        if value is None:
            return None
        if not all(_is_int(x) for x in value) or (length is not None and len(value) != length):
            size = f"{length} " if length is not None else ""
            raise self.fail(key, f"a list of {size}integers")
        return [int(x) for x in value]

    def strs(self, key: str) -> list[str]:
        value = self.list(key)
        if not all(isinstance(x, str) for x in value):
            raise self.fail(key, "a list of strings")
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
