"""Progress lines of the encode job: images done / total, images/s, ETA, rejects so far."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("pipeline.encode.job")  # users filter on the job's logger


class Progress:
    """images done / total, images/s, ETA and rejects so far, at most every ``every_s``.

    Images count as done when their encoding reaches the driver; rejects are exact for
    committed units plus the rows of the current unit already known to be bad.
    """

    def __init__(self, total: int | None, done: int, rejects: int, every_s: float) -> None:
        self.total = total
        self.start_done = done
        self.done = done
        self.committed_rejects = rejects
        self.pending_rejects = 0  # rows of the unit in progress that carry a reason
        self.every_s = every_s
        self.start = time.monotonic()
        self.last = self.start

    def add_rows(self, rows: int, with_reason: int) -> None:
        self.done += rows
        self.pending_rejects += with_reason
        if time.monotonic() - self.last >= self.every_s:
            self.log()

    def unit_committed(self, rejects: int) -> None:
        self.committed_rejects += rejects
        self.pending_rejects = 0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def log(self) -> None:
        self.last = time.monotonic()
        total = "?" if self.total is None else str(self.total)
        log.info(
            "encoded %d/%s images (%.1f img/s, ETA %s), %d rejected so far",
            self.done,
            total,
            self.rate(),
            self._eta(),
            self.committed_rejects + self.pending_rejects,
        )

    def _eta(self) -> str:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return "?"
        seconds = int(max(self.total - self.done, 0) / rate)
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
