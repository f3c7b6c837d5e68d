"""Start or join Ray the same way for every command.

Inside `ray job submit` (or with RAY_ADDRESS set) we join that cluster; on a laptop we
start embedded Ray. The dashboard, when started, binds to localhost only: exposing it is a
deliberate cluster-level decision (see deploy/), never a side effect of running a job.
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
    # Quiet, plain progress on embedded runs; a cluster's job logs keep Ray's defaults.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
        return
    log.info("starting embedded Ray (num_cpus=%s)", num_cpus or "all")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        configure_logging=True,
    )
