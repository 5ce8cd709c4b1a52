"""The end-of-run summary sets what crossed between replicas against what DDP sends for the same run, and says how
much of it, and of the time, the synchronous warm-up took."""
import re

import pytest

from launcher import TINY_GPT, run_training

pytestmark = pytest.mark.slow  # every test here starts processes

ITERS = 6
RUN = TINY_GPT + ["--micro-batch-size", "2", "--train-iters", str(ITERS), "--log-interval", str(ITERS),
                  "--eval-iters", "1", "--device", "cpu"]


def payload_mb(stdout: str) -> dict:
    """group -> the summary's megabytes (as printed) of `communication per rank (bytes sent)`."""
    listed = re.search(r"communication per rank \(bytes sent\): (.*)", stdout).group(1)
    return dict(part.rsplit(" ", 2)[:2] for part in listed.split(", "))


def parameters(stdout: str) -> int:
    return int(re.search(r"model parallel rank \(0, 0\): (\d+)", stdout).group(1))


def test_edit_summary_compares_its_sync_bytes_with_what_ddp_sends():
    ddp = run_training(2, RUN + ["--dp-mode", "ddp"]).check()
    ddp_mb = payload_mb(ddp.stdout)["dp"]
    assert ddp_mb == f"{parameters(ddp.stdout) * 4 * ITERS / 1e6:.2f}"  # fp32 gradients all-reduced every iteration
    assert "across replicas" not in ddp.stdout

    edit = run_training(2, RUN + ["--dp-mode", "edit", "--model-shard-group-size", "1",
                                  "--local-sgd-warmup-iters", "2", "--local-sgd-sync-interval", "2"]).check()
    line = re.search(r"   across replicas: sync group (\S+) MB per rank; DDP would have all-reduced (\S+) MB "
                     r"\((\S+)x more\)\n", edit.stdout)
    assert line.group(1) == payload_mb(edit.stdout)["sync"] and line.group(2) == ddp_mb
    assert float(line.group(3)) == pytest.approx(float(ddp_mb) / float(line.group(1)), abs=0.06)
    # The warm-up's share: 2 of 6 iterations, each a full fp32 gradient all-reduce here, as DDP's.
    warmup = re.search(r"   warm-up \(iterations 1-2\): (\S+) MB \((\d+)% of those bytes\), (\S+) s \((\d+)% of the "
                       r"training time\)\n", edit.stdout)
    assert float(warmup.group(1)) == pytest.approx(float(ddp_mb) * 2 / ITERS, abs=0.02)
    assert int(warmup.group(2)) == pytest.approx(100 * float(warmup.group(1)) / float(line.group(1)), abs=1)
    assert 0 < int(warmup.group(4)) < 100 and float(warmup.group(3)) > 0
