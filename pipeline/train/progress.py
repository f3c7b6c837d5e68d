"""The console line of every logging interval: where the run is and how long it has to go.

    step 120/400  loss 0.1234  recon 0.1102  kl 1.2e+03  85.3 img/s  ETA 3m12s

The rate is the interval's (images over all ranks per second); the ETA is the remaining steps at
the mean step time since this process started training, so one slow interval (a checkpoint, a
reconstruction grid) does not swing it, and a resumed run's ETA counts only what is left.
"""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``, ``3d04h``: two units at most, rounded down."""
    total = max(int(seconds), 0)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress(
    step: int,
    total: int,
    terms: dict[str, float],
    images_per_s: float,
    eta_s: float | None,
) -> str:
    """One log line: step/total, each term, the rate and the ETA (``ETA -`` when unknown)."""
    values = "  ".join(f"{name} {value:.4g}" for name, value in terms.items())
    eta = "-" if eta_s is None else format_duration(eta_s)
    parts = [f"step {step}/{total}", values, f"{images_per_s:.1f} img/s", f"ETA {eta}"]
    return "  ".join(p for p in parts if p)


class Progress:
    """Remembers where and when this process started training, for the ETA."""

    def __init__(self, start_step: int, total: int, clock=time.perf_counter) -> None:
        self.start_step = start_step
        self.total = total
        self.clock = clock
        self.started = clock()

    def eta_s(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (self.clock() - self.started) / done * max(self.total - step, 0)

    def line(self, step: int, terms: dict[str, float], images_per_s: float) -> str:
        return format_progress(step, self.total, terms, images_per_s, self.eta_s(step))
