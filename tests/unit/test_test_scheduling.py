"""The suite's xdist scheduler (tests/conftest.py): which tests share a worker, and which
--dist modes it takes over."""

from types import SimpleNamespace

import pytest

from tests.conftest import pytest_xdist_make_scheduler, work_unit

pytest.importorskip("xdist")


def test_own_cluster_modules_are_one_unit_and_other_modules_their_own():
    a = work_unit("tests/integration/test_ray_cluster_jobs.py::test_x")
    b = work_unit("tests/integration/test_encode_cluster.py::test_y[1]")
    assert a == b == "own-clusters"
    assert work_unit("tests/unit/test_keys.py::test_z") == "tests/unit/test_keys.py"


def _config(dist: str):
    option = SimpleNamespace(dist=dist, numprocesses=2, tx=["2*popen"], maxworkerrestart=None)
    return SimpleNamespace(getvalue=lambda name: getattr(option, name), option=option)


@pytest.mark.parametrize("dist", ["each", "worksteal", "loadfile", "loadgroup"])
def test_a_dist_mode_given_by_hand_keeps_xdists_own_scheduler(dist):
    assert pytest_xdist_make_scheduler(_config(dist), log=None) is None


@pytest.mark.parametrize("dist", ["load", "loadscope"])
def test_the_default_mode_gets_our_module_units(dist):
    scheduler = pytest_xdist_make_scheduler(_config(dist), log=None)
    assert scheduler._split_scope("tests/integration/test_train_lost_nodes.py::t") == "own-clusters"
    assert scheduler._split_scope("tests/unit/test_keys.py::t") == "tests/unit/test_keys.py"
