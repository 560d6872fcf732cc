"""The zygote: a warm, clean Python process running each snippet in an isolated child (docs/platform-notes.md §7, §10).

Started by ``torl.sandbox.client.Zygote`` as ``python -I -c ...zygote.main(...)`` (isolated mode: no PYTHON*
variables, no user site, and neither its working directory nor any other directory another user could write on its
import path) with a minimal environment (no RAY_*, no API keys, no VLLM vars), it first sets up the isolation layers
the host allows (``torl.sandbox.layers``; under ``sandbox.isolation=strict`` it refuses to start without all of
them), makes a private scratch root (``torl.sandbox.scratch``), preloads sympy/numpy once, forks its forker
(``torl.sandbox.forker``) and then serves newline-delimited JSON requests on stdin, answering on stdout.

Two processes, so that no snippet holds another's data: this one reads requests and collects output (other
trajectories' code and text), and never forks a snippet; the forker, forked once before any request was read, forks
every child and never sees code or output. For each snippet this process makes the pipes (stdout, stderr, code in,
a status pipe for setup failures, and for a session a done pipe), hands the child's ends to the forker, writes the
code into the code pipe without ever blocking on it, enforces the wall timeout and the output cap, and asks the
forker to end (kill, clean up) what is finished. Every byte from a child is hostile input: read without blocking,
capped, parsed defensively; a child can fail its own request, never the zygote. A sandbox error is reported only
from what the forker or the status pipe says, never from the snippet's output.

Persistent sessions keep one long-lived child per session id that runs successive snippets in the same globals; the
forker stops it between calls.

Standard library only (plus ``torl.sandbox``): the zygote must stay small, quick to fork, and free of Ray.
Not here: capping a snippet's output and naming how it ended (``torl.sandbox.outcome``), request routing, Ray, the
ExecResult record (see ``torl.sandbox.client`` and ``actors/sandbox.py``).
"""

from __future__ import annotations

import fcntl
import importlib
import itertools
import json
import os
import resource
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from torl.sandbox import forker, scratch
from torl.sandbox.child import PR_SET_PDEATHSIG, Limits, libc
from torl.sandbox.isolation import IsolationUnavailable
from torl.sandbox.layers import Layers, set_up
from torl.sandbox.namespaces import hidden_prefixes
from torl.sandbox.outcome import CappedBuffer, classify

MAX_CODE_BYTES = 1 << 20  # a request's code; more is refused (the client never sends that much)
MAX_DONE_BYTES = 256  # a session's done line is {"exit": N}; a longer line is not one


@dataclass
class Job:
    """One snippet being run (in a fresh child, or in a session's child)."""

    rid: Any
    num: int  # the forker's job number of its process (a session's, for a session snippet)
    out: CappedBuffer
    err: CappedBuffer
    started: float
    deadline: float
    session: Session | None = None
    fds: dict[str, int] = field(default_factory=dict)  # stateless: out, err, status (and code while written)
    wait_status: int | None = None
    timed_out: bool = False
    over_output: bool = False
    error: str = ""  # why the sandbox could not run it (the forker said so)


@dataclass
class Session:
    """A long-lived child holding one interpreter state (persistent-session mode)."""

    sid: str
    num: int
    fds: dict[str, int]  # out, err, status, code (to the child), done (from it)
    last_used: float
    job: Job | None = None
    pending: bytes = b""
    calls: int = 0


