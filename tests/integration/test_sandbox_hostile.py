"""Hostile snippets against the real sandbox: each must leave the sandbox up, give the caller a clear result and
leave the host unharmed; afterwards the sandbox still answers and no stray process is left.

The whole suite runs in each environment of ``sandbox_envs`` (root, root without CAP_SYS_ADMIN, a Docker-like
seccomp profile, a non-root user, a non-root user without user namespaces): in the first through the Ray pool, in
the others through a zygote started in that environment. Where ``sandbox.isolation=strict`` refuses, the suite runs
under ``best``, and checks what the layers that are left contain.
"""

# ruff: noqa: F811 - the fixtures imported from hostile_target are test parameters here

import asyncio
import errno
import os
import pwd
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hostile_target import CFG, HOST_FILE, ROOT, SECRET, healthy_after, pool, run, wait_no_strays  # noqa: F401

from torl.infra.paths import weight_dir


def test_reported_level(pool):
    """strict where the environment has every layer; elsewhere best, reporting exactly what it lacks."""
    want = {"docker-seccomp": ["namespaces"], "non-root-no-userns": ["identity", "namespaces"]}
    report = pool.report
    assert report["requested"] == pool.level and report["missing"] == want.get(pool.env.name, [])
    assert report["level"] == ("full" if pool.env.strict_starts else "partial")
    assert report["seccomp"] and report["landlock"] >= 1
    assert report["identity"] == {"non-root": "userns", "non-root-no-userns": None}.get(pool.env.name, "uid")


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
    assert not wait_no_strays(pool)


def test_subprocess_bomb_hits_process_limit(pool):
    code = "import subprocess\nps = [subprocess.Popen(['sleep', '30']) for _ in range(100)]\nprint(len(ps))"
    res = run(pool, code)
    if pool.report["identity"] is not None:  # else RLIMIT_NPROC is a ceiling shared with the trainer's user
        assert res.status == "error" and ("BlockingIOError" in res.stderr or "Resource temporarily" in res.stderr)
    assert not wait_no_strays(pool)


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
    assert not wait_no_strays(pool)


def test_kill_minus_one(pool):
    """kill(-1) signals every process the caller may signal: none of the trainer's (``healthy_after`` checks)."""
    res = run(
        pool, "import os\ntry:\n    os.kill(-1, 9)\nexcept OSError as e:\n    print(type(e).__name__)\nprint('alive')"
    )
    assert res.status == "ok" and res.stdout.endswith("alive\n"), res


def test_kill_zygote_and_worker_by_pid(pool):
    targets = pool.protected()
    code = (
        f"import os\nfor p in {targets!r}:\n    try:\n        os.kill(p, 9)\n        print('killed', p)\n"
        "    except OSError as e:\n        print(type(e).__name__)"
    )
    res = run(pool, code)
    assert res.status == "ok" and "killed" not in res.stdout, res
    assert set(res.stdout.split()) <= {"PermissionError", "ProcessLookupError"}


def test_kill_every_pid(pool):
    code = (
        f"import os\nfor p in range(1, {max(pool.protected()) + 1}):\n    if p != os.getpid():\n        try:\n"
        "            os.kill(p, 9)\n        except OSError:\n            pass\nprint('done')"
    )
    res = run(pool, code)
    assert res.status == "ok" and res.stdout == "done\n", res


def test_setuid_root_refused(pool):
    res = run(pool, "import os\nos.setuid(0)")
    # EINVAL in a user namespace where uid 0 is not mapped, EPERM elsewhere
    assert res.status == "error" and ("PermissionError" in res.stderr or "Invalid argument" in res.stderr), res


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
    """Growth meets the address-space limit (RLIMIT_AS) as a MemoryError. The chunks are bytes(10**8): mapped, not
    touched, so the limit is reached in microseconds. Touched chunks (b' ' * 10**8) took 0.3 s of page faults to
    reach 512 MB on an idle machine, which a loaded one stretched past the 1.5 s timeout (the root and non-root
    environments, in one suite run beside the other worker); without the limit, untouched growth runs into the
    timeout and fails here."""
    res = run(pool, "chunks = []\nwhile True:\n    chunks.append(bytes(10**8))")
    assert res.status in ("error", "killed") and ("MemoryError" in res.stderr or res.status == "killed")


