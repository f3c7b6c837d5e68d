"""Bounded retries with exponential backoff for writes to a run's storage.

An object store that restarts or drops connections for a few seconds should cost a run a
few seconds, not the run: checkpoint uploads and metrics.jsonl writes go through
`with_retries`. The bound keeps a store that is really gone (or wrong credentials) from
hanging the run: after `attempts` tries the last error is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("latentpipe.train")

T = TypeVar("T")

MAX_BACKOFF_S = 30.0


def transient(err: BaseException) -> bool:
    """Anything storage libraries raise; not bugs, whose retrying only delays the traceback."""
    return not isinstance(err, (TypeError, AttributeError, NameError, AssertionError))


def backoff_delays(attempts: int, backoff_s: float) -> list[float]:
    """Seconds waited after each failed try but the last: backoff_s, 2x, 4x, ... capped."""
    return [min(backoff_s * 2**i, MAX_BACKOFF_S) for i in range(max(attempts - 1, 0))]


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int,
    backoff_s: float,
    retryable: Callable[[BaseException], bool] = transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, tried up to `attempts` times while its errors are `retryable`; logs each
    failure and the wait before the next try."""
    delays = backoff_delays(attempts, backoff_s)
    for attempt in range(1, attempts + 1):
        try:
            result = fn()
        except Exception as err:
            if not retryable(err):
                raise
            if attempt == attempts:
                log.error("%s failed %d times, giving up: %s", what, attempts, _short(err))
                raise
            wait = delays[attempt - 1]
            log.warning(
                "%s failed (try %d of %d: %s); retrying in %.1f s",
                what,
                attempt,
                attempts,
                _short(err),
                wait,
            )
            sleep(wait)
        else:
            if attempt > 1:
                log.info("%s succeeded on try %d of %d", what, attempt, attempts)
            return result
    raise AssertionError("unreachable")  # attempts < 1 is refused by check_run_config


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text[:300]}"