class Zygote:
    def __init__(self, limits: Limits, proto_in: int, proto_out: int, layers: Layers, sock: socket.socket,
                 forker_pid: int) -> None:  # fmt: skip
        self.limits = limits
        self.forker_pid = forker_pid
        self.layers = layers
        self.proto_in, self.proto_out = proto_in, proto_out
        self.sock = sock  # to the forker
        self.sel = selectors.DefaultSelector()
        self.jobs: dict[int, Job] = {}  # stateless jobs by number
        self.sessions: dict[str, Session] = {}
        self.writes: dict[int, tuple[memoryview, bool]] = {}  # code still to write: fd -> (rest, close when done)
        self.inbuf = b""
        self.nums = itertools.count(1)
        os.set_blocking(proto_in, False)
        self.sel.register(proto_in, selectors.EVENT_READ, ("proto", None))
        self.sel.register(sock, selectors.EVENT_READ, ("forker", None))

    # -- requests ----------------------------------------------------------------------------------------------

    def reply(self, msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        os.set_blocking(self.proto_out, True)
        view = memoryview(data)
        while view:
            view = view[os.write(self.proto_out, view) :]

    def handle(self, msg: dict[str, Any]) -> None:
        op, rid = msg.get("op"), msg.get("id")
        if op == "run":
            code = msg["code"]
            if not isinstance(code, str) or len(code) > MAX_CODE_BYTES:
                raise ValueError(f"code must be a string of at most {MAX_CODE_BYTES} characters")
            timeout = float(msg.get("timeout") or self.limits.timeout_s)
            if msg.get("session"):
                self.run_in_session(rid, str(msg["session"]), code, timeout)
            else:
                self.run_stateless(rid, code, timeout)
        elif op == "close":
            sess = self.sessions.get(str(msg.get("session")))
            if sess is not None:
                self.end_session(sess)
            self.reply({"id": rid, "status": "ok"})
        elif op == "ping":
            self.reply(
                {
                    "id": rid,
                    "status": "ok",
                    "pid": os.getpid(),
                    "isolation": self.layers.report.as_dict(),
                    "jobs": len(self.jobs),
                    "sessions": len(self.sessions),
                }
            )
        else:
            self.reply({"id": rid, "status": "sandbox_error", "stderr": f"unknown op {op!r}"})

    def _spawn(self, session: bool) -> tuple[int, dict[str, int]]:
        """Ask the forker for a child: make its pipes, hand over the child's ends; returns our ends by name."""
        num = next(self.nums)
        names = ("out", "err", "code", "status") + (("done",) if session else ())
        pipes = {name: os.pipe() for name in names}
        ours = {name: (w if name == "code" else r) for name, (r, w) in pipes.items()}
        theirs = [(r if name == "code" else w) for name, (r, w) in pipes.items()]
        try:
            socket.send_fds(self.sock, [json.dumps({"op": "spawn", "job": num, "session": session}).encode()], theirs)
        except BaseException:
            for fd in (*ours.values(), *theirs):
                os.close(fd)
            raise
        for fd in theirs:
            os.close(fd)
        os.set_blocking(ours["status"], False)
        return num, ours

    def _watch(self, fds: dict[str, int], owner: Job | Session) -> None:
        """Read the child's pipes as they fill; the owner rides along, so no event needs a lookup."""
        for name in ("out", "err", "done"):
            if name in fds:
                os.set_blocking(fds[name], False)
                self.sel.register(fds[name], selectors.EVENT_READ, (name, owner))

    def _write(self, fd: int, data: bytes, close: bool) -> None:
        """Send ``data`` to a child's code pipe without ever blocking (a child may never read it)."""
        os.set_blocking(fd, False)
        self.writes[fd] = (memoryview(data), close)
        self.sel.register(fd, selectors.EVENT_WRITE, ("code", None))
        self.on_writable(fd)

    def on_writable(self, fd: int) -> None:
        rest, close = self.writes[fd]
        try:
            rest = rest[os.write(fd, rest) :]
        except BlockingIOError:
            return
        except OSError:  # the child is gone or closed its end; its exit says what happened
            rest = rest[len(rest) :]
        if rest:
            self.writes[fd] = (rest, close)
        elif close:
            self._close(fd)
        else:
            del self.writes[fd]
            self.sel.unregister(fd)

    def run_stateless(self, rid: Any, code: str, timeout: float) -> None:
        now = time.monotonic()
        num, fds = self._spawn(session=False)
        cap = self.limits.max_output_bytes
        job = self.jobs[num] = Job(rid, num, CappedBuffer(cap), CappedBuffer(cap), now, now + timeout, fds=fds)
        self._watch(fds, job)
        self._write(fds["code"], code.encode("utf-8", errors="surrogatepass"), close=True)

    def run_in_session(self, rid: Any, sid: str, code: str, timeout: float) -> None:
        sess = self.sessions.get(sid) or self.start_session(sid)
        if sess.job is not None:
            self.reply(
                {"id": rid, "status": "sandbox_error", "stderr": f"session {sid!r} is already running a snippet"}
            )
            return
        now = time.monotonic()
        cap = self.limits.max_output_bytes
        sess.job = Job(rid, sess.num, CappedBuffer(cap), CappedBuffer(cap), now, now + timeout, session=sess)
        sess.last_used = now
        if sess.calls:
            self._tell("resume", sess.num)  # stopped since its last call
        sess.calls += 1
        if sess.fds["code"] in self.writes:  # the child has not read the last call's code: it will not read this
            sess.job.err.append(b"[sandbox] the session stopped reading its input\n")
            sess.job.over_output = True
            self.finish(sess.job)
            return
        self._write(sess.fds["code"], (json.dumps({"code": code}) + "\n").encode(), close=False)

    def start_session(self, sid: str) -> Session:
        num, fds = self._spawn(session=True)
        sess = self.sessions[sid] = Session(sid, num, fds, time.monotonic())
        self._watch(fds, sess)
        return sess

    def _tell(self, op: str, num: int) -> None:
        self.sock.sendall(json.dumps({"op": op, "job": num}).encode())

    # -- events ------------------------------------------------------------------------------------------------

    def on_output(self, kind: str, owner: Job | Session, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(fd)
            return
        job = owner.job if isinstance(owner, Session) else owner
        if job is None:  # output of a session between snippets: nobody asked for it
            return
        if (job.out if kind == "out" else job.err).append(data) and not job.over_output:
            job.over_output = True  # a snippet printing gigabytes costs one cap's worth of reading, then dies
            self.finish(job)

    def on_done(self, sess: Session) -> None:
        """A session's runner says its snippet returned: ``{"exit": N}``. The snippet can write here too; anything
        but that line ends the session (its own loss), never the zygote."""
        try:
            data = os.read(sess.fds["done"], 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sess.fds["done"])
            return
        sess.pending += data
        while sess.pending:
            line, sep, rest = sess.pending.partition(b"\n")
            if not sep:
                if len(sess.pending) > MAX_DONE_BYTES:
                    self._violation(sess)
                return
            sess.pending = rest
            try:
                exit_code = json.loads(line)["exit"]
                if not isinstance(exit_code, int):
                    raise TypeError(exit_code)
            except (ValueError, KeyError, TypeError):
                self._violation(sess)
                return
            if sess.job is not None:
                sess.job.wait_status = (exit_code & 0xFF) << 8  # as if the process exited with it
                self.finish(sess.job)

    def _violation(self, sess: Session) -> None:
        if sess.job is not None:
            sess.job.err.append(b"[sandbox] the session broke its protocol with the sandbox; it was ended\n")
            sess.job.wait_status = signal.SIGKILL
        self.end_session(sess)

    def on_forker(self) -> bool:
        """A message from the forker: a process exited, or could not be started. False when the forker is gone."""
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return True
        if not data:
            return False
        msg = json.loads(data)
        num = msg["job"]
        sess = None if num in self.jobs else next((s for s in self.sessions.values() if s.num == num), None)
        job = sess.job if sess is not None else self.jobs.get(num)
        if job is not None:
            job.wait_status, job.error = msg.get("status"), msg.get("error", "")
        if sess is not None:  # the session's process is gone: its state with it
            self.end_session(sess)
        elif job is not None:
            self.finish(job)
        return True

    def check_deadlines(self, now: float) -> float | None:
        nearest = None
        for job in [*self.jobs.values(), *(s.job for s in self.sessions.values() if s.job)]:
            if now >= job.deadline:
                job.timed_out = True
                self.finish(job)
            elif nearest is None or job.deadline < nearest:
                nearest = job.deadline
        idle = self.limits.session_idle_s
        for sess in list(self.sessions.values()):
            if sess.job is None and now - sess.last_used > idle:
                self.end_session(sess)
        return nearest

    # -- completion --------------------------------------------------------------------------------------------

    @staticmethod
    def _drain(fd: int, buf: CappedBuffer) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not data or buf.append(data):
                return

    @staticmethod
    def _setup_failure(fd: int) -> str:
        """What the child wrote on its status pipe: set only when its isolation failed (empty otherwise)."""
        try:
            return os.read(fd, 65536).decode("utf-8", errors="replace")
        except (BlockingIOError, OSError):
            return ""

    def finish(self, job: Job) -> None:
        """Have the forker end what the snippet left running, collect its output and answer the request."""
        sess = job.session
        if sess is not None:
            sess.job = None
            sess.last_used = time.monotonic()
            if job.timed_out or job.over_output:
                self.end_session(sess, job)
                return
            self._tell("pause", sess.num)
            fds = sess.fds
        else:
            self.jobs.pop(job.num, None)
            self._tell("end", job.num)
            fds = job.fds
        self._answer(job, fds, "")
        if sess is None:
            if fds["code"] in self.writes:  # else closed already, and its number may be another job's now
                self._close(fds["code"])
            for name in ("out", "err", "status"):
                self._close(fds[name])

    def _answer(self, job: Job, fds: dict[str, int], note: str) -> None:
        self._drain(fds["out"], job.out)
        self._drain(fds["err"], job.err)
        failure = job.error or self._setup_failure(fds["status"])
        if job.wait_status is None and (job.timed_out or job.over_output):
            job.wait_status = signal.SIGKILL  # killed on our request
        status, code = classify(job.wait_status, job.timed_out, job.over_output, setup_failed=bool(failure))
        stderr = job.err.text()
        if failure:
            stderr += f"\n[sandbox] setup failed: {failure}\n"
        elif job.over_output:
            stderr += f"\n[sandbox] output exceeded {self.limits.max_output_bytes} bytes; the process was killed\n"
        elif job.timed_out:
            stderr += f"\n[sandbox] timed out after {job.deadline - job.started:.1f} s\n"
        self.reply(
            {
                "id": job.rid,
                "status": status,
                "stdout": job.out.text(),
                "stderr": stderr + note,
                "exit_code": code,
                "wall_s": time.monotonic() - job.started,
                "truncated": job.out.truncated or job.err.truncated,
            }
        )

    def end_session(self, sess: Session, job: Job | None = None) -> None:
        """End a session's process (the forker kills it and all it left) and answer its snippet, if one runs."""
        self.sessions.pop(sess.sid, None)
        self._tell("end", sess.num)
        job = job or sess.job
        sess.job = None
        if job is not None:
            if job.wait_status is None:
                job.wait_status = signal.SIGKILL
            self._answer(job, sess.fds, "\n[sandbox] the session ended; its state is lost\n")
        for fd in sess.fds.values():
            self._close(fd)

    def _close(self, fd: int) -> None:
        self.writes.pop(fd, None)
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass

    # -- loop --------------------------------------------------------------------------------------------------

    def serve(self, ready: dict[str, Any]) -> None:
        self.reply(ready)
        while True:
            nearest = self.check_deadlines(time.monotonic())
            timeout = None if nearest is None else max(0.0, nearest - time.monotonic())
            if self.sessions:
                timeout = min(timeout if timeout is not None else 5.0, 5.0)  # idle expiry
            for key, _ in self.sel.select(timeout):
                kind, owner = key.data
                if kind == "proto":
                    if not self.read_requests():
                        return
                elif kind == "forker":
                    if not self.on_forker():
                        sys.stderr.write("[zygote] the forker died; exiting\n")
                        return
                elif not self._still_watched(key):
                    # Handling an earlier event of this batch closed this fd and a new job's pipe reused the number:
                    # reading now would hand the new job's output to the finished one (lost output, seen as an
                    # empty stdout about 3 times in 1000 at 32 concurrent snippets). The new job's own event comes
                    # with the next select.
                    continue
                elif kind == "code":
                    self.on_writable(key.fd)
                elif kind == "done":
                    self.on_done(owner)
                else:
                    self.on_output(kind, owner, key.fd)

    def _still_watched(self, key: selectors.SelectorKey) -> bool:
        """Whether ``key``'s fd is still registered for the same owner as when select() reported it."""
        current = self.sel.get_map().get(key.fd)
        return current is not None and current.data is key.data

    def read_requests(self) -> bool:
        try:
            data = os.read(self.proto_in, 1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.inbuf += data
        while b"\n" in self.inbuf:
            line, self.inbuf = self.inbuf.split(b"\n", 1)
            if line.strip():
                msg: Any = None
                try:
                    msg = json.loads(line)
                    self.handle(msg)
                except Exception as exc:  # noqa: BLE001 - a bad request (or a failed spawn) must not take us down
                    # Answer with the request's id: a reply the client cannot match would leave its caller waiting.
                    rid = msg.get("id") if isinstance(msg, dict) else None
                    self.reply({"id": rid, "status": "sandbox_error", "stderr": f"sandbox: {exc!r}"})
        return True

    def shutdown(self) -> None:
        """Closing the socket makes the forker kill every process and delete the scratch root; wait for it."""
        self.sock.close()
        os.waitpid(self.forker_pid, 0)


UID_LOCK_DIR = "/tmp/torl-uid-locks"  # machine-wide; not "torl-sandbox-*", which stale-root removal sweeps


def claim_uid_block(preferred: int, size: int, tries: int = 256) -> tuple[int, int]:
    """Hold a uid block no other live zygote on this machine holds: ``(base, fd)``; the lock dies with the fd.

    The preferred block (``sandbox.uid_base`` + 1000 x rank) is taken when free, else the next free one above it.
    """
    os.makedirs(UID_LOCK_DIR, mode=0o700, exist_ok=True)
    st = os.lstat(UID_LOCK_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise RuntimeError(f"{UID_LOCK_DIR} is not a directory of this user's that only it can write: remove it")
    for k in range(tries):
        base = preferred + k * size
        path = os.path.join(UID_LOCK_DIR, f"{base}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return base, fd
        except BlockingIOError:
            os.close(fd)
    raise RuntimeError(f"no free sandbox uid block among {tries} from uid {preferred}: too many sandbox workers here")


def _warm(preload: list[str]) -> None:
    """Import the preloaded modules and run a little of sympy so its caches and lazy imports are paid once, here."""
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module only costs snippets speed
            sys.stderr.write(f"[zygote] could not preload {name}: {exc!r}\n")
    if "sympy" in sys.modules:
        sympy = sys.modules["sympy"]
        x = sympy.Symbol("x")
        sympy.factorint(123456)
        sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2)
        sympy.solve(x**2 - 2, x)
        sympy.Rational(1, 3) + sympy.sqrt(2)
    if "numpy" in sys.modules:
        np = sys.modules["numpy"]
        np.linalg.solve(np.eye(3), np.ones(3))


def main(argv: list[str]) -> int:
    limits = Limits.from_json(argv[1] if len(argv) > 1 else "")
    # Keep the protocol on private fds; fd 0/1 become /dev/null and stderr so nothing stray corrupts the protocol.
    proto_in, proto_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    # Each slot holds a few fds (its namespaces); a zygote with hundreds of sessions needs more than the usual soft
    # limit of 1024. Snippets get their own, small limit.
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    try:
        layers = set_up(limits)  # first: it may enter a user namespace, which needs a single thread
    except IsolationUnavailable as exc:
        os.write(proto_out, (json.dumps({"id": None, "status": "refused", "stderr": str(exc)}) + "\n").encode())
        return 3
    # Die with the worker that started us (set after set_up: entering a user namespace clears it).
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    scratch.remove_stale_roots(limits.scratch_root)
    root, _root_lock = scratch.make_root(limits.scratch_root)  # held open for the zygote's life (its lock)
    os.chdir(root)
    os.environ["HOME"] = root  # caches a preloaded library writes go here, not to a shared directory
    _warm(limits.preload)
    privileged = layers.identity == "uid"  # snippets get uids of their own
    # Two pools on one machine (training beside evaluation or serving) would otherwise hand out the same uids, and
    # snippets of one could signal the other's processes.
    uid_base = limits.uid_base
    if privileged:
        uid_base, _lock = claim_uid_block(limits.uid_base, limits.uid_block)
    hidden = hidden_prefixes([sys.base_prefix, sys.prefix]) if privileged else []
    if hidden and not layers.namespaces:
        sys.stderr.write(
            f"[zygote] snippets run as uid {uid_base}+ and cannot read the Python installation under "
            f"{hidden[0][0]} (not world-readable), and no mount namespace is available to re-expose it: "
            "only preloaded modules will import. Use a Python outside that directory or allow namespaces "
            '(docs/sandbox.md ("Layers")).\n'
        )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # The forker: forked now, warm and before any request is read, so no child it forks holds anyone's code or output.
    pid = os.fork()
    if pid == 0:
        ours.close()
        for fd in (proto_in, proto_out):
            os.close(fd)
        forker.run(limits, layers, theirs, root, uid_base, hidden)
    theirs.close()
    if json.loads(ours.recv(4096) or b"{}").get("op") != "ready":
        raise RuntimeError("the sandbox forker did not start (see its error above)")
    zygote = Zygote(limits, proto_in, proto_out, layers, ours, pid)
    try:
        zygote.serve(
            {
                "id": None,
                "status": "ready",
                "pid": os.getpid(),
                "forker_pid": pid,
                "isolation": layers.report.as_dict(),
                "uid_base": uid_base,
                "uid_block": limits.uid_block,
            }
        )
    finally:
        zygote.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
