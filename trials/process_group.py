"""The trial's torch process group rendezvous over each node's Ray address, not its hostname's.

gloo (and NCCL's bootstrap) advertise the address the worker's hostname resolves to. Where /etc/hosts maps
the hostname to a loopback address (Debian's `127.0.1.1 <hostname>`, or 127.0.0.1 on some images), a trial
whose workers span nodes fails in `Gloo connectFullMesh ... remote=[127.0.0.1]` (issue 26). Ray already knows
each node's reachable address (`ray start --node-ip-address`), so every worker binds its sockets to the
interface that holds it, unless the user set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME themselves.
"""

from __future__ import annotations

import os
import socket

import psutil
import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


def interface_holding(address: str) -> str | None:
    """The network interface that has `address` (psutil: no portable stdlib call lists interface addresses)."""
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address == address for a in addresses):
            return name
    return None


def bind_to_ray_node_address() -> None:
    """On a Train worker, before its process group exists: sockets on the Ray node address's interface."""
    name = interface_holding(ray.util.get_node_ip_address())
    if name is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)


class _NodeAddressBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        worker_group.execute(bind_to_ray_node_address)
        super().on_start(worker_group, backend_config)


class NodeAddressTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose workers rendezvous over their Ray node addresses."""

    @property
    def backend_cls(self):
        return _NodeAddressBackend
