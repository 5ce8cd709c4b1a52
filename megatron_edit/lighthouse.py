"""torchft's lighthouse behind a gate that lets in only replicas proving the sync secret.

torchft's lighthouse authenticates no one: whoever reaches it can join quorums, or end a replica through its
dashboard's `POST /replica/:id/kill`. `python -m megatron_edit.lighthouse --bind ADDR:PORT [torchft_lighthouse's
flags]` runs it on a free loopback port and listens on ADDR:PORT itself. Each connection first proves the secret both
ways (HMAC-SHA256 over the two sides' nonces), and only then is it relayed to the lighthouse; a replica's rank 0
reaches the gate through a `GateForwarder`, a loopback port in the replica's own process that torchft's manager
takes for the lighthouse. A replica without the secret is refused on both sides with one line (it exits, the others
train on); a gate without it is refused by the replica. Only replicas admitted here meet in a quorum, so only they
send pseudo-gradients; heal state is served to those that prove the secret again (heal_transport.py).

    python -m megatron_edit.lighthouse --bind 10.8.0.1:29510 --sync-secret-file FILE --min_replicas 2
"""
import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from megatron_edit import sync_secret
from megatron_edit.errors import UsageError, require
from megatron_edit.network import bound_socket, loopback_address

HELLO = b"megatron-edit gate 1\n"
NONCE_BYTES, PROOF_BYTES = 16, 32
ADMITTED, REFUSED = b"\x01", b"\x00"


