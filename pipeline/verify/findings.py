"""What a verify run found: errors (the corpus is wrong) and warnings (worth knowing)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger("latentpipe.verify")

MAX_LISTED = 10  # keys named per error message; the count is always complete


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        log.error("%s", message)
        self.errors.append(message)

    def warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)


def listed(keys: list[str]) -> str:
    """The first MAX_LISTED keys, and how many more there are."""
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    return shown + (f" (+{len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")