def test_numpy_memory_bomb(pool):
    res = run(pool, "import numpy as np\na = np.ones((50000, 50000))")
    assert res.status == "error" and "MemoryError" in res.stderr


def test_disk_fill_hits_file_size_limit(pool):
    res = run(pool, "with open('big', 'wb') as f:\n    for _ in range(1000):\n        f.write(b'0' * 2**20)")
    assert res.status == "error" and "File too large" in res.stderr


# --- output -----------------------------------------------------------------------------------------------------


def test_huge_stdout_is_capped_and_killed(pool):
    res = run(pool, "while True:\n    print('x' * 10000)")
    assert res.status == "killed" and res.truncated and len(res.stdout) <= CFG.max_output_bytes
    # Killed at the cap, long before the timeout: the snippet's own run time (the zygote's clock, without the queue
    # and the round trip that a loaded or slower machine stretches) is a fraction of it.
    assert res.wall_s < CFG.timeout_s / 3, res.wall_s


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
    assert not Path("/tmp/torl_hostile_tmp").exists() and not Path("/dev/shm/torl_hostile_shm").exists()
    if pool.report["namespaces"]:  # a private /tmp and /dev/shm; without a mount namespace Landlock denies them
        assert res.status == "ok"
        assert run(pool, "import os\nprint(os.listdir('/tmp'))").stdout == "[]\n"  # the next snippet sees a clean dir
    else:
        assert res.status == "error" and "PermissionError" in res.stderr


def test_environment_has_no_secrets(pool):
    res = run(pool, "import os\nprint(sorted(os.environ))")
    assert res.status == "ok"
    for bad in ("RAY", "WANDB", "VLLM", "API_KEY", "TOKEN", "SECRET"):
        assert bad not in res.stdout
    code = (
        "import os\nfound = []\ntry:\n    pids = os.listdir('/proc')\nexcept OSError:\n    pids = []\n"
        "for p in pids:\n    try:\n"
        "        data = open(f'/proc/{p}/environ', 'rb').read()\n    except OSError:\n        continue\n"
        "    if b'RAY_' in data or b'WANDB' in data:\n        found.append(p)\nprint(found)"
    )
    assert run(pool, code).stdout == "[]\n"


def test_home_secrets_unreadable(pool):
    # /root, if listable at all, shows only the re-exposed Python installation (when Python lives under it).
    shown = sorted({p.split("/")[2] for p in (sys.base_prefix, sys.prefix) if p.startswith("/root/")})
    res = run(pool, "import os\nprint(os.listdir('/root'))\nprint(open('/root/.netrc').read())")
    assert res.status == "error" and res.stdout.strip() in (str(shown), ""), res


@pytest.fixture(scope="module")
def secrets(pool):
    """The invoking user's secrets and the run's files as a trainer has them, each file holding SECRET.

    Root's are under /root (a ~/.netrc only if there is none); the non-root user's home is made in the checkout.
    The output dir is world-readable and its checkpoint dir world-writable, so that only the sandbox stands in the
    way; the weight-sync dir is made as a generator makes it."""
    uid = pool.env.uid
    home = Path(pwd.getpwuid(0).pw_dir) if uid is None else ROOT / ".sandbox_hostile_home"
    out = ROOT / ".sandbox_hostile_run"
    files = [home / ".ray" / "torl-hostile", home / ".cache" / "torl-hostile", out / "metrics.jsonl"]
    files += [Path("/dev/shm/torl-hostile-secret")]
    if not (home / ".netrc").exists():
        files.append(home / ".netrc")
    weights = Path(tempfile.mkdtemp(prefix="torl-generator-hostile-", dir=weight_dir()))
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    os.chmod(out / "checkpoints", 0o777)
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"machine example.invalid login torl password {SECRET}\n")
    if uid is not None:
        os.chmod(home, 0o700)
        for path in (home, *home.rglob("*"), out, *out.rglob("*"), weights):
            os.chown(path, uid, uid)
    yield {"home": home, "out": out, "weights": weights, "files": files}
    for path in files:
        path.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(weights, ignore_errors=True)
    if uid is not None:
        shutil.rmtree(home, ignore_errors=True)


