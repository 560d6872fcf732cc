"""Hostile snippets against the real sandbox pool (Ray actors + zygotes): each must leave the sandbox up, give the
caller a clear result and leave the host unharmed; afterwards the pool still answers and no stray process is left."""

import asyncio
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from torl.config import SandboxConfig

CFG = SandboxConfig(
    num_workers=2,
    concurrency_per_worker=4,
    timeout_s=1.5,
    memory_mb=512,
    max_output_bytes=4096,
    max_processes=16,
    uid_base=230000,  # a range of its own, so stray checks cannot confuse it with other pools
    num_cpus=0.1,
)
UIDS: set[int] = set()  # the uids the pool's zygotes claimed (filled by the fixture)
HOST_FILE = Path(__file__).resolve().parents[2] / ".sandbox_hostile_marker"  # inside the checkout, outside scratch


@pytest.fixture(scope="module")
def pool(ray_cluster):
    import ray

    from actors.sandbox import SandboxPool

    p = SandboxPool.create(CFG, name="hostile")
    for info in ray.get([w.ready.remote() for w in p.workers]):
        UIDS.update(range(info["uid_base"], info["uid_base"] + info["uid_block"]))
    yield p
    p.shutdown()


def run(pool, code, session=None):
    return asyncio.run(pool.run(code, session))


