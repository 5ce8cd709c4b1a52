"""Replica jobs prove a shared secret: to the lighthouse's gate, and to each other over the heal transport (real
servers and clients), and the secret file's checks. (tests/test_replica_jobs.py runs a replica with another secret
against real ones.)"""
import contextlib
import http.server
import os
import socket
import threading
import urllib.request
from datetime import timedelta

import pytest
import torch

from megatron_edit import lighthouse
from megatron_edit import sync_secret
from megatron_edit.dp.local_sgd.heal_transport import AuthenticatedHealTransport
from megatron_edit.errors import TrainingError, UsageError
from megatron_edit.network import ListenInterface

LOOPBACK = ListenInterface("lo", "127.0.0.1")
TIMEOUT = timedelta(seconds=10)
STATE = {"iteration": 12, "layout": (1, 1, 2), "anchors": [torch.arange(4.0)], "detectors": [{"mean": 0.5}]}


@pytest.fixture
def transports():
    made = []

    def make(secret: bytes, timeout: timedelta = TIMEOUT) -> AuthenticatedHealTransport:
        made.append(AuthenticatedHealTransport(secret, LOOPBACK, timeout))
        return made[-1]

    yield make
    for transport in made:
        transport.shutdown()


def test_heal_state_travels_between_replicas_holding_the_same_secret(transports):
    server, client = transports(b"a" * 32, timeout=timedelta(seconds=1)), transports(b"a" * 32)
    server.send_checkpoint(dst_ranks=[0], step=5, state_dict=STATE, timeout=TIMEOUT)
    received = client.recv_checkpoint(src_rank=0, metadata=server.metadata(), step=5, timeout=TIMEOUT)
    assert received["iteration"] == 12 and received["layout"] == (1, 1, 2)
    assert torch.equal(received["anchors"][0], torch.arange(4.0))
    server.disallow_checkpoint()
    with pytest.raises(Exception, match="404"):  # served only while torchft lets it (asked for, it waits 1 s)
        client.recv_checkpoint(src_rank=0, metadata=server.metadata(), step=5, timeout=TIMEOUT)


def test_a_replica_with_another_secret_is_refused_on_both_sides(transports, capfd):
    server, stranger = transports(b"a" * 32), transports(b"b" * 32)
    server.send_checkpoint(dst_ranks=[0], step=5, state_dict=STATE, timeout=TIMEOUT)
    with pytest.raises(TrainingError) as excinfo:
        stranger.recv_checkpoint(src_rank=0, metadata=server.metadata(), step=5, timeout=TIMEOUT)
    assert "refused this replica: it holds another sync secret" in str(excinfo.value)
    assert "warning: refused a heal request from 127.0.0.1: it did not prove the sync secret" in capfd.readouterr().err
    # ... and a server with another secret cannot make a replica take its state
    stranger.send_checkpoint(dst_ranks=[0], step=5, state_dict=STATE, timeout=TIMEOUT)
    with pytest.raises(TrainingError) as excinfo:
        transports(b"b" * 31 + b"c").recv_checkpoint(src_rank=0, metadata=stranger.metadata(), step=5,
                                                     timeout=TIMEOUT)
    assert "refused this replica" in str(excinfo.value)


