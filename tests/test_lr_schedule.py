"""Resuming a learning-rate schedule whose flags changed: refused in one line unless one of Megatron-LM's two flags
says which curve wins, and then that curve, from the checkpoint's position."""
import pytest
import torch

from megatron_edit import arguments
from megatron_edit.errors import UsageError
from megatron_edit.lr_schedule import build_scheduler, load_scheduler_state

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "0",
        "--lr-decay-style", "linear", "--mock-data", "--vocab-size", "511", "--device", "cpu"]


def scheduler_after(iterations: int, train_iters: int, *flags: str):
    args = arguments.parse_args(BASE + ["--train-iters", str(train_iters), *flags], world_size=1)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=args.lr)
    scheduler = build_scheduler(args, optimizer)
    scheduler.step(increment=iterations * args.global_batch_size)
    return scheduler


def test_the_same_schedule_resumes_where_it_stood():
    saved = scheduler_after(6, 10).state_dict()
    resumed = scheduler_after(0, 10)
    load_scheduler_state(resumed, saved, iteration=6)
    assert resumed.get_lr(resumed.optimizer.param_groups[0]) == pytest.approx(1e-3 * 4 / 10)


def test_a_longer_run_is_refused_in_one_line_naming_both_flags():
    saved = scheduler_after(10, 10).state_dict()
    with pytest.raises(UsageError) as excinfo:
        load_scheduler_state(scheduler_after(0, 20), saved, iteration=10)
    message = str(excinfo.value)
    assert "\n" not in message and "checkpoint 10's learning-rate schedule differs from this run's" in message
    assert "lr_decay_steps 40 (checkpoint) vs 80 (this run" in message
    assert "--override-opt_param-scheduler" in message and "--use-checkpoint-opt_param-scheduler" in message


def test_override_follows_this_runs_curve_and_use_checkpoint_the_saved_one():
    saved = scheduler_after(10, 10).state_dict()  # at its end: LR 0
    overridden = scheduler_after(0, 20, "--override-opt_param-scheduler")
    load_scheduler_state(overridden, saved, iteration=10)
    assert overridden.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 10 / 20)
    kept = scheduler_after(0, 20, "--use-checkpoint-opt_param-scheduler")
    load_scheduler_state(kept, saved, iteration=10)
    assert kept.optimizer.param_groups[0]["lr"] == 0.0


def test_both_flags_together_are_one_line():
    with pytest.raises(SystemExit) as excinfo:
        arguments.parse_args(BASE + ["--train-iters", "2", "--override-opt_param-scheduler",
                                     "--use-checkpoint-opt_param-scheduler"], world_size=1)
    assert "contradict each other" in str(excinfo.value.code)
