"""Snippets against each other and against the pool: no trajectory sees or disturbs another, no snippet breaks the
zygote for the rest, and the limits hold per snippet.

Each class of attack found by trying the sandbox as an attacker would, run in every environment of
``sandbox_envs`` like ``test_sandbox_hostile.py`` (same ``pool`` fixture; ``healthy_after`` checks after each test
that the same zygote still answers). Where a test needs to see inside a process (its memory, its CPU time), the
test process, which is root, reads /proc from outside; a snippet names itself with ``prctl(PR_SET_NAME)`` so the
test can find it.
"""

# ruff: noqa: F811 - the fixtures imported from hostile_target are test parameters here

import ast
import asyncio
import ctypes
import os
import re
import socket
import stat
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from hostile_target import CFG, healthy_after, pool, run, wait_no_strays  # noqa: F401
from sandbox_envs import EnvZygote

from torl.config import SandboxConfig

libc = ctypes.CDLL(None, use_errno=True)
NAME_ME = "import ctypes\nctypes.CDLL(None).prctl(15, {name!r}.encode(), 0, 0, 0)\n"  # PR_SET_NAME
IPC_CREAT, IPC_RMID = 0o1000, 0


def _pid_named(name: str, timeout: float = 5.0) -> int:
    """The pid of the process whose comm is ``name`` (set by a snippet), waiting for it to appear."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if entry.isdigit() and f.read().strip() == name:
                        return int(entry)
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError(f"no process named {name!r} appeared")


def _memory_holds(pid: int, needles: list[bytes]) -> list[bytes]:
    """The needles found anywhere in ``pid``'s writable memory (read from outside through /proc/<pid>/mem)."""
    found = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms, *rest = line.split()
            if not perms.startswith("rw") or (rest and rest[-1] in ("[vvar]", "[vsyscall]", "[vvar_vclock]")):
                continue  # code and read-only data hold no request: the writable mappings are the heap and stacks
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except OSError:
                continue
            found.update(n for n in needles if n in data)
    return sorted(found)


def _names(n: int) -> list[str]:
    return [uuid.uuid4().hex[:12] for _ in range(n)]


# --- 1. other trajectories' code and output -----------------------------------------------------------------------


def test_child_holds_no_other_snippets_code_or_output(pool):
    """A child is forked from a process that never held a request or an output: snippets running at the same time
    (their code, and output already collected by the zygote) are nowhere in its memory."""
    secrets = _names(6 if pool.pool is not None else CFG.concurrency_per_worker - 1)  # leave the spy a slot
    victims = [
        f"# TORLCODE{s}\nprint('TORLOUT' + {s[::-1]!r}[::-1], flush=True)\nimport time\ntime.sleep(1.2)"
        for s in secrets
    ]
    spy_name = "torlspy" + _names(1)[0][:8]
    spy = NAME_ME.format(name=spy_name) + "import time\ntime.sleep(1.3)"
    needles = [f"TORLCODE{s}".encode() for s in secrets] + [f"TORLOUT{s}".encode() for s in secrets]

    async def go():
        running = [asyncio.ensure_future(pool.run(v)) for v in victims]
        await asyncio.sleep(0.4)  # the victims have printed; their output sits in their zygote's buffers
        spying = asyncio.ensure_future(pool.run(spy))
        loop = asyncio.get_running_loop()
        pid = await loop.run_in_executor(None, _pid_named, spy_name)
        found = await loop.run_in_executor(None, _memory_holds, pid, needles)
        return found, await asyncio.gather(*running), await spying

    found, outs, spied = asyncio.run(go())
    assert all(f"TORLOUT{s}" in r.stdout for s, r in zip(secrets, outs, strict=True)), outs
    assert spied.status == "ok", spied
    assert found == [], f"the spy's memory holds other snippets' code or output: {found}"


# --- 2. IPC -------------------------------------------------------------------------------------------------------


