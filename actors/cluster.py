"""Connecting to (or starting) the Ray cluster the same way from jobs, tests and benchmarks.

On this kind of machine Ray picks a non-loopback address unless told otherwise, and token authentication is on by
default for local clusters (docs/platform-notes.md §2). ``init_ray`` binds a local cluster to loopback and leaves an
existing cluster (``ray job submit``, ``RAY_ADDRESS``) alone. Not here: placement of actors (each role does its own).
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)

# Loopback addresses: right for the embedded local cluster only. On a real cluster each node finds its own address,
# so these are never pushed to the workers of a cluster the job connects to.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # makes Ray's node IP 127.0.0.1 (docs/platform-notes.md §2)
    "VLLM_HOST_IP": "127.0.0.1",
}
# Every process of any cluster: model hubs offline (models are paths), quiet loaders, and OpenMP threads that sleep
# at a barrier instead of spinning. torch's libgomp spins by default: a learner rank with two intra-op threads on 2
# cores, with anything else computing on the machine (another job, a second test worker), waits at every barrier for
# a descheduled thread while its spinning one burns the core; the CPU learning run took 205 s instead of 61 s beside
# a one-core busy loop (docs/platform-notes.md §16). Read when libgomp loads, i.e. at process start.
LOCAL_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' per-load weight bars in every actor, for tiny files
}


def apply_local_env(loopback: bool = True) -> None:
    """Set the offline variables, and with ``loopback`` the loopback ones, in this process (children inherit them)
    without overriding the user's."""
    for key, value in {**LOCAL_ENV, **(LOOPBACK_ENV if loopback else {})}.items():
        os.environ.setdefault(key, value)


def init_ray(address: str = "", num_cpus: int = 0) -> None:
    """Connect to ``address`` / ``RAY_ADDRESS`` if given, else start a loopback-only local cluster.

    Idempotent: does nothing when Ray is already initialised in this process.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    apply_local_env(loopback=not address)
    if address:
        log.info("connecting to Ray cluster at %s", address)
        runtime_env = {"env_vars": {k: os.environ[k] for k in LOCAL_ENV}}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    runtime_env = {"env_vars": {k: os.environ[k] for k in {**LOCAL_ENV, **LOOPBACK_ENV}}}
    kwargs = {"num_cpus": num_cpus} if num_cpus else {}
    # Ray's INFO lines (token file written, instance started) are routine; its warnings still print.
    ray.init(
        include_dashboard=False, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING, **kwargs
    )
    log.info("started a local Ray cluster on loopback: %s", ray.cluster_resources())
