"""Command line in Megatron-LM's spelling, parsed and checked once at the edge.

`parse_args` returns the argparse namespace with derived sizes filled in
(data-parallel size, micro-batches per step, padded vocabulary). Every check that can
fail does so here, before any process group or model exists, with one line that says
what is wrong and how to fix it.

A launcher checks the flags once before it starts N processes (examples/pretrain_edit.sh does):

    python -m megatron_edit.arguments --world-size N --local-world-size L -- FLAGS...

prints the one line and exits 2 if FLAGS cannot run on N processes, L per node.
"""
import argparse
import sys

from megatron.core.transformer.enums import AttnBackend

from megatron_edit import network, platform
from megatron_edit.errors import UsageError
from megatron_edit.errors import require as _require
from megatron_edit.data.datasets import check_data_path, check_split, used_splits
from megatron_edit.data.tokenizers import add_tokenizer_args, build_tokenizer, default_tokenizer_type
from megatron_edit.dp.local_sgd.exchange import SYNC_DTYPES
from megatron_edit.megatron_lm_flags import add_megatron_lm_flags, check_megatron_lm_flags


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flag (unknown, missing, of the wrong type) is one line like any other configuration error,
    rather than the whole usage text."""

    def error(self, message: str):
        raise UsageError(f"{message} (--help lists the flags)")


# megatron-core's StrictHandling values that a command line can ask for (its return_* values are for callers that
# take the mismatched keys back); spelled out so that the preflight does not import dist_checkpointing.
DIST_CKPT_STRICTNESS = ("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                        "ignore_all")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(description="GPT pretraining on megatron-core", allow_abbrev=False)

    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4*hidden, or 8/3*hidden with --swiglu")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when it is importable on a GPU, else local")
    g.add_argument("--attention-backend", choices=[b.name for b in AttnBackend], default="auto",
                   help="megatron-core's attention implementation (flash, fused and unfused need Transformer Engine)")
    for flag, dest in (("--no-masked-softmax-fusion", "masked_softmax_fusion"),
                       ("--no-bias-gelu-fusion", "bias_gelu_fusion"), ("--no-bias-swiglu-fusion", "bias_swiglu_fusion"),
                       ("--no-bias-dropout-fusion", "bias_dropout_fusion"), ("--no-rope-fusion", "apply_rope_fusion")):
        g.add_argument(flag, dest=dest, action="store_false",
                       help="keep this fused kernel of Transformer Engine's layers off (the local layers fuse nothing)")

    g = parser.add_argument_group("activation recomputation")
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: whole transformer layers; selective: the core attention only")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: uniform recomputes every --recompute-num-layers layers as one chunk; block the "
                        "first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=1)

    g = parser.add_argument_group("layer swapping (one whole replica on one modest GPU; see docs/layer_swapping.md)")
    g.add_argument("--swap-layers", action="store_true",
                   help="keep the transformer layers' weights, fp32 main parameters and Adam state in host memory; "
                        "each layer's weights come to the device for its forward and backward, the next ones "
                        "prefetched, and its gradients go back as its backward ends")
    g.add_argument("--swap-resident-layers", type=int, default=2,
                   help="at most this many layers' weights on the device at once, the computing one included; "
                        "after the first iteration the planner picks how many of them to use and how far to prefetch")

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, default=None, help="iterations to train; or give --train-samples")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train; --train-samples // --global-batch-size iterations, the LR schedule in "
                        "--lr-*-samples")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="before each optimizer step, stop (ddp) or skip the step (edit/aedit with "
                        "--edit-anomaly-elimination) when a loss or gradient is NaN or infinite")
    g.add_argument("--deterministic-mode", action="store_true",
                   help="torch's deterministic algorithms only (and megatron-core's deterministic mode): bitwise "
                        "repeatable runs on GPUs too, at some speed")
    g.add_argument("--manual-gc", action="store_true",
                   help="Python's garbage collector off during training, collected at the same points on every rank "
                        "(before and after each evaluation, every --manual-gc-interval iterations)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: collect every this many iterations (0: only around evaluations)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: do not collect around evaluations")
    g.add_argument("--empty-unused-memory-level", type=int, default=0, choices=[0, 1, 2],
                   help="return the GPU's cached free memory to the device after each step's backward (1) and also "
                        "after the optimizer step and each evaluation (2); a CPU keeps no such cache")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default: --train-samples")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay (instead of --lr-warmup-iters/--lr-warmup-samples)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static loss scale; default: dynamic")

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split layer norms and dropout along the sequence over the tensor-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets during backward (in the shard group under the local-SGD modes)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather the distributed optimizer's updated parameters bucket by bucket during the next "
                        "forward (ddp; with --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--sync-interface", default=None,
                   help="the network interface every socket of the run listens on (torch's stores, gloo, NCCL, "
                        "torchft's manager and heal transport); default: the one that reaches the master "
                        "(loopback on one machine); replicas in other clusters need the one they reach this on "
                        "(see docs/running_across_clusters.md)")
    g.add_argument("--dp-mode", default="ddp", help="data-parallel mode: ddp, edit, aedit, diloco, post-local-sgd (see megatron_edit/dp/)")

    g = parser.add_argument_group("local SGD (edit and the other local-SGD modes)")
    g.add_argument("--model-shard-group-size", type=int, default=None,
                   help="data-parallel ranks that hold one replica together; default: those of one node")
    g.add_argument("--local-sgd-sync-interval", type=int, default=None,
                   help="H: local steps between syncs; default 2 for edit, 16 for diloco and post-local-sgd")
    g.add_argument("--local-sgd-warmup-iters", type=int, default=None,
                   help="W: iterations of synchronous data parallelism before local steps begin")
    g.add_argument("--local-sgd-warmup-fraction", type=float, default=None,
                   help="W as a fraction of --train-iters; without either flag, 0.25 (see docs/baselines.md, "
                        "'Choosing H, the outer optimizer and warm-up')")
    g.add_argument("--local-sgd-initial-sync-interval", type=int, default=None,
                   help="H0: a ramp of sync intervals from the first local step: H0, 2 H0, 4 H0, ... up to H "
                        "(default: every interval is H)")
    g.add_argument("--local-sgd-warmup-grad-dtype", choices=SYNC_DTYPES, default=None,
                   help="what the warm-up's gradient average over the replicas sends: fp32 (DDP's), or a codec of "
                        "--sync-dtype's, always with error feedback; default int2 (see docs/baselines.md, "
                        "'Choosing H, the outer optimizer and warm-up')")
    g.add_argument("--local-sgd-lr-scale", type=float, default=None,
                   help="multiply the inner LR schedule by this during local steps (not the synchronous warm-up): "
                        "each replica's Adam sees 1/M of the batch's gradients and steps shorter than DDP's; "
                        "default M (M replicas, at most 4) for edit, 1 for the other modes (see "
                        "docs/low_communication.md, 'Local Adam at M=4')")
    g.add_argument("--outer-lr", type=float, default=None,
                   help="the outer SGD step on the averaged pseudo-gradient; default 1 for edit (with no "
                        "momentum: the average itself), 0.7 for diloco and aedit")
    g.add_argument("--outer-momentum", type=float, default=None, help="default 0 for edit, 0.8 for diloco and aedit")
    g.add_argument("--outer-nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help="default: off for edit, on for diloco and aedit")
    g.add_argument("--offload-outer-state", action="store_true", help="keep anchor and momentum in CPU memory")
    g.add_argument("--sync-dtype", choices=SYNC_DTYPES, default=None,
                   help="what the pseudo-gradient exchange sends: fp32, bf16 (1/2 the bytes), int8, int4 or int2 "
                        "with a scale per block (about 1/4, 1/8, 1/16), or topk (--sync-topk-fraction of the values, "
                        "with their indices); edit, aedit and diloco; default int2 for edit, int4 for aedit and "
                        "diloco (fp32 for post-local-sgd, which averages parameters, and for replica jobs over "
                        "torchft)")
    g.add_argument("--sync-error-feedback", action=argparse.BooleanOptionalAction, default=None,
                   help="carry what the codec dropped (bf16/int8/int4/int2 rounding, top-k's unsent values) into "
                        "the next sync; default: on with any codec but fp32")
    g.add_argument("--sync-topk-fraction", type=float, default=0.01,
                   help="--sync-dtype topk: the share of each module's pseudo-gradient values sent per sync")
    g.add_argument("--sync-delay-steps", type=int, default=0,
                   help="tau: apply each module's outer step tau iterations after its exchange was issued, carrying "
                        "the local progress made meanwhile, so the exchange hides behind local steps (edit, aedit)")
    g.add_argument("--sync-fragments", type=int, default=1,
                   help="F: split the modules into F groups (balanced by size) that sync at staggered iterations, "
                        "every H local steps each, so the link carries about 1/F of the model at a time (edit)")

    g = parser.add_argument_group("replicas as independent jobs (torchft; see docs/replica_jobs.md)")
    g.add_argument("--replica-coordinator", choices=["process-group", "torchft"], default="process-group",
                   help="process-group: every replica in this launch; torchft: this launch is one replica, meeting "
                        "the others at each sync through the lighthouse at $TORCHFT_LIGHTHOUSE (diloco)")
    # dest: an args namespace with `replica_id` would read as a sharded object to megatron-core's checkpointing
    g.add_argument("--replica-id", dest="replica_index", type=int, default=None,
                   help="torchft: this replica, in [0, --num-replicas)")
    g.add_argument("--num-replicas", type=int, default=None,
                   help="torchft: replica ids in use; each reads 1/N of every global batch")
    g.add_argument("--torchft-min-replicas", type=int, default=1, help="a sync commits only with this many present")
    g.add_argument("--torchft-timeout-secs", type=float, default=60.0, help="for a sync's collectives and commit")
    g.add_argument("--torchft-quorum-timeout-secs", type=float, default=1800.0,
                   help="how long a replica waits for the others at a sync; must exceed a sync interval")
    g.add_argument("--replica-step-timeout-secs", type=float, default=600.0,
                   help="torchft: a replica whose iteration takes longer (waits for the quorum excluded) exits")
    g.add_argument("--sync-secret-file", default=None,
                   help="torchft: a file (mode 600, >= 16 bytes) every replica holds alike; a replica proves it before "
                        "it heals, serves heal state or its pseudo-gradient counts; required unless --sync-interface "
                        "is loopback; default $MEGATRON_EDIT_SYNC_SECRET_FILE")

    g = parser.add_argument_group("EDiT pseudo-gradient penalty")
    g.add_argument("--edit-anomaly-elimination", action="store_true",
                   help="drop a replica's pseudo-gradient for a module when its norm's EWMA z-score is too high")
    g.add_argument("--edit-anomaly-ewma-alpha", type=float, default=0.02)
    g.add_argument("--edit-anomaly-warmup-syncs", type=int, default=120, help="syncs observed before judging")
    g.add_argument("--edit-anomaly-threshold", type=float, default=3.0, help="z-score above which a norm is an outlier")
    g.add_argument("--edit-anomaly-max-consecutive", type=int, default=3,
                   help="syncs in a row a replica's module may be excluded; the next norm is accepted")
    g.add_argument("--edit-weighted-average", action="store_true",
                   help="weigh replicas by softmax(-norm / temperature) instead of equally")
    g.add_argument("--edit-weight-temperature", type=float, default=1.0)
    g.add_argument("--edit-pseudo-grad-clip", type=float, default=None,
                   help="scale each module's averaged pseudo-gradient to at most this norm")

    g = parser.add_argument_group("A-EDiT (--dp-mode aedit)")
    g.add_argument("--aedit-sync-seconds", type=float, default=60.0, help="tau: wall-clock seconds between syncs")
    g.add_argument("--aedit-step-weight", type=float, default=0.0,
                   help="in [0, 1]: how much each replica's share of local steps counts in the weights")

    g = parser.add_argument_group("fault injection (tests and demonstrations only)")
    g.add_argument("--simulate-straggler", default=None, metavar="REPLICA:FACTOR")
    g.add_argument("--simulated-step-seconds", type=float, default=None, metavar="S")
    g.add_argument("--inject-fault", action="append", default=[], metavar="REPLICA:ITER:KIND",
                   help="KIND: scale (pseudo-gradients x100), nan, bad-data (random tokens), nan-loss (a NaN loss at "
                        "ITER), hang (blocks at ITER); repeatable")

    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="prefix of a preprocessed .bin/.idx pair, or weight prefix weight prefix ... to blend")
    g.add_argument("--split", default="969,30,1",
                   help="train,valid,test weights of every --data-path prefix; test is never read, valid only when "
                        "--eval-iters > 0")
    g.add_argument("--data-cache-path", default=None,
                   help="where megatron-core keeps its sample index caches, in a folder per version of the data")
    g.add_argument("--mock-data", action="store_true", help="synthetic documents from megatron-core's MockGPTDataset")
    g.add_argument("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
                   help="read the .bin files with plain reads instead of memory-mapping them (file systems where "
                        "mmap is slow or unsupported)")
    add_tokenizer_args(parser)

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--load", default=None, help="directory to resume from (its newest complete checkpoint)")
    g.add_argument("--ckpt-format", default=None, choices=["torch", "torch_dist"],
                   help="torch_dist (default; torch for --dp-mode aedit): megatron-core's dist_checkpointing, as "
                        "Megatron-LM writes it, which reshards to other TP/PP/DP layouts, shard groups and replica "
                        "counts; torch: one file per rank, which resumes on the layout it was saved on")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    g.add_argument("--dist-ckpt-strictness", default="assume_ok_unexpected",
                   choices=DIST_CKPT_STRICTNESS,
                   help="how loading a torch_dist checkpoint treats keys it holds that this run has no place for, or "
                        "lacks (megatron-core's StrictHandling: assume them fine, log them, raise, or ignore all)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load the checkpoint of this iteration under --load, not the newest")
    g.add_argument("--no-save-optim", action="store_true", help="save without the optimizer and LR schedule")
    g.add_argument("--no-save-rng", action="store_true", help="save without the RNG states")
    g.add_argument("--no-load-optim", action="store_true", help="load without the optimizer and LR schedule")
    g.add_argument("--no-load-rng", action="store_true", help="load without the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights only and start at iteration 0 with a fresh optimizer and schedule")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="resume with this run's learning-rate schedule flags (--lr, --train-iters, ...) from the "
                        "checkpoint's position, where they differ from the saved schedule's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="resume with the checkpoint's learning-rate schedule, whatever this run's flags say")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the model's shape (layers, sizes, heads, Llama-style switches) from the newest "
                        "checkpoint under --load instead of the command line")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this iteration (saving first)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop (saving first) at the first log iteration after this many minutes of wall-clock "
                        "training (Slurm time limits)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (Slurm preemption, scancel), finish the iteration, save (with --save) and exit 0")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, help="delete older checkpoints")

    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--wandb-project", default=None, help="log to wandb (offline when WANDB_API_KEY is not set)")
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None, help="where wandb writes its run directory")
    g.add_argument("--tensorboard-dir", default=None, help="write the same series as TensorBoard scalars here")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="TensorBoard events held in memory before they are written")
    g.add_argument("--log-params-norm", action="store_true",
                   help="the L2 norm of the model's parameters in each log line (this replica's, under local SGD)")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="the number of zeros in the gradient in each log line")
    add_megatron_lm_flags(parser)
    return parser


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's: 4h, or with SwiGLU 8h/3 rounded down to a multiple of 64."""
    return (int(8 * hidden_size / 3 / 64) * 64 or hidden_size * 2) if swiglu else 4 * hidden_size


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def parse_args(argv, world_size: int, local_world_size: int = None, extra_args_provider=None,
               warn: bool = True) -> argparse.Namespace:
    """Parse, fill in defaults that depend on other flags, and validate against the world size.

    `extra_args_provider(parser)` adds a tool's own flags, as in Megatron-LM. `warn`: say which Megatron-LM flags
    change nothing here (rank 0 of the launch does; the preflight does not repeat it)."""
    parser = build_parser()
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    args = parser.parse_args(argv)
    args.world_size = world_size
    args.local_world_size = local_world_size or world_size
    if args.use_checkpoint_args:
        _use_checkpoint_args(args)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = default_ffn_hidden_size(args.hidden_size, args.swiglu)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    validate_args(args, warn)
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if args.device_type == "cuda" and _importable("transformer_engine") \
            else "local"
    return args