def _ipc_probe(host_key: int, own_key: int, queue: str) -> str:
    return (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def show(what, ret):\n    print(what, ret, ctypes.get_errno() if ret == -1 else '')\n"
        f"seg = libc.shmget({host_key}, 0, 0)\nshow('host-shm', seg)\n"
        "if seg != -1:\n    libc.shmat.restype = ctypes.c_void_p\n"
        "    print('read', ctypes.string_at(libc.shmat(seg, None, 0), 40))\n"
        f"show('host-msg', libc.msgget({host_key}, 0))\n"
        f"show('own-shm', libc.shmget({own_key}, 4096, {IPC_CREAT | 0o666}))\n"
        f"show('own-msg', libc.msgget({own_key}, {IPC_CREAT | 0o666}))\n"
        f"show('own-mq', libc.mq_open(b'/{queue}', 0o102, 0o666, None))\n"  # O_CREAT | O_RDWR
        f"show('earlier-shm', libc.shmget({own_key + 1}, 0, 0))\n"
        f"show('earlier-mq', libc.mq_open(b'/{queue}-earlier', 0o2))\n"
    )


def _sysv_keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(line.split()[0]) for line in list(f)[1:]}


def test_no_ipc_between_snippets_or_with_the_host(pool):
    """SysV shared memory and queues and POSIX queues: a snippet cannot reach the host's, what it makes does not
    appear on the host, and a later snippet cannot reach an earlier one's."""
    host_key, own_key = 0x70A1 + os.getpid() % 1000, 0x7100 + os.getpid() % 1000
    seg = libc.shmget(host_key, 4096, IPC_CREAT | 0o666)
    assert seg != -1
    libc.shmat.restype = ctypes.c_void_p
    ctypes.memmove(libc.shmat(seg, None, 0), b"torl-host-segment-secret", 24)
    queue = libc.msgget(host_key, IPC_CREAT | 0o666)
    before = {kind: _sysv_keys(kind) for kind in ("shm", "msg")}
    name = "torlq" + _names(1)[0][:8]
    try:
        earlier = run(pool, _ipc_probe(host_key, own_key + 1, name + "-earlier"))  # plants for the next one
        later = run(pool, _ipc_probe(host_key, own_key, name))
        after = {kind: _sysv_keys(kind) for kind in ("shm", "msg")}
    finally:
        libc.shmctl(seg, IPC_RMID, None)
        libc.msgctl(queue, IPC_RMID, None)
    for res in (earlier, later):
        assert res.status == "ok", res
        assert "secret" not in res.stdout and re.search(r"^host-(shm|msg) -1 ", res.stdout, re.M), res.stdout
    assert re.search(r"^earlier-shm -1 ", later.stdout, re.M) and re.search(r"^earlier-mq -1 ", later.stdout, re.M)
    assert after == before, "a snippet's SysV object appeared on the host"
    assert libc.mq_open(f"/{name}".encode(), 0o2) == -1 and libc.mq_open(f"/{name}-earlier".encode(), 0o2) == -1


# --- 3. scratch reuse -----------------------------------------------------------------------------------------------


def test_scratch_is_fresh_for_every_snippet(pool):
    """What one snippet leaves on its scratch directory (files, a user xattr, times, mode) is not there for the next
    snippet in the same slot (every slot is used by both rounds)."""
    leave = (  # where snippets act as the trainer's user, seccomp refuses the metadata calls
        "import os\nopen('left', 'w').write('x')\nos.mkdir('sub')\n"
        "for change in (lambda: os.setxattr('.', 'user.torl', b'channel'), lambda: os.utime('.', (12345, 12345)),\n"
        "               lambda: os.chmod('.', 0o751)):\n"
        "    try:\n        change()\n    except OSError as e:\n        print('refused', e.errno)\nprint('left')"
    )
    look = (
        "import os\nst = os.stat('.')\n"
        "try:\n    x = os.getxattr('.', 'user.torl')\nexcept OSError:\n    x = None\n"
        "print(os.listdir('.'), int(st.st_mtime) == 12345, oct(st.st_mode & 0o777), x)"
    )
    slots = CFG.concurrency_per_worker * CFG.num_workers

    async def go():
        first = await asyncio.gather(*(pool.run(leave) for _ in range(slots)))
        return first, await asyncio.gather(*(pool.run(look) for _ in range(slots)))

    first, later = asyncio.run(go())
    assert all(r.status == "ok" and r.stdout.endswith("left\n") for r in first), first
    assert [r.stdout for r in later] == ["[] False 0o700 None\n"] * slots, later


# --- 4. pathname UNIX sockets ---------------------------------------------------------------------------------------


