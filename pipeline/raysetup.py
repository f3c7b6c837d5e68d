"""Start or join Ray the same way for every command.

Inside `ray job submit` (or with RAY_ADDRESS set) we join that cluster; on a laptop we
start embedded Ray. Its dashboard binds to 127.0.0.1 only: exposing it is a deliberate
cluster-level decision (see deploy/), never a side effect of running a job. With Ray >= 2.59
token authentication is on for local clusters and ray.init handles the token itself.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start embedded Ray with `num_cpus`."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return
    log.info("starting embedded Ray (num_cpus=%s)", num_cpus or "all")
    context = ray.init(
        # "local": always a new embedded instance, never a cluster that some `ray start` on
        # this machine left recorded in /tmp/ray (joining is what RAY_ADDRESS is for).
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,  # also serves the state API Ray Train polls
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
    )
    log.info("Ray dashboard (localhost only): http://%s", context.dashboard_url)
