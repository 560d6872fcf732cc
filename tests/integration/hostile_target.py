"""The sandbox under attack in one test environment: the pool (root) or a zygote started in the environment, the
processes that must survive, the strays a snippet may leave; fixtures shared by the hostile suites
(``test_sandbox_hostile.py``: one snippet against the host; ``test_sandbox_between.py``: snippets against each
other and against the pool)."""

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from sandbox_envs import ENVS, Env, EnvZygote

from torl.config import SandboxConfig

CFG = SandboxConfig(
    num_workers=2,
    concurrency_per_worker=4,
    timeout_s=1.5,
    memory_mb=512,
    max_output_bytes=4096,
    max_processes=16,
    scratch_mb=128,
    uid_base=230000,  # a range of its own, so stray checks cannot confuse it with other pools
    num_cpus=0.1,
)
ROOT = Path(__file__).resolve().parents[2]
HOST_FILE = ROOT / ".sandbox_hostile_marker"  # inside the checkout, outside scratch
SECRET = "torl-hostile-secret-7f3a"


class Target:
    """The sandbox under test in one environment: ``run`` like the pool's, the processes that must survive, strays."""

    def __init__(self, env: Env, request) -> None:
        self.env = env
        self.level = "strict" if env.strict_starts else "best"
        cfg = SandboxConfig(**{**CFG.__dict__, "isolation": self.level})
        self.pool = self.zygote = None
        if env.name == "root":
            import ray

            from actors.sandbox import SandboxPool

            request.getfixturevalue("ray_cluster")
            self.pool = SandboxPool.create(cfg, name="hostile")
            self.infos = ray.get([w.ready.remote() for w in self.pool.workers])
            self.workers = [i["worker_pid"] for i in self.infos]
        else:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self.thread.start()
            self.zygote = EnvZygote(cfg, env)
            self.call(self.zygote.start())
            self.infos = [self.zygote.info]
            self.workers = [os.getpid()]  # the zygote's client: here, this test process
        self.uids = {
            u
            for i in self.infos
            if i["isolation"]["identity"] == "uid"
            for u in range(i["uid_base"], i["uid_base"] + i["uid_block"])
        }

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def run(self, code: str, session: str | None = None):
        if self.pool is not None:
            return await self.pool.run(code, session)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.zygote.run(code, session), self.loop))

    async def close_session(self, session: str) -> None:
        if self.pool is not None:
            await self.pool.close_session(session)
        else:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.zygote.close_session(session), self.loop))

    @property
    def report(self) -> dict:
        return self.infos[0]["isolation"]

    def protected(self) -> list[int]:
        """Processes no snippet may kill: the zygotes, their forkers and their clients (Ray workers, or this test)."""
        return [i["pid"] for i in self.infos] + [i["forker_pid"] for i in self.infos] + self.workers

    def strays(self) -> list[int]:
        """Live processes a snippet started: by snippet uid (root), else by the zygote's uid minus the zygote and
        the inits of its PID namespaces."""
        zygotes = {i["pid"] for i in self.infos} | {i["forker_pid"] for i in self.infos}
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in zygotes:
                continue
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
                if self.uids:
                    if uid in self.uids:
                        out.append(int(entry))
                elif uid == self.env.uid:
                    with open(f"/proc/{entry}/status") as f:
                        nspid = next(line for line in f if line.startswith("NSpid:")).split()
                    if nspid[-1] != "1":
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, StopIteration):
                pass
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        else:
            self.call(self.zygote.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


@pytest.fixture(scope="module", params=list(ENVS))
def pool(request):
    if shutil.which("setpriv") is None and request.param != "root":
        pytest.skip("needs util-linux setpriv")
    target = Target(ENVS[request.param], request)
    yield target
    target.close()


def run(pool, code, session=None):
    return asyncio.run(pool.run(code, session))


def wait_no_strays(pool, timeout=3.0):
    deadline = time.monotonic() + timeout
    while (left := pool.strays()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def healthy_after(request, pool):
    before = pool.protected()
    yield
    res = run(pool, "print(6 * 7)")
    assert res.status == "ok" and res.stdout == "42\n", f"sandbox unhealthy after {request.node.name}: {res}"
    if pool.pool is not None:  # the Ray workers' zygotes: same processes as before (none was killed and restarted)
        import ray

        infos = ray.get([w.ready.remote() for w in pool.pool.workers])
        assert [i["pid"] for i in infos] + [i["forker_pid"] for i in infos] + [
            i["worker_pid"] for i in infos
        ] == before
    else:
        assert pool.zygote.info["pid"] == before[0] and pool.zygote.restarts == 0
