"""A Ray cluster of several nodes on this machine, for tests that submit jobs to it (tests/integration/
test_cluster_job.py): each node a real ``ray start`` (scripts/ray_cluster.sh) with its own loopback address
(127.0.0.3 for the head, 127.0.0.2, ... for the others), its own ports, temp dir and resources.

Every process of a node carries ``TORL_TEST_NODE=<cluster tag>:<node name>`` in its environment (Ray's workers
inherit their raylet's), so the test can find, kill and account for exactly its own processes: other Ray clusters on
the machine are left alone. Processes that do not inherit the environment (the sandbox zygote starts with a minimal
one) are found as descendants of the marked ones.

Run as root, the nodes live in a PID namespace of their own (``unshare``; each ``ray_cluster.sh`` call enters it with
``nsenter``), so ``ray_cluster.sh stop``, which is ``ray stop`` and stops every Ray process it can see, can be run
for real: it sees this cluster only, not the test session's own Ray or another suite's. Seen from outside, the
namespace's processes are ordinary processes of the machine; killing its init ends them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
MARK = "TORL_TEST_NODE"
# The PID namespace's init: it reaps the processes the namespace adopts (ray start's daemons, orphans).
REAPER = """import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    ip: str
    temp_dir: Path
    resources: dict[str, float]
    cpus: int
    env: dict[str, str]
    args: list[str] = field(default_factory=list)


@dataclass
class LocalCluster:
    """Start with ``start_head`` then ``add_node``; ``stop`` kills every process of the cluster and reports any that
    outlived it. ``seen`` accumulates every process the cluster ever had (pid -> (create_time, description))."""

    root: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    nodes: dict[str, Node] = field(default_factory=dict)
    gcs_port: int = 0
    dashboard_port: int = 0
    seen: dict[int, tuple[float, str]] = field(default_factory=dict)
    init_pid: int = 0  # the PID namespace's init (host pid); 0 when the nodes run in the machine's namespace
    no_namespace: str = ""  # why the nodes run in the machine's PID namespace, if they do

    def enter_namespace(self) -> str:
        """Start a PID namespace for the nodes (before any of them); returns why not, or "" once it runs."""
        if os.geteuid() != 0:
            return "needs root (unshare --pid, nsenter)"
        holder = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", REAPER],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (children := psutil.Process(holder.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not children:
            holder.kill()
            return "unshare started no namespace"
        self.init_pid = children[0].pid
        return ""

    def _in_namespace(self, cmd: list[str]) -> list[str]:
        return ["nsenter", "--target", str(self.init_pid), "--pid", "--mount", *cmd] if self.init_pid else cmd

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def base_env(self, name: str, ip: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLLM_"))}
        env.pop("TORL_HOME", None)
        env.update({MARK: f"{self.tag}:{name}", "TORL_NODE_IP": ip, "RAY_USAGE_STATS_ENABLED": "0"})
        return env

    def _node_ports(self) -> list[str]:
        names = [
            "node-manager-port",
            "object-manager-port",
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        ]
        return [f"--{n}={p}" for n, p in zip(names, free_ports(len(names)), strict=True)]

    def _ray_cluster_sh(self, node: Node, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            self._in_namespace(["bash", str(REPO / "scripts" / "ray_cluster.sh"), *args]),
            env=node.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, (
            f"ray_cluster.sh {' '.join(args[:1])} ({node.name}):\n{proc.stdout}\n{proc.stderr}"
        )
        self.snapshot()
        return proc.stdout + proc.stderr

    def start_head(self, cpus: int, resources: dict[str, float], ip: str = "127.0.0.3") -> Node:
        import json

        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        node = Node("head", ip, self.root / "head", resources, cpus, self.base_env("head", ip))
        args = [
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={client_port}",
            f"--temp-dir={node.temp_dir}",
            f"--num-cpus={cpus}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=200000000",
            *self._node_ports(),
        ]
        self.nodes["head"] = node
        node.args = args
        self._ray_cluster_sh(node, "start", *args)
        return node

    def add_node(self, name: str, ip: str, cpus: int, resources: dict[str, float]) -> Node:
        import json

        node = Node(name, ip, self.root / name, resources, cpus, self.base_env(name, ip))
        args = [
            f"--temp-dir={node.temp_dir}",
            f"--num-cpus={cpus}",
            f"--resources={json.dumps(resources)}",
            "--object-store-memory=200000000",
            *self._node_ports(),
        ]
        node.args = args
        self.nodes[name] = node
        self._ray_cluster_sh(node, "join", self.gcs_address, *args)
        return node

    def submit_env(self) -> dict[str, str]:
        """The environment ``ray_cluster.sh submit`` runs under: the head's, pointed at its dashboard."""
        return {**self.head.env, "RAY_API_SERVER_ADDRESS": self.dashboard}

    # -- processes ------------------------------------------------------------------------------------------------
    def processes(self, name: str | None = None) -> list[psutil.Process]:
        """Live processes of node ``name`` (all nodes: None): marked ones and their descendants."""
        want = f"{self.tag}:{name}" if name else f"{self.tag}:"
        marked = []
        for proc in psutil.process_iter():
            try:
                value = proc.environ().get(MARK, "")
            except (psutil.Error, OSError):
                continue
            if value == want or (name is None and value.startswith(want)):
                marked.append(proc)
        found = {p.pid: p for p in marked}
        for proc in marked:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.Error:
                continue
        return list(found.values())

    def snapshot(self) -> list[psutil.Process]:
        procs = self.processes()
        for proc in procs:
            try:
                self.seen.setdefault(proc.pid, (proc.create_time(), " ".join(proc.cmdline())[:160]))
            except psutil.Error:
                continue
        return procs

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> int:
        """What losing the machine does: every process of node ``name`` gets ``sig`` at once. Returns how many."""
        self.snapshot()
        procs = self.processes(name)
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                continue
        return len(procs)

    def survivors(self) -> list[str]:
        """Processes this cluster ever had that are still alive (same pid and start time), and any still marked."""
        alive = []
        for pid, (created, what) in self.seen.items():
            try:
                if psutil.Process(pid).create_time() == created:
                    alive.append(f"{pid} {what}")
            except psutil.Error:
                continue
        alive += [f"{p.pid} {' '.join(p.cmdline())[:160]}" for p in self.processes() if p.pid not in self.seen]
        return alive

    def stop_with_script(self, timeout_s: float = 30.0) -> list[str]:
        """``scripts/ray_cluster.sh stop`` inside the namespace, as a user stops the nodes of a machine; returns what
        of the cluster is still running ``timeout_s`` later."""
        assert self.init_pid, "ray_cluster.sh stop would stop every Ray process of this machine"
        self.snapshot()
        self._ray_cluster_sh(self.head, "stop")
        deadline = time.monotonic() + timeout_s
        while (left := self.survivors()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def stop(self, grace_s: float = 10.0) -> list[str]:
        """SIGTERM every process of the cluster, SIGKILL what is left after ``grace_s``; returns the survivors. The
        namespace (if any) goes last, and with it anything left in it."""
        try:
            return self._stop(grace_s)
        finally:
            if self.init_pid:
                os.kill(self.init_pid, signal.SIGKILL)

    def _stop(self, grace_s: float) -> list[str]:
        self.snapshot()
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for proc in self.processes():
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    continue
            for pid in list(self.seen):
                try:
                    if psutil.Process(pid).create_time() == self.seen[pid][0]:
                        psutil.Process(pid).send_signal(sig)
                except psutil.Error:
                    continue
            deadline = time.monotonic() + wait
            while self.survivors() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.survivors():
                break
        return self.survivors()
