"""Nothing read from a checkpoint file or a peer's heal state runs code: real files (torch.save, torch DCP) and
the heal transport, with crafted pickles that would create a file if they were ever unpickled."""
import io
import os
import pickle
from datetime import timedelta

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_edit.dp.local_sgd.heal_transport import AuthenticatedHealTransport
from megatron_edit.errors import TrainingError, UsageError
from megatron_edit.network import ListenInterface
from megatron_edit.safe_load import check_dcp_metadata, load_without_code


LOOPBACK = ListenInterface("lo", "127.0.0.1")


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


def test_heal_state_that_would_run_code_is_refused_even_from_a_peer_holding_the_secret(tmp_path):
    """A replica that proves the secret but serves a crafted pickle (compromised, or a bug) runs no code in the
    replica that heals from it."""
    timeout, secret = timedelta(seconds=10), b"s" * 32
    server, client = (AuthenticatedHealTransport(secret, LOOPBACK, timeout) for _ in range(2))
    try:
        server.send_checkpoint(dst_ranks=[0], step=5, state_dict={"anchors": RunsCode(tmp_path / "ran")},
                               timeout=timeout)
        with pytest.raises(TrainingError) as excinfo:
            client.recv_checkpoint(src_rank=0, metadata=server.metadata(), step=5, timeout=timeout)
        assert "holds objects that loading would run code for" in str(excinfo.value)
        assert not (tmp_path / "ran").exists()
    finally:
        server.shutdown()
        client.shutdown()