def _receive(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the connection")  # an OSError
        data += chunk
    return data


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (at once: gRPC's small frames must not wait for Nagle)."""
    for side in (a, b):
        side.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def copy(source: socket.socket, destination: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                destination.sendall(chunk)
        except OSError:
            pass
        finally:
            for side in (source, destination):
                try:
                    side.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    threading.Thread(target=copy, args=(b, a), daemon=True).start()
    copy(a, b)
    a.close()
    b.close()


def _serve(listener: socket.socket, handle: Callable[[socket.socket, str], None]) -> None:
    while True:
        connection, peer = listener.accept()
        threading.Thread(target=handle, args=(connection, peer[0]), daemon=True).start()


class Gate:
    """The lighthouse's side: admits a connection that proves the secret, relays it to `lighthouse` (host, port)."""

    def __init__(self, secret: bytes, lighthouse: tuple):
        self.secret, self.lighthouse = secret, lighthouse

    def handle(self, connection: socket.socket, peer: str) -> None:
        connection.settimeout(30)
        try:
            hello = _receive(connection, len(HELLO))
        except OSError:  # a port probe, or a health check: nothing to refuse
            connection.close()
            return
        try:
            if hello != HELLO:
                raise ConnectionError("it is not a replica's gate forwarder")
            theirs, mine = _receive(connection, NONCE_BYTES), os.urandom(NONCE_BYTES)
            connection.sendall(HELLO + mine)
            if not sync_secret.same_proof(_receive(connection, PROOF_BYTES),
                                          sync_secret.proof(self.secret, "replica", theirs, mine)):
                connection.sendall(REFUSED)
                raise ConnectionError("it did not prove the sync secret (--sync-secret-file)")
            connection.sendall(ADMITTED + sync_secret.proof(self.secret, "gate", theirs, mine))
            connection.settimeout(None)
            lighthouse = socket.create_connection(self.lighthouse)
        except OSError as exc:
            print(f"warning: the lighthouse gate refused a connection from {peer}: {exc}", file=sys.stderr,
                  flush=True)
            connection.close()
            return
        _relay(connection, lighthouse)


class GateForwarder:
    """The replica's side: a loopback port whose connections go, once the gate at `gate_url` proved the secret and
    admitted this replica, to the lighthouse behind it. `url` is what torchft's manager takes for the lighthouse."""

    def __init__(self, gate_url: str, secret: bytes):
        parts = urlsplit(gate_url)
        require(parts.hostname and parts.port, f"TORCHFT_LIGHTHOUSE={gate_url}: expected http://HOST:PORT")
        self.gate_url, self.gate, self.secret = gate_url, (parts.hostname, parts.port), secret
        self._listener = bound_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=_serve, args=(self._listener, self._forward), name="lighthouse-gate-forwarder",
                         daemon=True).start()

    def _forward(self, connection: socket.socket, peer: str) -> None:
        try:
            gate = socket.create_connection(self.gate, timeout=30)
            refusal = self._handshake(gate)
        except OSError:  # torchft's manager sees the lighthouse unreachable, and asks again
            connection.close()
            return
        if refusal:
            self._end(refusal)
            connection.close()
            gate.close()
            return
        gate.settimeout(None)
        _relay(connection, gate)

    def _handshake(self, gate: socket.socket) -> Optional[str]:
        """None once the gate admitted this replica and proved the secret itself; else why not."""
        mine = os.urandom(NONCE_BYTES)
        gate.sendall(HELLO + mine)
        if _receive(gate, len(HELLO)) != HELLO:
            return (f"{self.gate_url} is not a lighthouse gate: start the lighthouse with python -m "
                    "megatron_edit.lighthouse (see docs/running_across_clusters.md)")
        theirs = _receive(gate, NONCE_BYTES)
        gate.sendall(sync_secret.proof(self.secret, "replica", mine, theirs))
        if _receive(gate, 1) != ADMITTED:
            return (f"the lighthouse gate at {self.gate_url} refused this replica: it holds another sync secret "
                    "(--sync-secret-file); give every replica the same file")
        gate_proof = _receive(gate, PROOF_BYTES)
        if not sync_secret.same_proof(gate_proof, sync_secret.proof(self.secret, "gate", mine, theirs)):
            return f"the lighthouse gate at {self.gate_url} did not prove the sync secret (--sync-secret-file)"
        return None

    @staticmethod
    def _end(line: str) -> None:
        """A replica that cannot reach its lighthouse cannot train: one line, and out (from this thread)."""
        print(f"error: {line}", file=sys.stderr, flush=True)
        os._exit(1)


def _parse_bind(bind: str) -> tuple:
    host, _, port = bind.rpartition(":")
    require(host and port.isdigit(), f"--bind {bind}: expected ADDRESS:PORT (e.g. 127.0.0.1:29510)")
    return host.strip("[]"), int(port)


def _die_with_parent() -> None:
    """The lighthouse ends with the gate, however the gate ends (Linux's PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", required=True, help="ADDRESS:PORT every replica reaches (never all interfaces)")
    parser.add_argument("--sync-secret-file", default=None,
                        help=f"the replicas' secret; default ${sync_secret.SECRET_FILE_VARIABLE}; required unless "
                             "--bind is a loopback address")
    args, lighthouse_args = parser.parse_known_args(argv)
    host, port = _parse_bind(args.bind)
    secret_file = sync_secret.secret_file(args.sync_secret_file)
    require(secret_file or loopback_address(host),
            f"--bind {args.bind} is reached from other machines: give --sync-secret-file FILE (or "
            f"{sync_secret.SECRET_FILE_VARIABLE}), the file every replica holds")
    secret = sync_secret.read_secret(secret_file)
    try:
        listener = bound_socket(host, port)
    except OSError as exc:
        raise UsageError(f"--bind {args.bind}: cannot listen there ({exc.strerror})") from None
    with bound_socket("127.0.0.1", 0) as probe:
        inner_port = probe.getsockname()[1]
    binary = Path(sys.executable).with_name("torchft_lighthouse")
    require(binary.exists(), f"{binary} not found: pip install torchft")
    lighthouse = subprocess.Popen([str(binary), *lighthouse_args, "--bind", f"127.0.0.1:{inner_port}"],
                                  preexec_fn=_die_with_parent)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_serve, args=(listener, Gate(secret, ("127.0.0.1", inner_port)).handle),
                     daemon=True).start()
    try:
        sys.exit(lighthouse.wait())
    finally:
        lighthouse.kill()


if __name__ == "__main__":
    main()
