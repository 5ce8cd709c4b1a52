"""Replica jobs prove a shared secret to each other: the heal transport between two real servers and clients, and
the secret file's checks. (tests/test_replica_jobs.py runs a replica with another secret against real ones.)"""
import http.server
import os
import threading
import urllib.request
from datetime import timedelta

import pytest
import torch

from megatron_edit.dp.local_sgd import sync_secret
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


def test_proofs_are_of_the_secret_and_the_nonces():
    a = sync_secret.proof(b"k" * 16, "sync", 1, 2)
    assert a == sync_secret.proof(b"k" * 16, "sync", 1, 2)
    assert a != sync_secret.proof(b"k" * 16, "sync", 1, 3) and a != sync_secret.proof(b"j" * 16, "sync", 1, 2)
    words = sync_secret.as_words(a)
    assert len(words) == sync_secret.PROOF_WORDS and all(w == int(w) and 0 <= w < 2 ** 32 for w in words)
    assert torch.tensor(words, dtype=torch.float64).tolist() == words  # exact through a float64 sum