def sandbox_pids():
    """Live processes running as one of this pool's snippet uids."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in UIDS:
                    out.append(int(entry))
            except FileNotFoundError:
                pass
    return out


def wait_no_strays(timeout=3.0):
    deadline = time.monotonic() + timeout
    while (left := sandbox_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(autouse=True)
def healthy_after(request, pool):
    yield
    res = run(pool, "print(6 * 7)")
    assert res.status == "ok" and res.stdout == "42\n", f"sandbox unhealthy after {request.node.name}: {res}"


# --- time -------------------------------------------------------------------------------------------------------


def test_infinite_loop_times_out(pool):
    t0 = time.monotonic()
    res = run(pool, "while True:\n    pass")
    assert res.status == "timeout" and time.monotonic() - t0 < 4
    assert "timed out" in res.stderr


def test_sleep_past_timeout(pool):
    res = run(pool, "import time\nprint('before', flush=True)\ntime.sleep(60)")
    assert res.status == "timeout" and res.stdout == "before\n" and res.wall_s < 3


def test_cpu_burn_in_threads_times_out(pool):
    code = (
        "import threading\ndef spin():\n    while True: pass\n"
        "for _ in range(4):\n    threading.Thread(target=spin).start()"
    )
    assert run(pool, code).status == "timeout"


# --- processes --------------------------------------------------------------------------------------------------


def test_fork_bomb(pool):
    res = run(pool, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert res.status in ("timeout", "killed", "error")
    assert not wait_no_strays()


def test_subprocess_bomb_hits_process_limit(pool):
    code = "import subprocess\nps = [subprocess.Popen(['sleep', '30']) for _ in range(100)]\nprint(len(ps))"
    res = run(pool, code)
    assert res.status == "error" and ("BlockingIOError" in res.stderr or "Resource temporarily" in res.stderr)
    assert not wait_no_strays()


def test_background_process_is_gone_afterwards(pool):
    code = (
        "import subprocess, os\n"
        "subprocess.Popen(['sleep', '987'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        import time; time.sleep(987)\n"
        "    os._exit(0)\n"
        "print('spawned')"
    )
    res = run(pool, code)
    assert res.status == "ok" and res.stdout == "spawned\n"
    assert not wait_no_strays()


def test_kill_parent(pool):
    res = run(pool, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert res.status == "error" and "PermissionError" in res.stderr


def test_kill_every_pid(pool):
    code = (
        "import os\nn = 0\nfor p in os.listdir('/proc'):\n    if p.isdigit() and int(p) != os.getpid():\n"
        "        try:\n            os.kill(int(p), 9)\n            n += 1\n"
        "        except OSError:\n            pass\nprint('killed', n)"
    )
    res = run(pool, code)
    assert res.status == "ok" and res.stdout == "killed 0\n"


def test_setuid_root_refused(pool):
    res = run(pool, "import os\nos.setuid(0)")
    assert res.status == "error" and "PermissionError" in res.stderr


def test_os_exit(pool):
    res = run(pool, "print('bye', flush=True)\nimport os\nos._exit(3)")
    assert res.status == "error" and res.exit_code == 3 and res.stdout == "bye\n"


def test_sys_exit_message(pool):
    res = run(pool, "import sys\nsys.exit('giving up')")
    assert res.status == "error" and res.exit_code == 1 and "giving up" in res.stderr


def test_self_signal(pool):
    res = run(pool, "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)")
    assert res.status == "killed" and res.exit_code == -15


def test_ctypes_segfault(pool):
    res = run(pool, "import ctypes\nctypes.string_at(0)")
    assert res.status == "killed" and res.exit_code == -11


def test_deep_recursion(pool):
    res = run(pool, "def f(n):\n    return f(n + 1)\nf(0)")
    assert res.status == "error" and "RecursionError" in res.stderr


def test_deep_recursion_with_raised_limit(pool):
    res = run(pool, "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)")
    assert res.status in ("killed", "error", "timeout")  # stack overflow, MemoryError, or still recursing


# --- memory and disk --------------------------------------------------------------------------------------------


def test_memory_bomb_single_allocation(pool):
    res = run(pool, "x = bytearray(4 * 1024**3)")
    assert res.status == "error" and "MemoryError" in res.stderr


def test_memory_bomb_growth(pool):
    res = run(pool, "chunks = []\nwhile True:\n    chunks.append(b' ' * 10**8)")
    assert res.status in ("error", "killed") and ("MemoryError" in res.stderr or res.status == "killed")


def test_numpy_memory_bomb(pool):
    res = run(pool, "import numpy as np\na = np.ones((50000, 50000))")
    assert res.status == "error" and "MemoryError" in res.stderr


def test_disk_fill_hits_file_size_limit(pool):
    res = run(pool, "with open('big', 'wb') as f:\n    for _ in range(1000):\n        f.write(b'0' * 2**20)")
    assert res.status == "error" and "File too large" in res.stderr


# --- output -----------------------------------------------------------------------------------------------------


def test_huge_stdout_is_capped_and_killed(pool):
    t0 = time.monotonic()
    res = run(pool, "while True:\n    print('x' * 10000)")
    assert res.status == "killed" and res.truncated and len(res.stdout) <= CFG.max_output_bytes
    assert time.monotonic() - t0 < 1.4  # killed at the cap, long before the timeout


def test_huge_raw_stderr_is_capped(pool):
    res = run(pool, "import os\nwhile True:\n    os.write(2, b'e' * 65536)")
    assert res.status == "killed" and res.truncated and len(res.stderr) < CFG.max_output_bytes + 200


def test_unicode_output(pool):
    res = run(pool, "print('héllo ∑ 🚀 — 你好')")
    assert res.status == "ok" and res.stdout == "héllo ∑ 🚀 — 你好\n"


def test_binary_output(pool):
    res = run(pool, "import sys\nsys.stdout.buffer.write(bytes(range(256)))")
    assert res.status == "ok" and res.stdout.startswith("\x00\x01\x02") and "\ufffd" in res.stdout


def test_closed_stdout(pool):
    res = run(pool, "import os, sys\nsys.stdout.close()\nprint('lost')")
    assert res.status == "error" and "ValueError" in res.stderr
    res = run(pool, "import os\nos.close(1)\nos.close(2)\nprint('lost')")
    assert res.status in ("ok", "error") and res.stdout == ""


# --- files, environment, network --------------------------------------------------------------------------------


def test_write_outside_scratch(pool):
    for path in (str(HOST_FILE), "/etc/torl_pwned", "/root/torl_pwned"):
        res = run(pool, f"open({path!r}, 'w').write('x')")
        assert res.status == "error" and ("PermissionError" in res.stderr or "FileNotFound" in res.stderr), res
        assert not Path(path).exists()


def test_tmp_writes_stay_private(pool):
    res = run(pool, "open('/tmp/torl_hostile_tmp', 'w').write('x')\nopen('/dev/shm/torl_hostile_shm', 'w').write('x')")
    assert res.status == "ok"
    assert not Path("/tmp/torl_hostile_tmp").exists() and not Path("/dev/shm/torl_hostile_shm").exists()
    assert run(pool, "import os\nprint(os.listdir('/tmp'))").stdout == "[]\n"  # the next snippet sees a clean dir


def test_environment_has_no_secrets(pool):
    res = run(pool, "import os\nprint(sorted(os.environ))")
    assert res.status == "ok"
    for bad in ("RAY", "WANDB", "VLLM", "API_KEY", "TOKEN", "SECRET"):
        assert bad not in res.stdout
    code = (
        "import os\nfound = []\nfor p in os.listdir('/proc'):\n    try:\n"
        "        data = open(f'/proc/{p}/environ', 'rb').read()\n    except OSError:\n        continue\n"
        "    if b'RAY_' in data or b'WANDB' in data:\n        found.append(p)\nprint(found)"
    )
    assert run(pool, code).stdout == "[]\n"


def test_home_secrets_unreadable(pool):
    # /root, if listable at all, shows only the re-exposed Python installation (when Python lives under it).
    shown = sorted({p.split("/")[2] for p in (sys.base_prefix, sys.prefix) if p.startswith("/root/")})
    res = run(pool, "import os\nprint(os.listdir('/root'))\nprint(open('/root/.netrc').read())")
    assert res.status == "error" and res.stdout.strip() in (str(shown), ""), res


def test_network_connection(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        for host in ("127.0.0.1", "1.1.1.1"):
            res = run(pool, f"import socket\nsocket.create_connection(({host!r}, {port}), timeout=1)")
            assert res.status == "error" and "OSError" in res.stderr or "refused" in res.stderr, res
    finally:
        server.close()


def _meet(name: str, role: str) -> str:
    """A snippet listening on (or connecting to) an abstract unix socket: a channel scoped to the network namespace."""
    if role == "listen":
        return (
            "import socket\ns = socket.socket(socket.AF_UNIX)\n"
            f"s.bind('\\0{name}')\ns.listen(1)\ns.settimeout(1.0)\n"
            "try:\n    s.accept()\n    print('met')\nexcept OSError:\n    print('alone')"
        )
    return (
        "import socket, time\ntime.sleep(0.3)\nc = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    c.connect('\\0{name}')\n    print('met')\nexcept OSError:\n    print('alone')"
    )


def test_concurrent_snippets_cannot_meet(pool):
    """Each slot has its own network namespace, so two snippets running at once share no socket namespace."""

    async def go():
        codes = [_meet("torl-meet", role) for _ in range(4) for role in ("listen", "connect")]
        return await asyncio.gather(*(pool.run(code) for code in codes))

    assert [r.stdout for r in asyncio.run(go())] == ["alone\n"] * 8


def test_listener_left_behind_dies_with_its_snippet(pool):
    """Slots (and their namespaces) are reused; what a snippet leaves running must not be there for the next one."""
    leave = (
        "import os, socket, time\nif os.fork() == 0:\n    os.setsid()\n    s = socket.socket(socket.AF_UNIX)\n"
        "    s.bind('\\0torl-left')\n    s.listen(1)\n    time.sleep(60)\ntime.sleep(0.2)\nprint('left')"
    )

    async def go():
        first = await asyncio.gather(*(pool.run(leave) for _ in range(CFG.concurrency_per_worker * CFG.num_workers)))
        later = await asyncio.gather(*(pool.run(_meet("torl-left", "connect")) for _ in range(8)))
        return first, later

    first, later = asyncio.run(go())
    assert all(r.stdout == "left\n" for r in first), first
    assert [r.stdout for r in later] == ["alone\n"] * 8
    assert not wait_no_strays()


# --- code errors and the script contract ------------------------------------------------------------------------


def test_syntax_error(pool):
    res = run(pool, "def f(:\n    pass")
    assert res.status == "error" and "SyntaxError" in res.stderr


def test_input_without_stdin(pool):
    res = run(pool, "x = input('number? ')")
    assert res.status == "error" and "EOFError" in res.stderr


def test_runs_as_main_script_without_echo(pool):
    res = run(pool, "1 + 1\nif __name__ == '__main__':\n    print('main')")
    assert res.status == "ok" and res.stdout == "main\n"


def test_concurrent_mix(pool):
    cases = [
        ("print(1)", "ok"),
        ("while True: pass", "timeout"),
        ("import sympy\nprint(sympy.factorint(360))", "ok"),
        ("1/0", "error"),
        ("import ctypes\nctypes.string_at(0)", "killed"),
        ("while True: print('y' * 1000)", "killed"),
        ("import time\ntime.sleep(30)", "timeout"),
        ("x = bytearray(4 * 1024**3)", "error"),
    ] * 2

    async def go():
        return await asyncio.gather(*(pool.run(code) for code, _ in cases))

    results = asyncio.run(go())
    assert [r.status for r in results] == [want for _, want in cases]
    assert results[2].stdout == "{2: 3, 3: 2, 5: 1}\n"


def test_no_stray_process_left(pool):
    assert not wait_no_strays()
