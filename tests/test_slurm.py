"""examples/pretrain_edit.sh under a real Slurm on localhost: sbatch --wait, two emulated nodes, two EDiT replicas."""
import os
import re
import subprocess

import pytest

from launcher import REPO
from local_slurm import LocalSlurm, unavailable_reason
from megatron_edit.logging import parse_iteration_lines

pytestmark = pytest.mark.slow  # every test here starts processes


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster


def test_sbatch_two_nodes_trains_edit_with_falling_loss(slurm, tmp_path):
    output = tmp_path / "job-%j.out"
    env = dict(slurm.env, OMP_NUM_THREADS="1", PYTHON_BIN=str(REPO / ".venv/bin/python"), DP_MODE="edit",
               TRAIN_ITERS="40", NUM_LAYERS="2", HIDDEN_SIZE="64", SEQ_LENGTH="64", MICRO_BATCH_SIZE="4",
               GLOBAL_BATCH_SIZE="8", LOCAL_SGD_WARMUP_ITERS="4", LOCAL_SGD_SYNC_INTERVAL="4",
               MASTER_PORT=str(29400 + os.getpid() % 500))
    # The cluster has no GPUs (no gres), so the script's --gpus-per-node is overridden, as on a CPU-only cluster.
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", "--gpus-per-node=0", f"--output={output}", "examples/pretrain_edit.sh",
         "--log-interval", "10", "--eval-interval", "40", "--eval-iters", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    job_id = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    log = (tmp_path / f"job-{job_id}.out").read_text()
    assert result.returncode == 0, f"{result.stderr}\n{log[-4000:]}"
    assert "TP=1 PP=1 DP=2 (edit)" in log  # one replica per node
    assert "edit sync at iteration 9 " in log
    losses = [line["lm_loss"] for line in parse_iteration_lines(log)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    before = float(log.split("validation loss at iteration 0: ")[1].split()[0])
    after = float(log.split("validation loss at iteration 40: ")[1].split()[0])
    assert after < before - 0.5
