"""The flags every local-SGD mode shares, checked against what the mode's recipe can do (dp/recipes.py), and the
defaults filled in: the recipe's (or replica jobs') for what the user left out, the codecs, the shard group and W.
One UsageError line each."""
from megatron_edit.dp.local_sgd import torchft_replicas
from megatron_edit.dp.local_sgd.config import SIXTEEN_STEP_FP32_RECIPE
from megatron_edit.dp.local_sgd.exchange import SYNC_DTYPES
from megatron_edit.dp.local_sgd.warmup import DEFAULT_WARMUP_CODEC, DEFAULT_WARMUP_FRACTION
from megatron_edit.errors import require


def validate(args, recipe) -> None:
    """Fills in `model_shard_group_size`, `num_model_replicas` (= sync group size, megatron-core's
    distributed-optimizer instances), the checkpoint format, the recipe's defaults and the codecs."""
    if args.ckpt_format is None:
        args.ckpt_format = recipe.default_ckpt_format
    dp = args.data_parallel_size
    if args.model_shard_group_size is None:  # the data-parallel ranks of one node
        args.model_shard_group_size = max(1, min(dp, args.local_world_size // (
            args.tensor_model_parallel_size * args.pipeline_model_parallel_size)))
    shard = args.model_shard_group_size
    require(shard >= 1 and dp % shard == 0,
            f"--model-shard-group-size {shard} does not divide the data-parallel size {dp} "
            f"(world {args.world_size} / TP {args.tensor_model_parallel_size} / PP "
            f"{args.pipeline_model_parallel_size}); pick a divisor of {dp}")
    args.num_model_replicas = dp // shard
    jobs = args.replica_coordinator == "torchft"
    # Replica jobs meet in a quorum at every sync and exchange fp32 through torchft: syncs many steps apart.
    (SIXTEEN_STEP_FP32_RECIPE if jobs else recipe.defaults).fill(args, args.num_model_replicas)
    _resolve_codecs(args)
    if jobs:
        torchft_replicas.validate(args)
    require(args.local_sgd_sync_interval >= 1, "--local-sgd-sync-interval must be >= 1")
    require(args.local_sgd_lr_scale > 0, f"--local-sgd-lr-scale must be positive, got {args.local_sgd_lr_scale}")
    initial = args.local_sgd_initial_sync_interval
    require(initial is None or 1 <= initial <= args.local_sgd_sync_interval,
            f"--local-sgd-initial-sync-interval {initial} must be in [1, H={args.local_sgd_sync_interval}]")
    require(initial is None or args.sync_fragments == 1,
            "--local-sgd-initial-sync-interval ramps whole-model syncs; staggered --sync-fragments start at a "
            "fixed H: drop one of the two")
    require(initial is None or recipe.syncs_on_step_count,
            f"--local-sgd-initial-sync-interval: {recipe.name} syncs on a clock (--aedit-sync-seconds), not on a "
            "step count; use --dp-mode edit, diloco or post-local-sgd")
    require(args.local_sgd_warmup_grad_dtype == "fp32" or args.replica_coordinator != "torchft",
            "--local-sgd-warmup-grad-dtype: replica jobs (--replica-coordinator torchft) have no warm-up")
    require(not args.overlap_param_gather,
            f"--overlap-param-gather applies to --dp-mode ddp: {recipe.name}'s syncs write parameters the deferred "
            "all-gather would overwrite; drop the flag (--overlap-grad-reduce still overlaps)")
    _resolve_warmup(args)
    require(args.outer_lr > 0 and 0 <= args.outer_momentum < 1,
            "--outer-lr must be > 0 and --outer-momentum in [0, 1)")
    require(args.sync_dtype == "fp32" or recipe.exchanges_pseudo_gradients,
            f"--sync-dtype {args.sync_dtype}: {recipe.name} averages parameters, not pseudo-gradients; "
            "use --dp-mode edit, aedit or diloco")
    require(args.sync_delay_steps == 0 or recipe.delays_outer_step,
            f"--sync-delay-steps: {recipe.name} synchronizes the whole model at once; the delayed outer step is "
            "applied module by module, use --dp-mode edit or aedit")
    require(args.sync_fragments == 1 or recipe.syncs_in_fragments,
            f"--sync-fragments: {recipe.name} synchronizes the whole model at once; staggered fragments are EDiT's "
            "module-wise sync on a step count, use --dp-mode edit")
    require(1 <= args.sync_fragments <= args.local_sgd_sync_interval,
            f"--sync-fragments {args.sync_fragments} must be in [1, H={args.local_sgd_sync_interval}]: each "
            "fragment syncs at its own iteration of the H")
    require(not args.sync_error_feedback or args.sync_dtype != "fp32",
            "--sync-error-feedback carries what a codec drops: use it with --sync-dtype "
            f"{', '.join(SYNC_DTYPES[1:-1])} or {SYNC_DTYPES[-1]}")
    require(args.sync_dtype != "topk" or args.sync_error_feedback,
            "--sync-dtype topk sends a few % of each pseudo-gradient: add --sync-error-feedback so the rest is "
            "carried into the next syncs, not dropped")
    require(0 < args.sync_topk_fraction <= 1, "--sync-topk-fraction must be in (0, 1]")
    penalty = [flag for flag, on in [("--edit-anomaly-elimination", args.edit_anomaly_elimination),
                                     ("--edit-weighted-average", args.edit_weighted_average),
                                     ("--edit-pseudo-grad-clip", args.edit_pseudo_grad_clip is not None)] if on]
    require(not penalty or recipe.accepts_penalty,
            f"{', '.join(penalty)}: the pseudo-gradient penalty is EDiT's; use --dp-mode edit or aedit")


def _resolve_codecs(args) -> None:
    """What the recipe leaves to the codecs: error feedback with any codec but fp32, and DEFAULT_WARMUP_CODEC
    for the warm-up's gradients (fp32 for replica jobs, which have no warm-up)."""
    jobs = args.replica_coordinator == "torchft"
    if args.sync_error_feedback is None:
        args.sync_error_feedback = args.sync_dtype != "fp32"
    if args.local_sgd_warmup_grad_dtype is None:
        args.local_sgd_warmup_grad_dtype = "fp32" if jobs else DEFAULT_WARMUP_CODEC

def _resolve_warmup(args) -> None:
    """W from --local-sgd-warmup-iters, or --local-sgd-warmup-fraction of --train-iters, or the default fraction."""
    fraction = args.local_sgd_warmup_fraction
    require(fraction is None or args.local_sgd_warmup_iters is None,
            "give --local-sgd-warmup-iters or --local-sgd-warmup-fraction, not both")
    require(fraction is None or 0 <= fraction <= 1, "--local-sgd-warmup-fraction must be in [0, 1]")
    if args.local_sgd_warmup_iters is None:
        fraction = DEFAULT_WARMUP_FRACTION if fraction is None else fraction
        args.local_sgd_warmup_iters = int(fraction * args.train_iters)
    require(args.local_sgd_warmup_iters >= 0, "--local-sgd-warmup-iters must be >= 0")
