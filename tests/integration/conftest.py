"""Integration fixtures: one local Ray cluster for the whole session (starting Ray per test costs ~5 s each)."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from actors.cluster import init_ray

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray(num_cpus=int(os.environ.get("TORL_TEST_RAY_CPUS", "8")))
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
