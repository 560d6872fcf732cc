"""A Ray cluster of several nodes on this machine, for tests that submit jobs to it (tests/integration/
test_cluster_job.py): each node a real ``ray start`` (scripts/ray_cluster.sh) with its own loopback address
(127.0.0.3 for the head, 127.0.0.2, ... for the others), its own ports, temp dir and resources.

Every process of a node carries ``TORL_TEST_NODE=<cluster tag>:<node name>`` in its environment (Ray's workers
inherit their raylet's), so the test can find, kill and account for exactly its own processes: other Ray clusters on
the machine are left alone. Processes that do not inherit the environment (the sandbox zygote starts with a minimal
one) are found as descendants of the marked ones.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
MARK = "TORL_TEST_NODE"


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
            ["bash", str(REPO / "scripts" / "ray_cluster.sh"), *args],
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

    def stop(self, grace_s: float = 10.0) -> list[str]:
        """SIGTERM every process of the cluster, SIGKILL what is left after ``grace_s``; returns the survivors."""
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
