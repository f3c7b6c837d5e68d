"""Progress lines of the encode job: images done / total, images/s, ETA, rejects so far, input
shards committed, and the cluster capacity the job runs on (nodes and encoder actors alive)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("pipeline.encode.job")  # users filter on the job's logger


class Progress:
    """Counts per committed unit (the driver sees nothing finer), logged every ``every_s``."""

    def __init__(self, total: int | None, units: int, every_s: float) -> None:
        self.total = total  # images in the input (from its index.json files), None if unknown
        self.units = units
        self.done = 0  # images of committed units
        self.done_units = 0
        self.rejects = 0
        self.start_done = 0
        self.start_units = 0  # units committed by earlier runs (not this run's pace)
        self.every_s = every_s
        self.start = time.monotonic()
        self.last_log = self.start
        self.last_commit = self.start
        self.first_commit_s: float | None = None  # start-up: time to the first commit

    def resumed(self, images: int, units: int, rejects: int) -> None:
        """Units committed by earlier runs: counted as done, not in this run's rate."""
        self.done += images
        self.start_done += images
        self.done_units += units
        self.start_units += units
        self.rejects += rejects

    def unit_committed(self, rows: int, rejects: int) -> None:
        now = time.monotonic()
        self.done += rows
        self.done_units += 1
        self.rejects += rejects
        self.last_commit = now
        if self.first_commit_s is None:
            self.first_commit_s = now - self.start

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def maybe_log(self, capacity: Callable[[], str]) -> None:
        if time.monotonic() - self.last_log >= self.every_s:
            self.log(capacity())

    def log(self, capacity: str = "") -> None:
        self.last_log = time.monotonic()
        total = "?" if self.total is None else str(self.total)
        log.info(
            "encoded %d/%s images (%.1f img/s, ETA %s), %d rejected so far; "
            "%d/%d input shards committed%s",
            self.done,
            total,
            self.rate(),
            self._eta(),
            self.rejects,
            self.done_units,
            self.units,
            f"; {capacity}" if capacity else "",
        )

    def _eta(self) -> str:
        rate = self.rate()
        if rate <= 0:
            return "?"
        if self.total is not None:
            seconds = int(max(self.total - self.done, 0) / rate)
        else:  # no image count: extrapolate from the input shards committed in this run
            done = self.done_units - self.start_units
            left = self.units - self.done_units
            seconds = int(left * (time.monotonic() - self.start) / max(done, 1))
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
