"""tools/netsim.py end to end at the smallest size: replicas in network namespaces behind 10 Mbit/s links."""
import csv
import subprocess

import pytest

from tools import netsim


@pytest.mark.slow
def test_shaped_links_slow_ddp_more_than_edit_and_namespaces_are_removed(tmp_path):
    reason = netsim.unavailable_reason()
    if reason:
        pytest.skip(f"no network namespaces: {reason}")
    netsim.main(["--output-dir", str(tmp_path), "--bandwidths", "10mbit", "--methods", "ddp", "edit",
                 "--num-layers", "1", "--hidden-size", "64", "--seq-length", "32", "--micro-batch-size", "2",
                 "--train-iters", "12", "--local-sgd-warmup-iters", "0", "--local-sgd-sync-interval", "6"])
    with open(tmp_path / "throughput_vs_bandwidth.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    ratio = {method: float(row["vs ceiling"]) for method, row in rows.items()}
    # DDP all-reduces ~0.4 MB of gradients every step through a 1.25 MB/s link; EDiT only at 1 sync in 12 steps.
    assert ratio["ddp"] < 0.5 * ratio["edit"] and ratio["edit"] <= 1.2
    assert float(rows["ddp"]["MB to other replicas per rank"]) > 5 * float(rows["edit"]["MB to other replicas per rank"])
    assert (tmp_path / "throughput_vs_bandwidth.png").exists()
    assert not [line for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
                if line.startswith("me-")]


def test_rho_sets_the_link_so_an_fp32_sync_takes_rho_times_h_steps():
    """rho = (bytes of one fp32 sync x 8 / rate) / (H x step time), the sync a ring all-reduce of a replica's shard."""
    args = netsim.get_args(["--rhos", "3.5", "--nodes", "2", "--nproc-per-node", "2", "--local-sgd-sync-interval", "8"])
    rate = netsim.rho_rate_bits(3.5, parameters=1_000_000, args=args, step_seconds=0.5)
    sync_seconds = 4 * 1_000_000 / 2 * 2 * (2 - 1) / 2 * 8 / rate
    assert sync_seconds == pytest.approx(3.5 * 8 * 0.5)
    assert netsim.log_interval(args) == args.local_sgd_warmup_iters > 0  # the first line is the warm-up