def test_secrets_and_run_files_unreadable(pool, secrets):
    """~/.netrc, ~/.ray, ~/.cache, the run's output dir and /dev/shm: nothing read, nothing listed."""
    paths = [str(p) for p in secrets["files"]]
    dirs = [str(secrets["home"] / ".ray"), str(secrets["out"]), "/dev/shm"]
    code = (
        f"import os\nfor p in {paths!r}:\n    try:\n        print(open(p).read())\n    except OSError as e:\n"
        f"        print(type(e).__name__)\nfor d in {dirs!r}:\n    try:\n        print(os.listdir(d))\n"
        "    except OSError as e:\n        print(type(e).__name__)"
    )
    res = run(pool, code)
    assert res.status == "ok", res
    assert SECRET not in res.stdout and "torl-hostile" not in res.stdout and "metrics.jsonl" not in res.stdout, res


def test_writes_to_checkpoints_and_weights_refused(pool, secrets):
    targets = [secrets["out"] / "checkpoints" / "step_1", secrets["weights"] / "model.safetensors"]
    targets.append(secrets["out"] / "metrics.jsonl")
    code = (
        f"for p in {[str(t) for t in targets]!r}:\n    try:\n        open(p, 'a').write('pwned')\n"
        "        print('wrote', p)\n    except OSError as e:\n        print(type(e).__name__)"
    )
    res = run(pool, code)
    assert res.status == "ok" and "wrote" not in res.stdout, res
    assert not targets[0].exists() and not targets[1].exists() and "pwned" not in targets[2].read_text()


def test_snippet_cannot_unshare_or_mount(pool):
    code = (
        "import ctypes, os, subprocess\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for flags in (0x10000000, 0x10020000, 0x40000000, 0x20000000):\n    print(libc.unshare(flags), end=' ')\n"
        "print(libc.mount(b'tmpfs', os.getcwd().encode(), b'tmpfs', 0, None))\n"
        "print(subprocess.run(['unshare', '-r', 'true'], stderr=subprocess.DEVNULL).returncode != 0)"
    )
    res = run(pool, code)
    assert res.status == "ok" and res.stdout == "-1 -1 -1 -1 -1\nTrue\n", res


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


UNIX_SOCKET = (
    "import socket\ntry:\n    s = socket.socket(socket.AF_UNIX)\nexcept OSError as e:\n"
    "    print('no unix sockets:', e.errno)\n    raise SystemExit\n"
)


def _meet(name: str, role: str) -> str:
    """A snippet listening on (or connecting to) an abstract unix socket: a channel between concurrent snippets."""
    if role == "listen":
        return UNIX_SOCKET + (
            f"s.bind('\\0{name}')\ns.listen(1)\ns.settimeout(1.0)\n"
            "try:\n    s.accept()\n    print('met')\nexcept OSError:\n    print('alone')"
        )
    return UNIX_SOCKET + (
        f"import time\ntime.sleep(0.3)\ntry:\n    s.connect('\\0{name}')\n    print('met')\n"
        "except OSError:\n    print('alone')"
    )


def test_concurrent_snippets_cannot_meet(pool):
    """No UNIX socket at all (seccomp; an abstract name would be shared with the host without a network namespace,
    and a pathname one is out of Landlock's reach): two snippets running at once cannot meet."""

    async def go():
        codes = [_meet("torl-meet", role) for _ in range(4) for role in ("listen", "connect")]
        return await asyncio.gather(*(pool.run(code) for code in codes))

    outs = [r.stdout for r in asyncio.run(go())]
    assert pool.report["seccomp"] and outs == [f"no unix sockets: {errno.EAFNOSUPPORT}\n"] * 8, outs


def test_process_left_behind_dies_with_its_snippet(pool):
    """Slots (and their namespaces) are reused; what a snippet leaves running must not be there for the next one."""
    leave = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(0.2)\nprint('left')"

    async def go():
        return await asyncio.gather(*(pool.run(leave) for _ in range(CFG.concurrency_per_worker * CFG.num_workers)))

    first = asyncio.run(go())
    assert all(r.stdout == "left\n" for r in first), first
    assert not wait_no_strays(pool)


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
    assert not wait_no_strays(pool)