def _use_checkpoint_args(args: argparse.Namespace) -> None:
    """The model's shape as the newest complete checkpoint under --load records it (Megatron-LM's
    --use-checkpoint-args): it overrides the command line's."""
    from megatron_edit.checkpointing import MODEL_KEYS, find_checkpoint

    _require(args.load is not None, "--use-checkpoint-args reads the model's shape from a checkpoint: give --load DIR")
    found = find_checkpoint(args.load, args.save, args.ckpt_step, verify=False)  # the load verifies what it reads
    _require(found is not None, f"--use-checkpoint-args: no complete checkpoint under --load {args.load} to read "
                                "the model's shape from; give the model flags instead")
    for key in MODEL_KEYS:
        setattr(args, key, found[1][key])
    args.group_query_attention = args.num_query_groups != args.num_attention_heads


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Sizes that are counts of something: 0 or less would divide by zero (or build nothing) later, on every rank.
POSITIVE_SIZES = ("--micro-batch-size", "--global-batch-size", "--num-layers", "--hidden-size", "--ffn-hidden-size",
                  "--num-attention-heads", "--num-query-groups", "--seq-length", "--max-position-embeddings",
                  "--vocab-size")


def validate_args(args: argparse.Namespace, warn: bool = True) -> None:
    """All configuration checks; fills in `data_parallel_size`, `num_microbatches`, `device_type`."""
    _require(args.world_size >= 1, f"the launch has {args.world_size} processes; start at least one")
    for flag in POSITIVE_SIZES:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        _require(value is None or value >= 1, f"{flag} must be a positive integer, got {value}")
    tp, pp, world = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size
    _require(tp >= 1 and pp >= 1, "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
    _require(world % (tp * pp) == 0,
             f"world size {world} is not divisible by tensor x pipeline parallel size {tp}x{pp}={tp * pp}; "
             f"launch a multiple of {tp * pp} processes or change the parallel sizes")
    args.data_parallel_size = world // (tp * pp)
    dp = args.data_parallel_size

    _require(args.hidden_size % args.num_attention_heads == 0,
             f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}; pick a TP size that divides the heads")
    _require(args.num_attention_heads % args.num_query_groups == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups "
             f"{args.num_query_groups}")
    _require(args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    _require(args.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    _require(pp <= args.num_layers,
             f"--pipeline-model-parallel-size {pp} is larger than --num-layers {args.num_layers}; "
             "every pipeline stage needs at least one layer")
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.sequence_parallel and tp == 1:  # as Megatron-LM: nothing to split the sequence over
        args.sequence_parallel = False
    _require(not args.recompute_activations or args.recompute_granularity in (None, "selective"),
             "--recompute-activations is --recompute-granularity selective; give one of them")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    _require(args.recompute_granularity != "full" or args.recompute_method is not None,
             "--recompute-granularity full needs --recompute-method uniform or block")
    _require(args.recompute_method is None or args.recompute_granularity == "full",
             "--recompute-method applies to --recompute-granularity full")
    _require(args.recompute_granularity != "full" or 1 <= args.recompute_num_layers <= args.num_layers // pp,
             f"--recompute-num-layers {args.recompute_num_layers} must be in [1, {args.num_layers // pp}] "
             "(the layers of one pipeline stage)")
    _require(not args.overlap_param_gather or (args.use_distributed_optimizer and args.overlap_grad_reduce),
             "--overlap-param-gather overlaps the distributed optimizer's all-gather: it needs "
             "--use-distributed-optimizer and --overlap-grad-reduce")
    _require(args.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be > 0")
    if args.sync_interface:  # an interface this machine has, and the one GLOO_SOCKET_IFNAME names if set
        network.listen_interface(args.sync_interface)
    _require(args.seq_length <= args.max_position_embeddings,
             f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")

    # With replicas as separate launches, a global batch spans all of them, as it does in one launch.
    args.replica_launches = args.num_replicas if args.replica_coordinator == "torchft" else 1
    _require(args.replica_launches is not None and args.replica_launches >= 1,
             "--replica-coordinator torchft needs --num-replicas N (the replica ids in use, 0..N-1)")
    ranks = dp * args.replica_launches
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * ranks
    _require(args.global_batch_size % (args.micro_batch_size * ranks) == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by micro batch x data parallel "
             f"({args.micro_batch_size}x{ranks}={args.micro_batch_size * ranks}"
             f"{' over all replicas' if args.replica_launches > 1 else ''}); use a multiple of it")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * ranks)

    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 are mutually exclusive; pick one")
    args.device_type = platform.resolve_device_type(args.device)
    if args.bf16:
        _require(platform.bf16_supported(args.device_type),
                 f"--bf16 was requested but this {args.device_type} cannot compute in bfloat16; drop --bf16")
    check_megatron_lm_flags(args, warn)
    _validate_schedule(args)
    _require(args.log_interval > 0 and args.eval_interval > 0, "--log-interval and --eval-interval must be positive")

    _require(args.save_interval is None or args.save_interval > 0, "--save-interval must be positive")
    _require(args.manual_gc_interval >= 0, f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    _require(not (args.deterministic_mode and args.attention_backend == "flash"),
             "--deterministic-mode: flash attention's backward is not deterministic; use another --attention-backend")
    _require(args.ckpt_step is None or args.load is not None,
             f"--ckpt-step {args.ckpt_step} picks a checkpoint under --load: give --load DIR")
    _require(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler contradict each other: "
             "give one (this run's schedule, or the checkpoint's)")

    _require(args.eval_iters >= 0, "--eval-iters must be >= 0")
    check_split(args.split, used_splits(args))
    default_tokenizer_type(args)
    if args.mock_data:
        if args.tokenizer_type is None:
            args.tokenizer_type = "NullTokenizer"
    elif args.data_path:
        _require(args.tokenizer_type is not None,
                 "--data-path needs --tokenizer-type (and --tokenizer-model) matching the one used to preprocess it")
        check_data_path(args.data_path, args.split, used_splits(args))
    else:
        raise UsageError("no training data: pass --data-path PREFIX (made by tools/preprocess_data.py) or --mock-data")
    # Reading the tokenizer's files here stops a file that is not a tokenizer of its kind in the preflight.
    args.padded_vocab_size = padded_vocab_size(build_tokenizer(args).vocab_size, args)

    from megatron_edit.dp import DP_MODES

    _require(args.dp_mode in DP_MODES, f"--dp-mode {args.dp_mode!r} is unknown; choose one of {sorted(DP_MODES)}")
    mode = DP_MODES[args.dp_mode]
    mode.validate(args)
    _validate_faults(args, mode)
    if args.swap_layers:
        from megatron_edit.swap.layers import validate as validate_swapping
        validate_swapping(args)


def _validate_schedule(args: argparse.Namespace) -> None:
    """Megatron-LM's two ways to give the length and LR schedule, iterations or samples, not mixed; fills in
    `train_iters` and the schedule in samples (`train_samples`, `lr_warmup_samples`, `lr_decay_samples`), which
    the scheduler counts."""
    gbs = args.global_batch_size
    _require((args.train_iters is None) != (args.train_samples is None),
             "give the training length as one of --train-iters or --train-samples")
    if args.train_iters is not None:
        _require(args.lr_decay_samples is None and args.lr_warmup_samples == 0,
                 "--lr-decay-samples/--lr-warmup-samples go with --train-samples; with --train-iters give "
                 "--lr-decay-iters/--lr-warmup-iters")
        _require(args.train_iters > 0, "--train-iters must be positive")
        args.train_samples = args.train_iters * gbs
        args.lr_decay_samples = (args.lr_decay_iters or args.train_iters) * gbs
        warmup, warmup_flag = args.lr_warmup_iters * gbs, "--lr-warmup-iters"
    else:
        _require(args.lr_decay_iters is None and args.lr_warmup_iters == 0,
                 "--lr-decay-iters/--lr-warmup-iters go with --train-iters; with --train-samples give "
                 "--lr-decay-samples/--lr-warmup-samples")
        args.train_iters = args.train_samples // gbs
        _require(args.train_iters > 0, f"--train-samples {args.train_samples} is less than one global batch ({gbs})")
        args.lr_decay_samples = args.lr_decay_samples or args.train_samples
        warmup, warmup_flag = args.lr_warmup_samples, "--lr-warmup-samples"
    if args.lr_warmup_fraction is not None:
        _require(warmup == 0, f"give one of --lr-warmup-fraction and {warmup_flag}")
        _require(0.0 <= args.lr_warmup_fraction < 1.0, "--lr-warmup-fraction must be in [0, 1)")
        warmup, warmup_flag = args.lr_warmup_fraction * args.lr_decay_samples, "--lr-warmup-fraction"
    args.lr_warmup_samples = warmup
    _require(warmup < args.lr_decay_samples,
             f"the LR warm-up ({warmup_flag}) must end before the decay does (--lr-decay-iters/--lr-decay-samples, "
             "default: the whole run); shorten the warm-up")


def _validate_faults(args: argparse.Namespace, mode) -> None:
    from megatron_edit.dp.faults import parse_fault, parse_straggler

    faults = list(map(parse_fault, args.inject_fault))
    straggler = parse_straggler(args.simulate_straggler)
    for fault in faults:
        _require(fault.kind in mode.fault_kinds, f"--inject-fault {fault.kind} does not apply to --dp-mode {args.dp_mode}")
    _require(args.simulated_step_seconds is None or args.simulated_step_seconds > 0,
             "--simulated-step-seconds must be > 0")
    replicas = mode.fault_replicas(args)
    for replica in [f.replica for f in faults] + ([straggler[0]] if straggler else []):
        _require(0 <= replica < replicas, f"fault injection names replica {replica}, but there are {replicas} (0..{replicas - 1})")


def main(argv=None) -> None:
    """Check a launch's flags in one process before the launcher starts them all (see the module's docstring)."""
    parser = argparse.ArgumentParser(prog="python -m megatron_edit.arguments", allow_abbrev=False,
                                     description="check pretrain_gpt.py's flags for a launch of --world-size processes")
    parser.add_argument("--world-size", type=int, required=True, help="processes the launch will start in all")
    parser.add_argument("--local-world-size", type=int, default=None, help="of those, per node (default: all)")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="-- then pretrain_gpt.py's flags")
    launch = parser.parse_args(argv)
    flags = launch.flags[1:] if launch.flags[:1] == ["--"] else launch.flags
    try:
        parse_args(flags, world_size=launch.world_size, local_world_size=launch.local_world_size, warn=False)
    except UsageError as exc:
        print(exc.code, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
