"""Benchmark of the sandbox pool: executions/s and p50/p99 latency vs a fresh ``python -c`` process per snippet.

Workloads: (a) ``print(1)``, (b) a sympy snippet, (c) a mix in which 5 % of snippets run past the timeout. Each at
1, 2 and 8 concurrent callers, through the real Ray pool at each ``sandbox.isolation`` level asked for (the
``isolation`` column shows the level asked for and the one reached, e.g. ``strict:full``), and the same through
``subprocess.run`` of a fresh interpreter (no isolation at all) as the baseline, in the same run. Prints a table
and the ratios. To measure what a non-root user gets, run it as one, e.g. with the test environments' launcher:
``python tests/integration/sandbox_envs.py non-root -- .venv/bin/python bench/sandbox.py`` (as root).

    python bench/sandbox.py [--isolation strict,best,none] [--workers 2] [--per-worker 4] [--n 300] [--timeout 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.cluster import init_ray  # noqa: E402
from actors.sandbox import SandboxPool  # noqa: E402
from torl.config import SandboxConfig  # noqa: E402

SYMPY = "import sympy\nx = sympy.Symbol('x')\nprint(sympy.factorint(2**20 * 3**7 + 1), sympy.solve(x**2 - 5*x + 6, x))"
FAST_MIX = ["print(sum(range(1000)))", SYMPY, "import numpy as np\nprint(np.linalg.det(np.eye(3) * 2))", "1/0"]
SLOW = "import time\ntime.sleep(60)"


def workload(name: str, n: int) -> list[str]:
    if name == "print(1)":
        return ["print(1)"] * n
    if name == "sympy":
        return [SYMPY] * n
    return [SLOW if i % 20 == 19 else FAST_MIX[i % len(FAST_MIX)] for i in range(n)]  # 5 % timeouts


def summarize(lat: list[float], elapsed: float) -> dict[str, float]:
    lat = sorted(lat)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return {"rate": len(lat) / elapsed, "p50_ms": statistics.median(lat) * 1e3, "p99_ms": p99 * 1e3}


async def pool_run(pool: SandboxPool, codes: list[str], callers: int) -> tuple[dict[str, float], dict[str, int]]:
    queue = list(reversed(codes))
    lat: list[float] = []
    statuses: dict[str, int] = {}

    async def caller() -> None:
        while queue:
            code = queue.pop()
            t0 = time.perf_counter()
            res = await pool.run(code)
            lat.append(time.perf_counter() - t0)
            statuses[res.status] = statuses.get(res.status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return summarize(lat, time.perf_counter() - t0), statuses


def fresh_run(codes: list[str], callers: int, timeout: float) -> dict[str, float]:
    def one(code: str) -> float:
        t0 = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            pass
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(callers) as ex:
        lat = list(ex.map(one, codes))
    return summarize(lat, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-worker", type=int, default=4)
    ap.add_argument("--n", type=int, default=300, help="snippets per pool cell")
    ap.add_argument("--n-fresh", type=int, default=40, help="snippets per fresh-process cell")
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--callers", default="1,2,8")
    ap.add_argument("--isolation", default="strict,best,none", help="sandbox.isolation levels, one pool each")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_ray(num_cpus=4)
    callers_list = [int(c) for c in args.callers.split(",")]
    names = ("print(1)", "sympy", "mix")
    base = {(n, c): fresh_run(workload(n, args.n_fresh), c, args.timeout) for n in names for c in callers_list}
    print(f"load average before: {os.getloadavg()}")
    print(
        f"{'isolation':13} {'workload':10} {'callers':>7} | {'pool/s':>8} {'p50 ms':>8} {'p99 ms':>8} | "
        f"{'fresh/s':>8} {'p50 ms':>8} {'p99 ms':>8} | {'ratio':>6}  statuses"
    )
    for level in args.isolation.split(","):
        cfg = SandboxConfig(
            num_workers=args.workers,
            concurrency_per_worker=args.per_worker,
            timeout_s=args.timeout,
            num_cpus=0.1,
            isolation=level,
        )
        pool = SandboxPool.create(cfg, name=f"bench_sandbox_{level}")
        reached = f"{level}:{pool.isolation_level()}"
        try:
            asyncio.run(pool_run(pool, ["print(1)", SYMPY] * 20, 4))  # warm both workers
            for name in names:
                for callers in callers_list:
                    n = args.n if name != "mix" else max(args.n // 2, 40)
                    ours, statuses = asyncio.run(pool_run(pool, workload(name, n), callers))
                    fresh = base[name, callers]
                    print(
                        f"{reached:13} {name:10} {callers:>7} | {ours['rate']:8.1f} {ours['p50_ms']:8.1f} "
                        f"{ours['p99_ms']:8.1f} | {fresh['rate']:8.1f} {fresh['p50_ms']:8.1f} "
                        f"{fresh['p99_ms']:8.1f} | "
                        f"{ours['rate'] / fresh['rate']:5.1f}x  {statuses}",
                        flush=True,
                    )
        finally:
            pool.shutdown()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
