"""Where a job listens: every socket this project opens, or makes torch, gloo, NCCL and torchft open, binds the
address of one network interface (`--sync-interface`), never all interfaces.

The default is the interface this node reaches the job's master through: loopback for a run on one machine, the
cluster network under Slurm or a multi-node torchrun. Replicas in other clusters need the interface they reach this
one on (e.g. a WireGuard `wg0`): name it. torch's TCPStore listens on every interface whatever host it is given, so
a store this process hosts is handed a socket already bound here (`BoundTCPStore`); gloo and NCCL take the interface
by name from their environment variables.
"""
import dataclasses
import datetime
import ipaddress
import os
import socket
from typing import Optional

import psutil
import torch.distributed as dist

from megatron_edit.errors import UsageError

# What gloo, NCCL and torch's TensorPipe read to choose the interface they listen on and connect from.
INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME")


@dataclasses.dataclass(frozen=True)
class ListenInterface:
    name: str
    address: str  # its IPv4 address, or a global IPv6 one where it has none

    @property
    def host(self) -> str:
        """The address as a URL or gRPC target spells it (IPv6 in brackets)."""
        return f"[{self.address}]" if ":" in self.address else self.address

    def host_port(self, port: int) -> str:
        return f"{self.host}:{port}"

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback


def interface_named(name: str) -> ListenInterface:
    addresses = psutil.net_if_addrs().get(name)
    if addresses is None:
        raise UsageError(f"--sync-interface {name}: this machine has no such network interface (it has "
                         f"{', '.join(sorted(psutil.net_if_addrs()))})")
    for family in (socket.AF_INET, socket.AF_INET6):
        for address in addresses:  # a link-local IPv6 address needs its scope to be reached: not one to advertise
            if address.family == family and not ipaddress.ip_address(address.address.split("%")[0]).is_link_local:
                return ListenInterface(name, address.address.split("%")[0])
    raise UsageError(f"--sync-interface {name}: the interface has no IP address; bring it up or name another")


def interface_with_address(address: str) -> ListenInterface:
    wanted = ipaddress.ip_address(address)
    for name, addresses in psutil.net_if_addrs().items():
        for candidate in addresses:
            if candidate.family in (socket.AF_INET, socket.AF_INET6) and \
                    ipaddress.ip_address(candidate.address.split("%")[0]) == wanted:
                return ListenInterface(name, str(wanted))
    raise UsageError(f"no network interface of this machine has the address {address}; name one with "
                     "--sync-interface")


def route_to(host: str) -> ListenInterface:
    """The interface this machine reaches `host` through (a UDP socket's connect sends nothing)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve the master address {host!r} ({exc.strerror}); name the interface to "
                         "listen on with --sync-interface") from None
    if ipaddress.ip_address(address[0]).is_loopback:
        return interface_with_address("127.0.0.1" if family == socket.AF_INET else "::1")
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return interface_with_address(probe.getsockname()[0])


def listen_interface(name: Optional[str], master_host: Optional[str] = None) -> ListenInterface:
    """The interface named (the flag, else GLOO_SOCKET_IFNAME if the user set it), else the route to the master
    (default: this process's MASTER_ADDR, loopback when none is set yet)."""
    if name and os.environ.get("GLOO_SOCKET_IFNAME", name) != name:
        raise UsageError(f"--sync-interface {name} but GLOO_SOCKET_IFNAME={os.environ['GLOO_SOCKET_IFNAME']}: name "
                         "one interface (unset the variable, or drop the flag)")
    name = name or os.environ.get("GLOO_SOCKET_IFNAME")
    return interface_named(name) if name else route_to(master_host or os.environ.get("MASTER_ADDR", "127.0.0.1"))


def interface_in_use() -> ListenInterface:
    """The interface use_interface chose for this process."""
    return interface_named(os.environ["GLOO_SOCKET_IFNAME"])


def use_interface(interface: ListenInterface) -> None:
    """gloo, NCCL and TensorPipe listen (and connect) on `interface` in this process and the ones it starts; an
    NCCL_SOCKET_IFNAME the user set (NCCL takes prefixes and exclusions) is theirs to keep."""
    for variable in INTERFACE_VARIABLES:
        if variable == "GLOO_SOCKET_IFNAME" or variable not in os.environ:
            os.environ[variable] = interface.name


def bound_socket(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(1024)
    return listener


class BoundTCPStore(dist.TCPStore):
    """torch's TCPStore, whose server (is_master) listens on `LISTEN_ADDRESS` only, or on loopback when its clients
    are told a loopback host (torchrun --standalone's rendezvous): never wider than the address it is reached at."""
    LISTEN_ADDRESS: Optional[str] = None

    def __init__(self, host_name: str, port: int, world_size: Optional[int] = None, is_master: bool = False,
                 timeout: datetime.timedelta = datetime.timedelta(seconds=300), wait_for_workers: bool = True,
                 multi_tenant: bool = False, master_listen_fd: Optional[int] = None, use_libuv: bool = True):
        if is_master and master_listen_fd is None and self.LISTEN_ADDRESS is not None:
            address = loopback_address(host_name) or self.LISTEN_ADDRESS
            try:
                self._listener = bound_socket(address, port)  # the store serves it while this object lives
            except OSError as exc:  # as torch says it: torchrun's rendezvous then joins the store already there
                raise dist.DistNetworkError(f"cannot listen on {address}:{port}: {exc.strerror}") from None
            master_listen_fd = self._listener.fileno()
        super().__init__(host_name, port, world_size, is_master, timeout, wait_for_workers, multi_tenant,
                         master_listen_fd, use_libuv)


def loopback_address(host: str) -> Optional[str]:
    """`host`'s address if it is a loopback one (localhost, 127.0.0.1, ::1), else None."""
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return None
    return address if ipaddress.ip_address(address).is_loopback else None


def bind_stores(interface: ListenInterface) -> None:
    """Every TCPStore server this process creates from now on (torchrun's agent's rendezvous and worker stores, a
    rank's own) listens on `interface` only."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous

    BoundTCPStore.LISTEN_ADDRESS = interface.address
    for module in (dist, c10d_rendezvous_backend, static_tcp_rendezvous):
        module.TCPStore = BoundTCPStore
