"""Checkpoints: exact resume, elastic resume, a killed rank under torchrun, and bad checkpoints."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from launcher import REPO, TINY_GPT, run_training
from test_edit import edit, local_sgd, run

STEPS = ["--micro-batch-size", "2", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "1000",
         "--eval-iters", "1"]
EDIT_WITH_PENALTY = ["--dp-mode", "edit", "--model-shard-group-size", "2", *local_sgd(2, 2),
                     "--edit-anomaly-elimination", "--edit-anomaly-warmup-syncs", "1", "--edit-weighted-average",
                     "--edit-pseudo-grad-clip", "0.5"]


# Two staggered fragments over H=4 (syncs issued at 5 and 9, and at 7 and 11), each outer step applied two iterations
# later: the save after 6 holds fragment 1's exchange in flight, and int8's error-feedback residuals.
EDIT_FRAGMENTS_DELAYED_INT8 = ["--dp-mode", "edit", "--model-shard-group-size", "2", *local_sgd(2, 4),
                               "--sync-fragments", "2", "--sync-delay-steps", "2", "--sync-dtype", "int8",
                               "--sync-error-feedback"]


TORCH_DIST = ["--ckpt-format", "torch_dist"]


@pytest.mark.parametrize("nproc,mode", [(2, []), (4, EDIT_WITH_PENALTY), (4, EDIT_FRAGMENTS_DELAYED_INT8),
                                        (2, TORCH_DIST)],
                         ids=["ddp", "edit_with_penalty", "edit_fragments_delayed_int8", "ddp_torch_dist"])
def test_resumed_run_reproduces_the_uninterrupted_one_bitwise(tmp_path, nproc, mode):
    """12 iterations straight vs 6, save, load, 6 more (EDiT: syncs at 5 | 7, 9, 11, penalty on; fragments: issued at
    5 | applied at 7, then 7, 9 and 11 applied at 9, 11 and in the final sync)."""
    args = TINY_GPT + STEPS + mode + ["--train-iters", "12"]
    straight = run_training(nproc, args).check().losses
    first = run_training(nproc, args + ["--save", str(tmp_path), "--exit-interval", "6"]).check()
    assert "exiting after iteration 6" in first.stdout and len(first.losses) == 6
    second = run_training(nproc, args + ["--load", str(tmp_path)]).check()
    assert "loaded checkpoint from" in second.stdout and "at iteration 6" in second.stdout
    assert first.losses + second.losses == straight


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_use_checkpoint_args_takes_the_models_shape_from_the_checkpoint(tmp_path, ckpt_format):
    """Saved with a shape of its own, resumed with TINY_GPT's flags and --use-checkpoint-args: the checkpoint's shape
    wins, and the resumed iterations are those of a straight run with that shape."""
    shape = ["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "6", "--swiglu",
             "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2",
             "--ckpt-format", ckpt_format]
    straight = run_training(2, TINY_GPT + STEPS + shape + ["--train-iters", "8"]).check().losses
    run_training(2, TINY_GPT + STEPS + shape + ["--train-iters", "8", "--save", str(tmp_path), "--exit-interval", "6"]
                 ).check()
    resumed = run_training(2, TINY_GPT + STEPS + ["--train-iters", "8", "--load", str(tmp_path),
                                                  "--use-checkpoint-args", "--ckpt-format", ckpt_format]).check()
    assert "at iteration 6" in resumed.stdout
    assert resumed.losses == straight[6:]


DISTRIBUTED_OPTIMIZER = ["--use-distributed-optimizer", "--ckpt-format", "torch_dist"]


@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"], []], ids=["tp1_pp2_dp2", "tp1_pp1_dp4"])
def test_torch_dist_checkpoint_reshards_to_another_layout(tmp_path, layout):
    """DDP with the distributed optimizer saved at TP=2 x DP=2 continues at another layout: weights, Adam's moments
    and fp32 main parameters follow, so the first resumed loss is the uninterrupted run's next one."""
    args = TINY_GPT + STEPS + DISTRIBUTED_OPTIMIZER + ["--train-iters", "8"]
    saved_layout = ["--tensor-model-parallel-size", "2"]
    straight = run_training(4, args + saved_layout).check().losses
    run_training(4, args + saved_layout + ["--save", str(tmp_path), "--exit-interval", "6"]).check()
    resumed = run_training(4, args + layout + ["--load", str(tmp_path)]).check()
    assert "at iteration 6" in resumed.stdout and len(resumed.losses) == 2
    assert resumed.losses[0] == pytest.approx(straight[6], rel=1e-6)
    assert resumed.losses[1] == pytest.approx(straight[7], rel=1e-3)  # a step later: reduction order differs


ELASTIC = ("--micro-batch-size", "1", "--global-batch-size", "6", *local_sgd(2, 2))


