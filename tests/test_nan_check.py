"""--check-for-nan-in-loss-and-grad (on by default, as in Megatron-LM): a non-finite loss stops synchronous data
parallelism with one line naming the iteration and rank before the step is taken; under EDiT the replica is named,
and with anomaly elimination its step is skipped and it is left out of its next sync while the others go on."""
import pytest
import torch

from launcher import TINY_GPT, run_training
from test_edit import TRAINING, edit, local_sgd, run
from test_penalty import PENALTY, sync_at

ARGS = TINY_GPT + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "6", "--log-interval", "1",
                   "--eval-iters", "0"]


def error_line(run) -> str:
    assert run.returncode != 0, run.stdout[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert lines, run.stderr[-3000:]
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout,fault,expected", [
    ((), "1:3:nan-loss", "error: non-finite loss at iteration 3 on rank 1; the step was not taken"),
    (("--pipeline-model-parallel-size", "2"), "0:4:nan-loss",  # the loss is on the last stage, rank 1
     "error: non-finite loss at iteration 4 on rank 1; the step was not taken"),
    (("--use-distributed-optimizer", "--bf16"), "0:2:nan-loss",
     "error: non-finite loss at iteration 2 on rank 0; the step was not taken"),
    (("--dp-mode", "edit", "--model-shard-group-size", "1", *local_sgd(1, 2)), "1:4:nan-loss",
     "error: non-finite loss at iteration 4 on rank 1 (replica 1); the step was not taken"),
], ids=["ddp", "ddp_pp2", "ddp_distributed_optimizer_bf16", "edit_m2"])
def test_a_nan_loss_stops_training_with_one_line(layout, fault, expected):
    failed = run_training(2, ARGS + list(layout) + ["--inject-fault", fault])
    assert error_line(failed).startswith(expected)


@pytest.mark.slow
def test_the_check_can_be_turned_off():
    run = run_training(1, ARGS + ["--inject-fault", "0:3:nan-loss", "--no-check-for-nan-in-loss-and-grad"]).check()
    assert "lm loss: NAN |" in run.stdout  # nothing stopped it


def test_edit_with_anomaly_elimination_skips_the_step_and_leaves_the_replica_out_of_its_next_sync():
    """Three replicas syncing at 3, 5, 7, 9: replica 2's loss is NaN at iteration 6; its step is skipped, the sync at
    7 averages replicas 0 and 1 only, and every parameter and anchor stays finite."""
    dumps = run(*edit(1, 3, *local_sgd(0, 2), *PENALTY, "--inject-fault", "2:6:nan-loss"))
    records = sync_at(dumps[0], 7)["records"]
    assert all(r["outliers"][2] and r["weights"][2] == 0.0 for r in records)
    assert all(r["weights"][0] + r["weights"][1] == pytest.approx(1.0) for r in records)
    assert not any(r["outliers"][2] for r in sync_at(dumps[0], 5)["records"])
    for dump in dumps:
        assert all(torch.isfinite(p).all() for p in dump["params"].values())
        assert all(torch.isfinite(u["anchor"]).all() for u in dump["units"])
        assert all(loss == loss for loss in dump["losses"])  # the skipped step's loss counts in none


@pytest.mark.slow
@pytest.mark.parametrize("name", ["edit", "diloco"])
def test_a_non_finite_pseudo_gradient_is_never_applied_without_the_penalty(tmp_path, name):
    """Two replicas, int4 syncs with error feedback (the defaults), no penalty flags: replica 1's pseudo-gradient is
    NaN at the sync of iteration 5/6. Nothing is applied there (every replica back at the anchor, the residuals
    that carried the NaN dropped), the next sync applies as usual, and every parameter and anchor stays finite."""
    extra = ["--dp-mode", name, "--model-shard-group-size", "1", *local_sgd(2, 3), "--inject-fault", "1:5:nan"]
    done = run_training(2, TRAINING + extra + ["--dump-dir", str(tmp_path)], script="tests/edit_runner.py").check()
    dumps = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for dump in dumps:
        assert all(torch.isfinite(p).all() for p in dump["params"].values())
        assert all(torch.isfinite(u["anchor"]).all() for u in dump.get("units", []))
        assert all(loss == loss for loss in dump["losses"])
    if name == "edit":
        assert all(r["non_finite"] and r["reset_to_anchor"] for r in sync_at(dumps[0], 6)["records"])
        assert not any(r["non_finite"] or r["reset_to_anchor"] for r in sync_at(dumps[0], 9)["records"])
        assert "reset to anchor (non-finite averaged pseudo-gradient" in done.stdout
    else:
        assert "diloco sync at iteration 5: replica 1 (rank 1) sends a non-finite value of model chunk 0" in done.stdout
        assert "diloco sync at iteration 5: a replica sent a non-finite value; nothing applied" in done.stdout
        assert " diloco sync at iteration 8 | pseudo-grad norm: " in done.stdout
