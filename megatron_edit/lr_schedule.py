"""The learning-rate and weight-decay schedule: megatron-core's OptimizerParamScheduler, built from the flags and
restored from a checkpoint under Megatron-LM's rules for a schedule that changed between runs."""
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_edit.errors import UsageError

# The saved entries that define the curve (num_steps is the position on it), with the flags that set them.
CURVE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters/--lr-warmup-samples/--lr-warmup-fraction",
    "lr_decay_steps": "--lr-decay-iters/--lr-decay-samples (default: --train-iters/--train-samples)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters/--train-samples",
    "wd_incr_style": "(constant)",
}


def build_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """Learning-rate schedule counted in samples, as Megatron-LM's (--train-iters runs count iterations x global
    batch); arguments.py has filled in the counts."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_samples,
        lr_decay_steps=args.lr_decay_samples,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_samples,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


def load_scheduler_state(scheduler: OptimizerParamScheduler, saved: dict, iteration: int) -> None:
    """Resume the saved schedule. When this run's flags give another curve (a longer --train-iters, a new --lr), one
    of Megatron-LM's two flags must say which curve wins: otherwise the saved one would run on silently (past its
    end at --min-lr) while the log shows the new flags."""
    if not (scheduler.override_opt_param_scheduler or scheduler.use_checkpoint_opt_param_scheduler):
        ours = scheduler.state_dict()
        changed = [f"{key} {saved[key]} (checkpoint) vs {ours[key]} (this run; {CURVE_FLAGS[key]})"
                   for key in CURVE_FLAGS if key in saved and saved[key] != ours[key]]
        if changed:
            raise UsageError(f"checkpoint {iteration}'s learning-rate schedule differs from this run's: "
                             f"{'; '.join(changed)}. Pass --override-opt_param-scheduler to follow this run's flags "
                             "from the checkpoint's position, or --use-checkpoint-opt_param-scheduler to keep the "
                             "checkpoint's schedule")
    scheduler.load_state_dict(saved)