def test_pathname_unix_sockets_outside_scratch_refuse(pool):
    """A world-writable listening socket outside /tmp (as /run/dbus or journald have, or a group-owned docker.sock):
    no snippet connects to it."""
    path = f"/run/torl-hostile-{os.getpid()}.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o666)
    server.listen(4)
    server.setblocking(False)
    try:
        res = run(
            pool,
            f"import socket\ntry:\n    s = socket.socket(socket.AF_UNIX)\n    s.connect({path!r})\n"
            "    print('connected')\nexcept OSError as e:\n    print('refused', e.errno)",
        )
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        os.unlink(path)
    assert res.status == "ok" and res.stdout.startswith("refused"), res


def test_trainer_files_keep_their_metadata(pool):
    """A file of the trainer's user outside scratch: a snippet that acts as that user (a non-root trainer) could
    change its mode, times and xattrs, which Landlock does not govern; none of them changes."""
    path = Path(f"/run/torl-hostile-meta-{os.getpid()}")  # outside any scratch, wherever the checkout lives
    path.write_text("x")
    try:
        os.chmod(path, 0o600)
        if pool.env.uid is not None:
            os.chown(path, pool.env.uid, pool.env.uid)
        os.utime(path, (1000, 1000))
        before = os.stat(path)
        code = (
            f"import os\np = {str(path)!r}\nprint('seen', os.stat(p).st_size)\n"
            "for name, change in (('chmod', lambda: os.chmod(p, 0o666)), ('utime', lambda: os.utime(p, (5, 5))),\n"
            "                     ('xattr', lambda: os.setxattr(p, 'user.torl', b'x'))):\n"
            "    try:\n        change()\n        print(name, 'changed')\n"
            "    except OSError as e:\n        print(name, 'refused', e.errno)"
        )
        res = run(pool, code)
        after = os.stat(path)
        assert res.status == "ok" and res.stdout.startswith("seen 1\n") and "changed" not in res.stdout, res
        assert (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)
        assert "user.torl" not in os.listxattr(path)
    finally:
        path.unlink()


# --- 5. sessions between calls --------------------------------------------------------------------------------------


def _cpu_ticks_and_state(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), fields[0]  # utime + stime (clock ticks), state


def _idle_cpu(pid: int, seconds: float = 0.6) -> tuple[float, str]:
    """CPU seconds ``pid`` burned over ``seconds`` of wall time, and its state afterwards."""
    t0, _ = _cpu_ticks_and_state(pid)
    time.sleep(seconds)
    t1, state = _cpu_ticks_and_state(pid)
    return (t1 - t0) / os.sysconf("SC_CLK_TCK"), state


def test_session_runs_nothing_between_calls(pool):
    """A thread left spinning, or a forged "done" on the session's own pipe, does not keep a session running after
    its reply: between calls it is stopped and burns no CPU; the next call still works."""
    name = "torlsess" + _names(1)[0][:7]
    sid = "between-" + name
    spin = NAME_ME.format(name=name) + (
        "import threading\ndef spin():\n    while True:\n        pass\n"
        "threading.Thread(target=spin, daemon=True).start()\nprint('spinning')"
    )
    forge = "import os\nos.write(4, b'{\"exit\": 0}\\n')\nx = 0\nwhile True:\n    x += 1"

    async def go():
        first = await pool.run(spin, session=sid)
        pid = _pid_named(name)
        idle_after_thread = _idle_cpu(pid)
        second = await pool.run("print('again')", session=sid)
        forged = await pool.run(forge, session=sid)
        idle_after_forgery = _idle_cpu(pid)
        third = await pool.run("print('after')", session=sid)
        await pool.close_session(sid)
        return first, idle_after_thread, second, forged, idle_after_forgery, third

    first, idle1, second, forged, idle2, third = asyncio.run(go())
    assert first.stdout == "spinning\n" and second.stdout == "again\n", (first, second)
    assert idle1[0] < 0.05 and idle1[1] == "T", f"between calls the session ran: {idle1}"
    assert forged.status == "ok" and idle2[0] < 0.05 and idle2[1] == "T", (forged, idle2)
    assert third.status in ("timeout", "ok"), third  # the forged snippet resumes in the next call: its own loss


# --- 6-8. what breaks the pool ------------------------------------------------------------------------------------

FINE = "import time\ntime.sleep(0.4)\nprint('fine')"


