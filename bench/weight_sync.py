"""Seconds per weight push and peak memory of each process: the file route vs the collective route.

    .venv/bin/python bench/weight_sync.py [--models tiny,smollm2] [--generators 1,2] [--pushes 3]
                                          [--routes file,collective]

For each model (the CPU default ``configs/tiny_cpu.yaml``; SmolLM2-135M from ``configs/smollm2_cpu.yaml``, 135M
parameters, 0.54 GB in fp32), each route (``rollout.weight_sync=file|collective``) and each generator count, it starts
the real actors as training does (one learner rank, N vLLM generators), pushes once to warm up, resets every
process's peak-RSS mark (``/proc/<pid>/clear_refs``), pushes ``--pushes`` times, and reports the median seconds per
push as the driver sees it (learner to every engine loaded) and each process's peak RSS during the pushes: learner
rank 0, each generator actor and each generator's engine-core process. ``peak - base`` is what the pushes added on
top of the process's resting RSS, the part a route is responsible for. Ratios are the second route / the first
within one run (collective / file by default). No tools, no rollouts: nothing else runs during the pushes.
``--routes collective`` measures one route (one set of actors per model and count instead of two; no ratios).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # jobs/ is not an installed package
PRESETS = {"tiny": REPO / "configs" / "tiny_cpu.yaml", "smollm2": REPO / "configs" / "smollm2_cpu.yaml"}


def _pid(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _mem_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(preset: Path, route: str, n_gen: int, pushes: int, extra: list[str]) -> dict:
    import ray

    from actors.learner_group import LearnerGroup
    from jobs.run import push_weights, spawn_rollout_actors, stop_rollout_actors
    from jobs.setup_run import ensure_model, with_absolute_paths
    from torl.config_load import load_config

    overrides = [f"rollout.weight_sync={route}", f"rollout.num_generators={n_gen}", "tool.enabled=false", *extra]
    cfg = with_absolute_paths(load_config([str(preset)], overrides))
    model_path = ensure_model(cfg)
    _, generators, grader, placement = spawn_rollout_actors(cfg, model_path)
    learner = LearnerGroup(cfg, model_path)
    try:
        ray.get([g.start.remote() for g in generators])
        if route == "collective":
            learner.connect_generators(generators)
        push_weights(cfg, learner, generators, 1)  # warm-up: first-time allocations are not the route's cost
        pids = {"learner rank 0": _pid(learner.actors[0])}
        for i, g in enumerate(generators):
            pids[f"generator {i}"] = pid = _pid(g)
            for child in psutil.Process(pid).children(recursive=True):
                if "EngineCore" in " ".join(child.cmdline()) or "VLLM" in child.name():
                    pids[f"generator {i} engine"] = child.pid
        base = {k: _mem_mb(p)[0] for k, p in pids.items()}
        for p in pids.values():
            _reset_peak(p)
        times = []
        for v in range(2, 2 + pushes):
            t0 = time.perf_counter()
            push_weights(cfg, learner, generators, v)
            times.append(time.perf_counter() - t0)
        peaks = {k: (base[k], _mem_mb(p)[1]) for k, p in pids.items()}
        peaks["seconds"] = statistics.median(times)
        return peaks
    finally:
        learner.shutdown()
        stop_rollout_actors(None, generators, grader, placement)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--generators", default="1,2")
    ap.add_argument("--pushes", type=int, default=3)
    ap.add_argument("--routes", default="file,collective", help="rollout.weight_sync routes to measure, in order")
    ap.add_argument("overrides", nargs="*", help="config overrides for both routes (rollout.weight_sync_bucket_mb=64)")
    args = ap.parse_args()

    routes = args.routes.split(",")
    if set(routes) - {"file", "collective"} or len(set(routes)) != len(routes):
        ap.error(f"--routes takes file, collective or both, comma-separated (got {args.routes!r})")
    both = len(routes) == 2

    from actors.cluster import init_ray

    init_ray(num_cpus=8)
    for model in args.models.split(","):
        for n_gen in [int(x) for x in args.generators.split(",")]:
            results = {r: measure(PRESETS[model], r, n_gen, args.pushes, args.overrides) for r in routes}
            print(f"\n== {model}, {n_gen} generator(s): median of {args.pushes} pushes ==")
            print(f"{'':24}" + "".join(f"{r:>24}" for r in routes) + (f"{'ratio':>8}" if both else ""))
            ratio = (lambda a, b: f"{b / a:>8.2f}") if both else (lambda a, b: "")  # noqa: E731 - second / first
            secs = [results[r]["seconds"] for r in routes]
            print(f"{'seconds per push':24}" + "".join(f"{s:>24.3f}" for s in secs) + ratio(secs[0], secs[-1]))
            cell = lambda base, peak: f"{peak:8.0f} MB (+{peak - base:6.0f})"  # noqa: E731
            for proc in [k for k in results[routes[0]] if k != "seconds"]:
                pairs = [results[r].get(proc, (0.0, 0.0)) for r in routes]
                cells = "".join(f"{cell(base, peak):>24}" for base, peak in pairs)
                print(f"{'peak RSS ' + proc:24}{cells}" + ratio(pairs[0][1], pairs[-1][1]))
            largest = [max(v[1] for k, v in results[r].items() if k != "seconds") for r in routes]
            print(
                f"{'largest process':24}"
                + "".join(f"{mb:>21.0f} MB" for mb in largest)
                + ratio(largest[0], largest[-1])
            )


if __name__ == "__main__":
    main()
