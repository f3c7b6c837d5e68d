"""Start or join Ray the same way for every command.

Inside `ray job submit` (or with RAY_ADDRESS set) we join that cluster; on a laptop we
start embedded Ray. Its dashboard binds to 127.0.0.1 only: exposing it is a deliberate
cluster-level decision (see deploy/), never a side effect of running a job. With Ray >= 2.59
token authentication is on for local clusters and ray.init handles the token itself; joining
a cluster needs RAY_AUTH_MODE=token and its token in the environment (README, "Running on a
Ray cluster"): inside a job, the node's raylet passes both on.
"""

from __future__ import annotations

import json
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
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=_workers_env(address))
        return
    log.info("starting embedded Ray (num_cpus=%s)", num_cpus or "all")
    _quiet_token_auth_notice()
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


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_token_auth_notice() -> None:
    """Ray turns token authentication on for every new local instance, which is what we want,
    and then warns on every run that it did, suggesting RAY_AUTH_MODE=disabled. Drop just that
    warning (its sibling, "Token authentication is disabled", still shows). Setting
    RAY_AUTH_MODE=token here instead is not an option: Ray caches the mode when it is imported
    (the GCS would then want a token this driver does not send)."""
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropMessage) for f in notice.filters):
        notice.addFilter(_DropMessage("Set RAY_AUTH_MODE=disabled to opt out"))


def _workers_env(address: str) -> dict | None:
    """The job's workers get the cluster's address too, as its driver did (``ray job submit``
    sets RAY_ADDRESS for the driver only).

    Ray code running in a worker that looks the cluster up without an address, such as Ray
    Train's PlacementGroupCleaner asking the state API whether the controller still lives,
    otherwise searches the machine for a Ray instance: with two on it (test clusters, shared
    machines) its monitor thread dies with "Found multiple active Ray instances", or asks the
    newest instance, which may not be ours. Added to the job's runtime environment (Ray
    merges it variable by variable), unless the job already sets RAY_ADDRESS itself.
    """
    if "://" in address or address == "auto":  # not a GCS address the workers could use
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    if "RAY_ADDRESS" in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {"RAY_ADDRESS": address}}