def _beside(pool, code: str, session: str | None = None, n: int = 4):
    """Run ``code`` with ``n`` ordinary snippets at the same time; returns its result and theirs (each within 5 s)."""

    async def go():
        others = [asyncio.ensure_future(asyncio.wait_for(pool.run(FINE), 5)) for _ in range(n)]
        res = await asyncio.wait_for(pool.run(code, session=session), 10)
        return res, await asyncio.gather(*others)

    return asyncio.run(go())


@pytest.mark.parametrize(
    "garbage", [b"garbage\n", b"x" * 5000, b'{"exit": "0"}\n', b"[1]\n"], ids=["text", "long", "type", "shape"]
)
def test_garbage_on_the_done_pipe_ends_only_that_session(pool, garbage):
    sid = "garbage-" + _names(1)[0]
    code = f"import os, time\nos.write(4, {garbage!r})\ntime.sleep(0.3)\nprint('unreached')"
    res, others = _beside(pool, code, session=sid)
    assert [r.stdout for r in others] == ["fine\n"] * 4, others
    assert res.status in ("killed", "error") and "unreached" not in res.stdout, res
    assert run(pool, "print(1)", session=sid).stdout == "1\n"  # a new session under the same id
    asyncio.run(pool.close_session(sid))


def test_a_session_that_stops_reading_blocks_only_itself(pool):
    """The session moves its code pipe aside (and shrinks it to 4 KiB): the next call's long code cannot be
    delivered. That call times out; everyone else is answered meanwhile."""
    sid = "stall-" + _names(1)[0]
    stall = (
        "import fcntl, os\nkeep = os.dup(3)\nfcntl.fcntl(keep, 1031, 4096)\n"  # F_SETPIPE_SZ
        "r, w = os.pipe()\nos.dup2(r, 3)\nprint('stalled')"
    )
    assert run(pool, stall, session=sid).stdout == "stalled\n"
    long_code = "x = 1\n" + "# padding\n" * 20000
    t0 = time.monotonic()
    res, others = _beside(pool, long_code, session=sid)
    assert [r.stdout for r in others] == ["fine\n"] * 4, others
    assert res.status == "timeout" and time.monotonic() - t0 < CFG.timeout_s + 3, res
    asyncio.run(pool.close_session(sid))