@pytest.mark.parametrize("replicas", [1, 3])
def test_edit_checkpoint_resumes_with_a_different_number_of_replicas(tmp_path, replicas):
    saved = run(*edit(1, 2, *ELASTIC, "--train-iters", "6", "--save", str(tmp_path)))
    resumed = run(*edit(1, replicas, *ELASTIC, "--train-iters", "6", "--load", str(tmp_path)))
    for dump in resumed:  # every replica continues from the same anchor (and replica m from replica m mod 2)
        for unit, saved_unit in zip(dump["units"], saved[0]["units"]):
            assert torch.equal(unit["anchor"], saved_unit["anchor"]), unit["name"]
        for name, value in dump["params"].items():
            assert torch.equal(value, saved[dump["rank"] % 2]["params"][name]), name
    continued = run(*edit(1, replicas, *ELASTIC, "--train-iters", "10", "--load", str(tmp_path)))
    # syncs at iterations 7 and 9, and the final one after 10
    assert len(continued[-1]["losses"]) == 4 and len(continued[-1]["syncs"]) == (3 if replicas > 1 else 0)


def test_killed_rank_restarts_from_the_last_checkpoint_and_finishes(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
               str(REPO / "pretrain_gpt.py"), *TINY_GPT, "--micro-batch-size", "2", "--train-iters", "300",
               "--log-interval", "50", "--eval-interval", "1000", "--eval-iters", "1",
               "--save", str(tmp_path), "--load", str(tmp_path), "--save-interval", "10"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 240
    while not tracker.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert tracker.exists() and job.poll() is None, "no checkpoint was written while the job ran"
    workers = open(f"/proc/{job.pid}/task/{job.pid}/children").read().split()  # torchrun's worker processes
    os.kill(int(workers[-1]), signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert "loaded checkpoint from" in stdout
    assert " iteration      300/     300 |" in stdout
    assert tracker.read_text() == "300"


@pytest.mark.parametrize("ckpt_format,file", [("torch", "mp_rank_00_000_dp_000/model_optim_rng.pt"),
                                              ("torch_dist", "__0_0.distcp")])
def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, ckpt_format, file):
    args = TINY_GPT + STEPS + ["--train-iters", "6", "--ckpt-format", ckpt_format]
    run_training(1, args + ["--save", str(tmp_path), "--save-interval", "3"]).check()
    newest = tmp_path / "iter_0000006" / file
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 2)
    resumed = run_training(1, args + ["--load", str(tmp_path)]).check()
    assert "skipping" in resumed.stderr and "iter_0000006" in resumed.stderr
    assert "at iteration 3" in resumed.stdout and len(resumed.losses) == 3


def test_incompatible_or_missing_checkpoint_is_one_line(tmp_path):
    run_training(1, TINY_GPT + STEPS + ["--train-iters", "2", "--save", str(tmp_path)]).check()
    wider = [a if a != "64" else "128" for a in TINY_GPT]
    result = run_training(1, wider + STEPS + ["--train-iters", "4", "--load", str(tmp_path)])
    assert result.returncode != 0
    assert "error: checkpoint 2 does not fit this run: hidden_size 64 (checkpoint) vs 128 (this run)" in result.stderr
    edit = ["--dp-mode", "edit", "--model-shard-group-size", "1", "--ckpt-format", "torch_dist"]
    result = run_training(2, TINY_GPT + STEPS + edit + ["--train-iters", "4", "--save", str(tmp_path)])
    assert result.returncode != 0
    assert "error: --ckpt-format torch_dist keeps one copy of the model and optimizer" in result.stderr
    result = run_training(1, TINY_GPT + STEPS + ["--train-iters", "4", "--load", str(tmp_path / "nope")])
    assert result.returncode != 0 and f"error: --load {tmp_path / 'nope'} does not exist" in result.stderr


def test_finetune_and_partial_loads_follow_megatron_lms_flags(tmp_path):
    args = TINY_GPT + STEPS + ["--bf16", "--ckpt-format", "torch_dist"]
    scratch = run_training(2, args + ["--train-iters", "12", "--save", str(tmp_path), "--save-interval", "12",
                                      "--no-save-optim"]).check()
    result = run_training(2, args + ["--train-iters", "14", "--load", str(tmp_path)])
    assert result.returncode != 0
    assert "checkpoint 12 was saved with --no-save-optim: load it with --no-load-optim or --finetune" in result.stderr
    resumed = run_training(2, args + ["--train-iters", "14", "--load", str(tmp_path), "--no-load-optim"]).check()
    assert "at iteration 12" in resumed.stdout and len(resumed.losses) == 2
    finetuned = run_training(2, args + ["--train-iters", "3", "--load", str(tmp_path), "--finetune"]).check()
    assert "(--finetune: weights of iteration 12)" in finetuned.stdout and len(finetuned.losses) == 3
    # The trained weights carry on through a fresh optimizer's steps (in bf16, through its fp32 main copies, which
    # must be refreshed from the loaded weights), starting again from the first batch.
    assert max(finetuned.losses) < scratch.losses[0] - 0.1
