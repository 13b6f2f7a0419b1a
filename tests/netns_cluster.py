"""A faithful multi-node Ray cluster on one machine: each node its own network, hostname and disks.

Each node is a network namespace with its own address on a bridge that lives in a namespace of its own
(198.18.0.0/24, the benchmarking range: nothing outside the namespaces this harness creates is addressed),
and a mount namespace with private tmpfs on /tmp and ~/.cache (node-local disks). The checkout (and its
.venv) is bound back in where it lies under one of them, so every node has the same dependencies, as a
cluster whose nodes were provisioned alike; on worker nodes the project's own packages are hidden (empty
tmpfs), so a sweep runs there only with the code its job ships (trials.run.job_runtime_env). One plain directory, `shared`, plays the NFS mount every node sees.
Each node's /etc/hosts maps its own hostname to 127.0.1.1, as Debian does: nothing may rely on it.

Needs root (ip netns, unshare); `available()` says why not where it cannot run. Everything it starts is
ended by PID, its namespaces deleted, on every exit path.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from trials.run import PROJECT_PACKAGES  # hidden on worker nodes: the job ships them

SUBNET = "198.18.0"
HEAD_PORT = 6379
HEALTH_CHECKS = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
REPO = Path(__file__).resolve().parents[1]

# Runs as the node's first process, inside its own network, mount and UTS namespaces: the node-local disks,
# the checkout bound back where a tmpfs covers it, the project's packages hidden on worker nodes (only the
# dependencies are installed there: the code comes with the job), its hostname and hosts file; then the command.
NODE_INIT = r"""
set -eu
stash=$1 hosts=$2 name=$3 hide=$4; shift 4
mount --make-rprivate /
mkdir -p "$stash" && mount --bind "$REPO" "$stash"
mount -t tmpfs -o size=4g tmpfs /tmp
mkdir -p "$HOME/.cache" && mount -t tmpfs -o size=4g tmpfs "$HOME/.cache"
if [ ! -d "$REPO/.venv" ]; then mkdir -p "$REPO" && mount --bind "$stash" "$REPO"; fi
for package in $hide; do mount -t tmpfs -o size=1m tmpfs "$REPO/$package"; done
mount --bind "$hosts" /etc/hosts
hostname "$name"
ip link set lo up
exec "$@"
"""


def available() -> str | None:
    """None when namespaces can be made here, else the reason (the tests skip with it)."""
    if os.geteuid() != 0:
        return "needs root for network and mount namespaces"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = f"qlr-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip()}")


@dataclass
class Node:
    name: str
    ip: str
    netns: str
    pid: int = 0  # the node's first process (its `ray start --block`): its namespaces are entered through it
    log: Path | None = None

    def enter(self) -> list[str]:
        """The command prefix that runs a process on this node (its network, mount and UTS namespaces)."""
        return ["nsenter", "-t", str(self.pid), "--net", "--mount", "--uts", "--"]


@dataclass
class NamespacedCluster:
    """A head (0 CPUs, a `head` resource for trial drivers) and `workers` nodes of 1 CPU each."""

    workers: int = 2
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="qlr-cluster-", dir="/var/tmp")))
    nodes: list[Node] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"qlr-{tag}-br"
        self.nodes = [
            Node(f"node{i}", f"{SUBNET}.{i + 1}", f"qlr-{tag}-n{i}") for i in range(self.workers + 1)
        ]
        self.shared = (
            self.root / "shared"
        )  # the "NFS" directory: outside /tmp and ~/.cache, so every node sees it

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{HEAD_PORT}"

    def __enter__(self) -> NamespacedCluster:
        try:
            self._network()
            self.shared.mkdir(parents=True)
            (self.root / "auth_token").write_text(secrets.token_hex(32))
            self._start_node(self.head, ["--head", "--port", str(HEAD_PORT), "--num-cpus", "0",
                                         "--resources", '{"head": 1}',
                                         # a lost node is declared dead in ~3 s, not ~30
                                         "--system-config", HEALTH_CHECKS])  # fmt: skip
            self._wait_for(lambda: self._port_open(self.head, HEAD_PORT), "the head's GCS")
            for node in self.nodes[1:]:
                self._start_node(node, ["--address", self.address, "--num-cpus", "1"])
            self._wait_for(lambda: self.alive_nodes() == len(self.nodes), "every node to join")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _network(self) -> None:
        _ip("netns", "add", self.bridge)
        _ip("link", "add", "br0", "type", "bridge", netns=self.bridge)
        _ip("link", "set", "br0", "up", netns=self.bridge)
        for i, node in enumerate(self.nodes):
            _ip("netns", "add", node.netns)
            # The pair is made inside the node's namespace, one end then moved to the bridge's: nothing is
            # ever created in this machine's own namespace.
            _ip("link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", netns=node.netns)
            _ip("link", "set", f"p{i}", "netns", self.bridge, netns=node.netns)
            _ip("addr", "add", f"{node.ip}/24", "dev", "eth0", netns=node.netns)
            _ip("link", "set", "eth0", "up", netns=node.netns)
            _ip("link", "set", f"p{i}", "master", "br0", netns=self.bridge)
            _ip("link", "set", f"p{i}", "up", netns=self.bridge)

    def _hosts_file(self, node: Node) -> Path:
        """Debian's default: the node's own hostname is 127.0.1.1, a loopback address; the others resolve."""
        path = self.root / f"hosts-{node.name}"
        others = "".join(f"{n.ip} {n.name}\n" for n in self.nodes if n is not node)
        path.write_text(f"127.0.0.1 localhost\n127.0.1.1 {node.name}\n{others}")
        return path

    def env(self, **extra: str) -> dict[str, str]:
        """Every process of the cluster: the same install, offline, and the cluster's own token (Ray 2.60 turns
        token authentication on at `ray start --head` whenever a token exists; this one is the cluster's)."""
        keep = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**keep, "REPO": str(REPO), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.root / "auth_token"), **extra}  # fmt: skip

    def _start_node(self, node: Node, ray_args: list[str]) -> None:
        node.log = self.root / f"{node.name}.log"
        ray = str(Path(sys.executable).parent / "ray")
        command = ["ip", "netns", "exec", node.netns, "unshare", "--mount", "--uts", "--", "bash", "-c",
                   NODE_INIT, "node-init", str(self.root / f"stash-{node.name}"), str(self._hosts_file(node)),
                   node.name, "" if node is self.head else " ".join(PROJECT_PACKAGES), ray, "start", "--block", "--node-ip-address", node.ip, "--disable-usage-stats",
                   "--object-store-memory", str(200 * 2**20), *ray_args]  # fmt: skip
        with node.log.open("w") as log:
            proc = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        node.pid = proc.pid  # `ip netns exec` and unshare exec in place: this PID is the node's first process

    def run(self, node: Node, command: list[str], *, timeout: float, cwd: Path | None = None,
            **env: str) -> subprocess.CompletedProcess:  # fmt: skip
        """A command on `node`, as a process started there would run (its disks, network and hostname)."""
        inner = f"cd {shlex.quote(str(cwd or self.shared))} && exec {shlex.join(command)}"
        return subprocess.run([*node.enter(), "bash", "-c", inner], env=self.env(**env), capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def start(self, node: Node, command: list[str], log: Path, **env: str) -> subprocess.Popen:
        """A background process on `node` (a server), ended with the cluster."""
        with log.open("w") as out:
            proc = subprocess.Popen([*node.enter(), *command], env=self.env(**env), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def _port_open(self, node: Node, port: int) -> bool:
        probe = f"import socket; socket.create_connection(({node.ip!r}, {port}), timeout=1).close()"
        return self.run(node, [sys.executable, "-c", probe], timeout=30).returncode == 0

    def alive_nodes(self) -> int:
        script = (
            "import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        done = self.run(self.head, [sys.executable, "-c", script], timeout=60, RAY_ADDRESS=self.address)
        lines = done.stdout.strip().splitlines()
        return int(lines[-1]) if done.returncode == 0 and lines else 0

    def _wait_for(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "\n".join(f"--- {n.name}\n{n.log.read_text()[-1500:]}" for n in self.nodes if n.log)
                raise RuntimeError(f"namespaced cluster: gave up waiting for {what}\n{logs}")
            time.sleep(1)

    def processes(self, node: Node) -> dict[int, str]:
        """The node's processes (PID -> command line), seen from this machine."""
        listed = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True).stdout
        found = {}
        for pid in {int(p) for p in listed.split()}:
            with contextlib.suppress(OSError):
                found[pid] = (
                    Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
        return found

    def kill(self, node: Node) -> None:
        """The node dies at once, as a machine that loses power: every process in it, by PID."""
        for pid in self.processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """End every process in the namespaces (by PID), then the namespaces; the tmpfs mounts go with them."""
        for node in self.nodes:
            self.kill(node)
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for netns in [n.netns for n in self.nodes] + [self.bridge]:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
