"""How a replica that is behind takes a live replica's state (torchft's CheckpointTransport), between replicas that
prove the sync secret to each other, and with nothing unpickled that could run code.

The live replica serializes its state when torchft asks it to serve (`send_checkpoint`) and serves it over HTTP on
its --sync-interface address, to a request that carries a fresh nonce and a proof of the secret over it; the response
carries a proof over that nonce and the payload's digest, which the receiver checks before it loads the payload
weights-only (tensors and plain values). A request without the proof is refused with one line on the serving side
(which trains on) and a TrainingError on the asking side; so is a payload whose proof fails or that holds objects.
"""
import hashlib
import io
import os
import pickle
import socket
import sys
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

import torch
from torchft.checkpointing import CheckpointTransport

from megatron_edit.sync_secret import proof, same_proof
from megatron_edit.errors import TrainingError
from megatron_edit.network import ListenInterface

PROOF_HEADER, NONCE_HEADER = "X-Sync-Proof", "X-Sync-Nonce"


class AuthenticatedHealTransport(CheckpointTransport):
    def __init__(self, secret: bytes, interface: ListenInterface, timeout: timedelta):
        self.secret, self.interface, self.timeout = secret, interface, timeout
        self._staged = threading.Condition()
        self._served: Optional[tuple] = None  # (step, payload) while torchft lets this replica serve
        transport = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                transport._answer(self)

            def log_message(self, *args):  # one line per refusal is ours to print; no access log
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in interface.address else socket.AF_INET
            daemon_threads = True

        self._server = Server((interface.address, 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="heal-transport", daemon=True).start()

    def metadata(self) -> str:
        return f"http://{self.interface.host_port(self._server.server_address[1])}/heal/"

    def send_checkpoint(self, dst_ranks: List[int], step: int, state_dict, timeout: timedelta) -> None:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)  # now: the state as it stands at this quorum, whenever it is fetched
        with self._staged:
            self._served = (step, buffer.getvalue())
            self._staged.notify_all()

    def disallow_checkpoint(self) -> None:
        with self._staged:
            self._served = None

    def shutdown(self, wait: bool = True) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, request: BaseHTTPRequestHandler) -> None:
        nonce, step = request.headers.get(NONCE_HEADER, ""), request.path.rsplit("/", 1)[-1]
        claimed = _proof_in(request.headers.get(PROOF_HEADER, ""))
        if not nonce or not same_proof(claimed, proof(self.secret, "heal-request", step, nonce)):
            print(f"warning: refused a heal request from {request.client_address[0]}: it did not prove the sync "
                  "secret (--sync-secret-file); training goes on", file=sys.stderr, flush=True)
            request.send_error(403, "the sync secret was not proven")
            return
        with self._staged:  # a healing replica may ask before this one's quorum staged the state
            self._staged.wait_for(lambda: self._served is not None, timeout=self.timeout.total_seconds())
            served = self._served
        if served is None or str(served[0]) != step:
            request.send_error(404, f"no heal state for step {step} is being served")
            return
        payload = served[1]
        request.send_response(200)
        request.send_header(PROOF_HEADER, proof(self.secret, "heal-response", nonce,
                                                hashlib.sha256(payload).digest()).hex())
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta):
        nonce = os.urandom(16).hex()
        asking = urllib.request.Request(f"{metadata}{step}", headers={
            NONCE_HEADER: nonce, PROOF_HEADER: proof(self.secret, "heal-request", step, nonce).hex()})
        try:
            with urllib.request.urlopen(asking, timeout=timeout.total_seconds()) as response:
                claimed, payload = response.headers.get(PROOF_HEADER, ""), response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 403:
                raise TrainingError(f"the replica serving heal state at {metadata} refused this replica: it holds "
                                    "another sync secret (--sync-secret-file); give every replica the same file")
            raise
        expected = proof(self.secret, "heal-response", nonce, hashlib.sha256(payload).digest())
        if not same_proof(_proof_in(claimed), expected):
            raise TrainingError(f"the heal state served at {metadata} did not prove the sync secret "
                                "(--sync-secret-file), or changed on the way: refused")
        try:
            return torch.load(io.BytesIO(payload), weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TrainingError(f"the heal state served at {metadata} holds objects that loading would run code "
                                f"for ({str(exc).strip().splitlines()[-1]}): refused") from None


def _proof_in(header: str) -> bytes:
    """A proof header's bytes; none for one that is not hex."""
    try:
        return bytes.fromhex(header)
    except ValueError:
        return b""
