"""Bytes on the wire are counted for every collective megatron-core issues, on the group that carries it."""
import importlib
import re
from pathlib import Path

import pytest

from megatron_edit.dp import comm_stats
from test_edit import edit, local_sgd, run

DISTRIBUTED_OPTIMIZER = ("--use-distributed-optimizer", "--optimizer", "adam")  # megatron-core's supports only Adam
# Per iteration besides the gradients and parameters: the gradient norm's all-reduce (fp32, computed for the log
# even without clipping) over the distributed-optimizer instance. (The logged loss is reduced at log iterations
# only, outside what tests/edit_runner.py counts per iteration.)
GRAD_NORM = 4
# And --check-for-nan-in-loss-and-grad's (on by default) all-reduce of one float64 over the ranks that step together:
# the world under ddp, one replica under the local-SGD modes; 2 (M-1)/M x 8 bytes for M = 2.
NAN_CHECK = 8


def sent(record) -> dict:
    """Bytes per group in one iteration, groups that carried nothing left out."""
    return {group: n for group, n in record["bytes"].items() if n}


def distributed_optimizer_bytes(dump, ranks: int = 2) -> float:
    """One reduce-scatter of every gradient bucket (its input: the whole bucket, padding included) and one
    all-gather of every parameter bucket (its output), as megatron-core's DDP holds them: each rank sends
    (ranks-1)/ranks of each."""
    buckets = dump["ddp_buckets"]
    assert buckets and all(b["param_bytes"] for b in buckets)
    return sum(b["grad_bytes"] + b["param_bytes"] for b in buckets) * (ranks - 1) / ranks


def test_the_table_lists_every_collective_megatron_core_binds_at_import():
    """`name = torch.distributed.<collective>` in a megatron-core module escapes a wrapper put on torch.distributed."""
    import megatron.core

    root = Path(megatron.core.__file__).parent
    binding = re.compile(r"^\s*(\w+)\s*=\s*(?:torch\.distributed|dist)\.(\w+)\s*$", re.MULTILINE)
    found = set()
    for path in root.rglob("*.py"):
        for attribute, function in binding.findall(path.read_text()):
            if function in comm_stats._PAYLOAD:
                module = ".".join(("megatron", "core", *path.relative_to(root).with_suffix("").parts))
                found.add((module, attribute))
    assert found == set(comm_stats._BOUND_AT_IMPORT)
    for module, attribute in comm_stats._BOUND_AT_IMPORT:  # still torch's functions, which install() can wrap
        assert getattr(importlib.import_module(module), attribute).__name__ in comm_stats._PAYLOAD


@pytest.mark.slow
def test_ddp_with_distributed_optimizer_counts_reduce_scatter_and_all_gather_on_dp():
    dumps = run(2, (*DISTRIBUTED_OPTIMIZER, "--bf16"))
    for dump in dumps:
        # bf16 parameters, gradients reduced in fp32: the gradient buffers are twice the parameter buffers
        assert all(b["grad_bytes"] == 2 * b["param_bytes"] for b in dump["ddp_buckets"])
        expected = distributed_optimizer_bytes(dump)
        assert [sent(record) for record in dump["iterations"]] == \
            [{"dp": expected, "dist_opt": GRAD_NORM, "world": NAN_CHECK}] * len(dump["iterations"])


@pytest.mark.slow
def test_edit_local_steps_count_the_distributed_optimizer_on_the_shard_group():
    dumps = run(*edit(2, 2, *local_sgd(2, 3), *DISTRIBUTED_OPTIMIZER))
    for dump in dumps:
        shard_bytes = distributed_optimizer_bytes(dump) + GRAD_NORM + NAN_CHECK
        grad_bytes = sum(b["grad_bytes"] for b in dump["ddp_buckets"])
        for iteration, record in enumerate(dump["iterations"], start=1):
            if iteration <= 2:  # warm-up: the reduced gradient shard is also averaged over the replicas
                assert sent(record) == {"shard": shard_bytes, "sync": grad_bytes // 2}, iteration
            elif iteration not in (6, 9):  # local steps (6 and 9 are syncs)
                assert sent(record) == {"shard": shard_bytes}, iteration


def test_an_unnamed_group_is_counted_under_its_ranks_in_a_name_the_summary_line_can_carry(monkeypatch):
    monkeypatch.setattr(comm_stats.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(comm_stats.dist, "get_process_group_ranks", lambda group: [0, 1])
    counter = comm_stats.CommunicationCounter()
    counter._record(object(), 8)
    assert counter.snapshot() == {"ranks[0,1]": 8}
