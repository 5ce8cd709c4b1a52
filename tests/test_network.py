"""Where a run listens (megatron_edit/network.py): the interface named or the route to the master, and torch's
stores held to it. (tests/test_replica_jobs.py lists every listening socket of a running multi-replica job.)"""
import os
import socket

import psutil
import pytest
import torch.distributed as dist
from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, static_tcp_rendezvous
from torch.distributed.run import get_args_parser

from megatron_edit import network
from megatron_edit.errors import UsageError
from megatron_edit.launch import bind_to_sync_interface, master_host


def other_interface():
    """An interface of this machine with an IPv4 address that is not loopback (CI machines have one)."""
    for name, addresses in psutil.net_if_addrs().items():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return network.ListenInterface(name, address.address)
    pytest.skip("this machine has no network interface but loopback")


def listening(store) -> set:
    return {c.laddr.ip for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port}


def test_the_default_is_the_route_to_the_master_and_a_named_interface_must_exist(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    assert network.listen_interface(None, "127.0.0.1").address == "127.0.0.1"
    assert network.listen_interface(None, "localhost").address == "127.0.0.1"
    eth = other_interface()
    assert network.listen_interface(None, eth.address) == eth
    assert network.listen_interface(eth.name, "127.0.0.1") == eth  # named: whatever the master
    with pytest.raises(UsageError, match="--sync-interface nosuch0: this machine has no such network interface"):
        network.listen_interface("nosuch0", "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert network.listen_interface(None, eth.address).name == "lo"  # the user's own gloo setting is the default
    with pytest.raises(UsageError, match=f"--sync-interface {eth.name} but GLOO_SOCKET_IFNAME=lo: name one"):
        network.listen_interface(eth.name, "127.0.0.1")


def test_a_store_listens_on_the_interface_only_or_on_loopback_when_reached_there(monkeypatch):
    eth = other_interface()
    monkeypatch.setattr(network.BoundTCPStore, "LISTEN_ADDRESS", eth.address)
    store = network.BoundTCPStore(eth.address, 0, 1, is_master=True, wait_for_workers=False)
    assert listening(store) == {eth.address}
    store.set("k", "v")
    assert dist.TCPStore(eth.address, store.port, is_master=False).get("k") == b"v"
    local = network.BoundTCPStore("localhost", 0, 1, is_master=True, wait_for_workers=False)
    assert listening(local) == {"127.0.0.1"}  # torchrun --standalone tells its agent "localhost"


def test_the_launcher_binds_its_stores_where_the_script_says_and_advertises_that_address(monkeypatch):
    eth = other_interface()
    for variable in network.INTERFACE_VARIABLES:  # set by the launcher, put back as they were after
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    for module in (dist, c10d_rendezvous_backend, static_tcp_rendezvous):  # what bind_stores replaces, put back after
        monkeypatch.setattr(module, "TCPStore", module.TCPStore)
    monkeypatch.setattr(network.BoundTCPStore, "LISTEN_ADDRESS", None)
    argv = ["--standalone", "--nproc-per-node=2", "pretrain_gpt.py", "--sync-interface", eth.name]
    assert bind_to_sync_interface(argv) == ["--local-addr", eth.address, *argv]
    assert network.BoundTCPStore.LISTEN_ADDRESS == eth.address and dist.TCPStore is network.BoundTCPStore
    assert os.environ["GLOO_SOCKET_IFNAME"] == eth.name
    parse = get_args_parser().parse_args
    assert master_host(parse(argv)) == "127.0.0.1"
    assert master_host(parse(["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node7:29500",
                              "x.py"])) == "node7"
    assert master_host(parse(["--master-addr", "10.0.0.5", "x.py"])) == "10.0.0.5"