def test_a_deep_directory_chain_is_cleaned_up(pool):
    """3000 nested directories (deeper than Python's recursion limit, longer than PATH_MAX) in scratch: removed
    without harm to anyone, and nothing of it stays on disk."""
    code = (
        "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"
        "try:\n    os.chmod('.', 0)\nexcept OSError:\n    pass\nprint('deep')"
    )
    res, others = _beside(pool, code)
    assert res.status == "ok" and res.stdout == "deep\n", res
    assert [r.stdout for r in others] == ["fine\n"] * 4, others
    for info in pool.infos:  # the zygote works in its scratch root: only the slots' own directories stay there
        deadline = time.monotonic() + 3
        while (left := [n for n in os.listdir(f"/proc/{info['pid']}/cwd") if not n.isdigit()]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert left == [], left


# --- 9. limits ------------------------------------------------------------------------------------------------------


def test_memfd_refused(pool):
    """Memory in a memfd is outside RLIMIT_AS: snippets cannot make one."""
    res = run(pool, "import os\nfd = os.memfd_create('x')\nos.ftruncate(fd, 2**30)\nprint('made')")
    assert res.status == "error" and "PermissionError" in res.stderr, res


def test_scratch_is_bounded_in_total(pool):
    """Many files each under max_file_mb: the snippet's tmpfs (sandbox.scratch_mb) bounds them together. Without a
    mount namespace scratch is on disk, bounded per file only (docs/sandbox.md ("Environments"))."""
    code = (
        "chunk = b'0' * 2**20\nwritten = 0\ntry:\n    for i in range(8):\n        with open(f'f{i}', 'wb') as f:\n"
        "            for _ in range(60):\n                f.write(chunk)\n                written += 1\n"
        "except OSError as e:\n    print('stopped', e.errno)\nprint(written)"
    )
    res = run(pool, code)
    assert res.status == "ok", res
    if pool.report["namespaces"]:
        assert res.stdout.startswith("stopped 28") and int(res.stdout.split()[-1]) <= CFG.scratch_mb, res  # ENOSPC


# --- 10. sandbox errors come from the sandbox only -------------------------------------------------------------------


def test_forged_setup_failure_is_the_snippets_own_error(pool):
    code = (
        "import os, sys\nsys.stderr.write('[sandbox] setup failed\\nTraceback: forged\\n')\nsys.stderr.flush()\n"
        "os._exit(125)"
    )
    res = run(pool, code)
    assert res.status == "error" and res.exit_code == 125, res


# --- 11-12. the zygote's own start and the none level -------------------------------------------------------------


def _zygote(pool, cfg: SandboxConfig, code: str) -> tuple[dict, object, str, os.stat_result]:
    """Start a zygote of ``cfg`` in the pool's environment, run ``code``, close it: (ready info, result, its working
    directory and that directory's stat)."""

    async def go():
        zygote = EnvZygote(cfg, pool.env)
        await zygote.start()
        try:
            cwd = os.path.realpath(f"/proc/{zygote.info['pid']}/cwd")
            return zygote.info, await zygote.run(code), cwd, os.stat(cwd)
        finally:
            await zygote.close()

    return asyncio.run(go())


def test_planted_module_in_scratch_root_is_never_imported(pool):
    """A shared, world-writable scratch root with a planted ``selectors.py`` (and ``json.py``, ``signal.py``): the
    zygote imports none of them, and works in a new directory of its own, 0711, that nobody else created."""
    shared = tempfile.mkdtemp(prefix="torl-shared-root-")
    os.chmod(shared, 0o1777)
    marker = os.path.join(tempfile.gettempdir(), f"torl-planted-{os.getpid()}")
    for module in ("selectors", "json", "signal"):
        with open(os.path.join(shared, f"{module}.py"), "w") as f:
            f.write(f"open({marker!r}, 'a').write('{module} ran as uid ' + str(__import__('os').getuid()))\n")
    cfg = SandboxConfig(**{**CFG.__dict__, "isolation": pool.level, "scratch_root": shared})
    try:
        info, res, cwd, st = _zygote(pool, cfg, "print(6 * 7)")
        assert not os.path.exists(marker), open(marker).read()
        assert res.stdout == "42\n", res
        assert os.path.dirname(cwd) == os.path.realpath(shared) and os.path.basename(cwd).startswith("torl-sandbox-")
        assert stat.S_IMODE(st.st_mode) == 0o711 and st.st_uid == (pool.env.uid or 0)
    finally:
        if os.path.exists(marker):
            os.unlink(marker)
        for module in ("selectors", "json", "signal"):
            os.unlink(os.path.join(shared, f"{module}.py"))
        time.sleep(0.2)  # the forker removes the zygote's root as it exits
        os.rmdir(shared)


def test_process_limit_holds_at_none(pool):
    """isolation=none drops every layer but the rlimits: a non-root trainer's snippets still get a process ceiling
    (root ignores RLIMIT_NPROC, so there none has no process limit at all: docs/sandbox.md ("Isolation levels"))."""
    if pool.env.uid is None:
        pytest.skip("root ignores RLIMIT_NPROC; at none snippets run as the trainer")
    cfg = SandboxConfig(**{**CFG.__dict__, "isolation": "none"})
    info, res, _, _ = _zygote(pool, cfg, "import resource\nprint(resource.getrlimit(resource.RLIMIT_NPROC))")
    assert info["isolation"]["level"] == "none" and res.status == "ok", res
    soft, hard = ast.literal_eval(res.stdout)
    assert 0 < soft == hard < 5000, res.stdout  # the user's task count at start + 256, not the inherited limit


def test_trainer_processes_cannot_be_reniced(pool):
    """Without a uid of its own a snippet shares the trainer's user: setpriority of the zygote, its forker and client
    (by pid, or all of the user's at once) is refused, and their priority stays."""
    protected = pool.protected()
    before = [os.getpriority(os.PRIO_PROCESS, pid) for pid in protected]
    code = (
        f"import os\nfor which, who in [*((os.PRIO_PROCESS, p) for p in {protected!r}), (os.PRIO_USER, 0), "
        "(os.PRIO_PGRP, 0)]:\n    try:\n        os.setpriority(which, who, 19)\n        print('reniced', which, who)\n"
        "    except OSError as e:\n        print('refused', e.errno)"
    )
    res = run(pool, code)
    assert res.status == "ok" and "reniced" not in res.stdout, res
    assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in protected] == before


def test_no_stray_process_left(pool):
    assert not wait_no_strays(pool)
