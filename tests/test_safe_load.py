"""Nothing read from a checkpoint file or a peer's heal state runs code: real files (torch.save, torch DCP) and
torchft's real HTTP transport, with crafted pickles that would create a file if they were ever unpickled."""
import http.server
import io
import os
import pickle
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchft.checkpointing._serialization import _streaming_save

from megatron_edit.dp.local_sgd.torchft_replicas import weights_only_http_transport
from megatron_edit.errors import UsageError
from megatron_edit.safe_load import check_dcp_metadata, load_without_code


class RunsCode:
    """Unpickling this creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_state_loads_and_a_crafted_pickle_is_refused_in_one_line(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "args": __import__("argparse").Namespace(lr=1e-3), "iteration": 3,
             "rng": {"numpy": __import__("numpy").random.get_state()}}
    torch.save(state, tmp_path / "good.pt")
    assert load_without_code(str(tmp_path / "good.pt"))["args"].lr == 1e-3
    torch.save({"model": RunsCode(tmp_path / "ran")}, tmp_path / "bad.pt")
    with pytest.raises(UsageError) as excinfo:
        load_without_code(str(tmp_path / "bad.pt"))
    assert "holds objects that loading would run code for" in str(excinfo.value) and "\n" not in str(excinfo.value)
    assert not (tmp_path / "ran").exists()


def test_dcp_metadata_of_a_real_save_passes_and_a_crafted_one_is_refused(tmp_path):
    dcp.save({"w": torch.zeros(3, 4, dtype=torch.bfloat16), "step": torch.tensor(3), "blob": io.BytesIO(b"x")},
             checkpoint_id=tmp_path)
    check_dcp_metadata(str(tmp_path))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode(tmp_path / "ran")))
    with pytest.raises(UsageError) as excinfo:
        check_dcp_metadata(str(tmp_path))
    assert "posix.system is not part of DCP metadata" in str(excinfo.value)
    assert not (tmp_path / "ran").exists()


def test_heal_state_travels_over_torchfts_http_transport_and_a_crafted_one_is_refused(tmp_path):
    timeout = timedelta(seconds=10)
    server, client = weights_only_http_transport(timeout), weights_only_http_transport(timeout)
    try:
        state = {"iteration": 12, "layout": (1, 1, 2), "anchors": [torch.arange(4.0)],
                 "detectors": [{"mean": 0.5, "count": 3}]}
        server.send_checkpoint(dst_ranks=[0], step=5, state_dict=state, timeout=timeout)
        received = client.recv_checkpoint(src_rank=0, metadata=server.metadata(), step=5, timeout=timeout)
        assert received["iteration"] == 12 and torch.equal(received["anchors"][0], torch.arange(4.0))
    finally:
        server.shutdown()
        client.shutdown()

    payload = io.BytesIO()
    _streaming_save({"anchors": RunsCode(tmp_path / "ran")}, payload)  # what a transport serves, crafted

    class Attacker(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(payload.getvalue())

        def log_message(self, *args):
            pass

    attacker = http.server.HTTPServer(("127.0.0.1", 0), Attacker)
    threading.Thread(target=attacker.serve_forever, daemon=True).start()
    victim = weights_only_http_transport(timeout)
    try:
        with pytest.raises(pickle.UnpicklingError) as excinfo:
            victim.recv_checkpoint(src_rank=0, metadata=f"http://127.0.0.1:{attacker.server_port}/checkpoint/",
                                   step=1, timeout=timeout)
        assert "holds objects that loading would run code for" in str(excinfo.value)
        assert not (tmp_path / "ran").exists()
    finally:
        attacker.shutdown()
        victim.shutdown()