def test_heal_state_changed_on_the_way_fails_its_proof(transports):
    """A relay between the replicas (what sits on a network we do not own) passes the request on and flips one bit
    of the state it relays back: the proof, over the payload's digest, fails."""
    server, client = transports(b"a" * 32), transports(b"a" * 32)
    server.send_checkpoint(dst_ranks=[0], step=5, state_dict=STATE, timeout=TIMEOUT)

    class Relay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            headers = {name: self.headers[name] for name in ("X-Sync-Nonce", "X-Sync-Proof")}
            with urllib.request.urlopen(urllib.request.Request(server.metadata() + "5", headers=headers)) as answer:
                payload, proof = bytearray(answer.read()), answer.headers["X-Sync-Proof"]
            payload[len(payload) // 2] ^= 1
            self.send_response(200)
            self.send_header("X-Sync-Proof", proof)
            self.end_headers()
            self.wfile.write(payload)

    relay = http.server.HTTPServer(("127.0.0.1", 0), Relay)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    try:
        with pytest.raises(TrainingError) as excinfo:
            client.recv_checkpoint(src_rank=0, metadata=f"http://127.0.0.1:{relay.server_port}/heal/", step=5,
                                   timeout=TIMEOUT)
        assert "did not prove the sync secret (--sync-secret-file), or changed on the way" in str(excinfo.value)
    finally:
        relay.shutdown()


def test_a_secret_file_must_exist_be_long_enough_and_be_private(tmp_path):
    path = tmp_path / "secret"
    with pytest.raises(UsageError, match="no such file"):
        sync_secret.check_secret_file(str(path))
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(UsageError, match="5 bytes; a secret needs at least 16"):
        sync_secret.check_secret_file(str(path))
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(UsageError, match=f"readable by others than its owner .*; chmod 600 {path}"):
        sync_secret.check_secret_file(str(path))
    path.chmod(0o600)
    assert sync_secret.read_secret(str(path)) == path.read_bytes()
    assert sync_secret.read_secret(None) == b""


def echo_server() -> socket.socket:
    """What stands behind the gate here: a server that sends back what it receives."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(connection):
        with connection, contextlib.suppress(OSError):
            while data := connection.recv(4096):
                connection.sendall(data)

    threading.Thread(target=lambda: [threading.Thread(target=echo, args=(listener.accept()[0],), daemon=True)
                                     .start() for _ in iter(int, 1)], daemon=True).start()
    return listener


def test_the_lighthouse_gate_relays_a_replica_that_proves_the_secret_and_refuses_one_that_does_not(capfd):
    behind = echo_server()
    gate_listener = socket.create_server(("127.0.0.1", 0))
    gate = lighthouse.Gate(b"a" * 32, behind.getsockname())
    threading.Thread(target=lighthouse._serve, args=(gate_listener, gate.handle), daemon=True).start()
    gate_url = f"http://127.0.0.1:{gate_listener.getsockname()[1]}"

    forwarder = lighthouse.GateForwarder(gate_url, b"a" * 32)  # what a replica's rank 0 runs
    with socket.create_connection(("127.0.0.1", int(forwarder.url.rsplit(":", 1)[1])), timeout=10) as through:
        through.sendall(b"quorum please")
        assert through.recv(100) == b"quorum please"

    with socket.create_connection(gate_listener.getsockname(), timeout=10) as stranger:  # the handshake, wrong key
        nonce = os.urandom(lighthouse.NONCE_BYTES)
        stranger.sendall(lighthouse.HELLO + nonce)
        theirs = stranger.recv(len(lighthouse.HELLO) + lighthouse.NONCE_BYTES)[len(lighthouse.HELLO):]
        stranger.sendall(sync_secret.proof(b"b" * 32, "replica", nonce, theirs))
        assert stranger.recv(1) == lighthouse.REFUSED and stranger.recv(1) == b""  # and closed
    assert "warning: the lighthouse gate refused a connection from 127.0.0.1: it did not prove the sync secret " \
           "(--sync-secret-file)" in capfd.readouterr().err


def test_a_replica_leaves_in_one_line_when_the_lighthouse_is_not_a_gate_or_a_gate_of_another_secret(monkeypatch):
    """What the forwarder ends its replica with (GateForwarder._end exits the process; here it records the line)."""
    lines = []
    monkeypatch.setattr(lighthouse.GateForwarder, "_end", staticmethod(lines.append))
    behind = echo_server()
    not_a_gate = socket.create_server(("127.0.0.1", 0))  # answers as an HTTP server would, as torchft's lighthouse

    def answer():
        while True:
            with not_a_gate.accept()[0] as connection:
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    gate_listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=lighthouse._serve, daemon=True,
                     args=(gate_listener, lighthouse.Gate(b"a" * 32, behind.getsockname()).handle)).start()
    for target, secret in [(not_a_gate, b"a" * 32), (gate_listener, b"b" * 32)]:
        url = f"http://127.0.0.1:{target.getsockname()[1]}"
        forwarder = lighthouse.GateForwarder(url, secret)
        with socket.create_connection(("127.0.0.1", int(forwarder.url.rsplit(":", 1)[1])), timeout=10) as through:
            assert through.recv(1) == b""  # closed: nothing was relayed
    assert lines == [
        f"http://127.0.0.1:{not_a_gate.getsockname()[1]} is not a lighthouse gate: start the lighthouse with python -m "
        "megatron_edit.lighthouse (see docs/running_across_clusters.md)",
        f"the lighthouse gate at http://127.0.0.1:{gate_listener.getsockname()[1]} refused this replica: it holds "
        "another sync secret (--sync-secret-file); give every replica the same file"]
