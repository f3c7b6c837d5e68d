"""What the encode driver can see of the cluster, cheaply: nodes alive, encoder actors by state,
resources. For progress lines, the stall watchdog and the capacity check before a pass."""

from __future__ import annotations

import logging
from collections import Counter

import ray

log = logging.getLogger("pipeline.encode.job")

# Ray Data names its actor-pool workers after this class (class_name "MapWorker(MapBatches(...))").
ACTOR_CLASS_MARK = "MapWorker"


def alive_nodes() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def encoder_actors() -> Counter:
    """Ray Data actor-pool workers of this job by state (ALIVE, RESTARTING, PENDING_CREATION..).

    Reads the GCS actor table, which works without the dashboard; an empty Counter if Ray's
    (private) accessor is unavailable in this Ray version.
    """
    try:
        from ray._private.state import state

        job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
        table = state.actor_table(None, job_id=job_id)
    except Exception:  # noqa: BLE001 - observation only: never fail the job for it
        return Counter()
    return Counter(
        info.get("State", "?")
        for info in table.values()
        if ACTOR_CLASS_MARK in str(info.get("ActorClassName", "")) and info.get("State") != "DEAD"
    )


def capacity_line() -> str:
    """'nodes 3 alive, encoder actors 2 alive, 1 restarting' (what progress lines show)."""
    try:
        nodes = alive_nodes()
    except Exception:  # noqa: BLE001
        return ""
    actors = encoder_actors()
    alive = actors.pop("ALIVE", 0)
    others = ", ".join(
        f"{n} {state.lower().replace('_', ' ')}" for state, n in sorted(actors.items())
    )
    return f"nodes {nodes} alive, encoder actors {alive} alive" + (f", {others}" if others else "")


def _fits(total: float, need: float) -> int:
    # Ray accounts fractional resources in units of 1/10,000; float floor division would not
    # (1.0 // 0.1 == 9.0).
    return int(round(total * 10_000)) // int(round(need * 10_000))


def actor_capacity(resources: dict[str, float], actor_cpus: float, actor_gpus: float) -> int:
    """How many encoder actors the cluster's (total) resources hold."""
    fits = [_fits(resources.get("CPU", 0), actor_cpus)] if actor_cpus > 0 else []
    if actor_gpus > 0:
        fits.append(_fits(resources.get("GPU", 0), actor_gpus))
    return min(fits) if fits else 0
