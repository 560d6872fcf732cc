"""Integration fixtures: one local Ray cluster for the whole session (starting Ray per test costs ~5 s each).

Every test here carries the ``integration`` marker, and ``slow`` unless its module is in ``FAST``: the fast tier
(``pytest -m "not slow"``, under 3 minutes on a 2-core machine) is the unit suite, these modules and the bench smoke
runs; the full suite (the README's command, what CI runs) is everything. A new integration module is slow until it
is measured and listed here: the tier's budget is not spent by accident.
"""

import os

import pytest

# A few seconds each on a 2-core CPU machine (docs/testing.md has the durations): no vLLM engine, learner group, Serve
# app or training job of their own. test_benches.py is the exception (about 2 minutes with its scripts run two at a
# time, five of the nine starting vLLM): the fast tier must include it so a benchmark cannot rot.
# test_install_resolves.py is left out, as it asks the package indexes (seconds each, and nothing an edit of the code
# changes).
FAST = {
    "test_benches.py",
    "test_convert.py",
    "test_grader.py",
    "test_preflight_only.py",
    "test_prepare_data.py",
    "test_vllm_api.py",
}

# A stopping direct-ingress replica (serve.ingress=haproxy) keeps serving 30 s by default so that external load
# balancers can deregister it; no test has one, and test_serve.py's HAProxy app took those 30 s to shut down. Set
# before any Ray cluster of the session starts: its processes inherit this process's environment.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


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
        path = item.path
        if path.parent.name == "integration" and path.parent.parent.name == "tests":
            item.add_marker(pytest.mark.integration)
            if path.name not in FAST:
                item.add_marker(pytest.mark.slow)
