"""Training throughput of one model config and parallel layout: tokens/s, TFLOP/s, MFU, peak memory.

Takes pretrain_gpt.py's flags (mock data is used when no data is given), the scale and memory ones included
(--recompute-*, --sequence-parallel, --overlap-grad-reduce, ...), runs --bench-warmup-iters untimed iterations, then
--train-iters timed ones, and prints a table (Transformer Engine layers on a GPU where it is importable):

    torchrun --nproc-per-node 1 tools/bench_throughput.py --bf16 --num-layers 24 --hidden-size 1024 \\
        --num-attention-heads 16 --seq-length 2048 --micro-batch-size 4 --train-iters 10 --lr 1e-4 \\
        --mock-data --vocab-size 32000 --swiglu --normalization RMSNorm --position-embedding-type rope
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import megatron_edit  # noqa: E402,F401  (first: it quiets megatron-core's import-time warnings)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pretrain_gpt  # noqa: E402
from megatron_edit import platform  # noqa: E402
from megatron_edit.arguments import parse_args  # noqa: E402
from megatron_edit.flops import flops_per_iteration  # noqa: E402
from megatron_edit.initialize import destroy, initialize_megatron, launch_env  # noqa: E402
from megatron_edit.logging import print_rank_last  # noqa: E402
from megatron_edit.training import build_trainer  # noqa: E402

# Dense bf16/fp16 tensor-core peak per device, TFLOP/s, from the vendors' data sheets.
PEAK_TFLOPS_16BIT = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1,
                     "A10": 125.0, "V100": 125.0}


def add_bench_args(parser):
    group = parser.add_argument_group("benchmark")
    group.add_argument("--bench-warmup-iters", type=int, default=3)
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="peak TFLOP/s of one device for MFU; default: looked up from the GPU's name")
    return parser


def detect_peak_tflops(args):
    if args.peak_tflops is not None:
        return args.peak_tflops, "given"
    if args.device_type != "cuda" or not (args.bf16 or args.fp16):
        return None, "unknown (pass --peak-tflops)"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS_16BIT.items():
        if key in name:
            return value, f"{name}, dense 16-bit"
    return None, f"unknown for {name} (pass --peak-tflops)"


def scale_flags(args) -> str:
    """The memory and overlap flags in effect, as the table's row names them."""
    recompute = args.recompute_granularity
    if recompute == "full":
        recompute = f"full {args.recompute_method} x{args.recompute_num_layers}"
    flags = [f"recompute {recompute}" if recompute else None,
             "sequence parallel" if args.sequence_parallel else None,
             "distributed optimizer" if args.use_distributed_optimizer else None,
             "overlap grad reduce" if args.overlap_grad_reduce else None,
             "overlap param gather" if args.overlap_param_gather else None,
             f"attention {args.attention_backend}"]
    return ", ".join(flag for flag in flags if flag)


def main():
    args = parse_args(None, world_size=launch_env().world_size, extra_args_provider=add_bench_args)
    args.train_iters += args.bench_warmup_iters
    device = initialize_megatron(args)
    try:
        trainer = build_trainer(args, device, pretrain_gpt.train_valid_test_datasets_provider,
                                pretrain_gpt.model_provider, pretrain_gpt.forward_step)
        # The train loop's protocol (trainer.plans), so a mode's syncs, the final one included, are timed.
        start = None
        for plan in trainer.plans():
            iteration = plan.iteration
            if iteration == args.bench_warmup_iters + 1:
                platform.synchronize()
                start = time.perf_counter()
            loss_sums = trainer.train_step(plan).loss_sums
        platform.synchronize()
        timed_iters = iteration - args.bench_warmup_iters  # an A-EDiT replica may stop early
        seconds = (time.perf_counter() - start) / timed_iters
        loss = trainer.mean_loss(loss_sums)

        peak_memory = torch.tensor([platform.max_memory_allocated_bytes()], dtype=torch.float64)
        dist.all_reduce(peak_memory, op=dist.ReduceOp.MAX)
        tflops = flops_per_iteration(args) / seconds / args.world_size / 1e12
        peak, peak_source = detect_peak_tflops(args)
        memory_kind = "CUDA allocator peak" if args.device_type == "cuda" else "peak RSS"
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
        rows = [
            ("model", f"{args.num_layers} layers, hidden {args.hidden_size}, heads {args.num_attention_heads}, "
                      f"ffn {args.ffn_hidden_size}, seq {args.seq_length}, vocab {args.padded_vocab_size}"),
            ("layout", f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
                       f"DP={args.data_parallel_size} on {args.world_size} x {args.device_type}, {precision}, "
                       f"{args.transformer_impl} layers"),
            ("memory and overlap", scale_flags(args)),
            ("batch", f"global {args.global_batch_size} = micro {args.micro_batch_size} x {args.num_microbatches} "
                      f"x DP {args.data_parallel_size}"),
            ("time per iteration", f"{seconds * 1000:.1f} ms (mean of {timed_iters})"),
            ("tokens/s", f"{args.global_batch_size * args.seq_length / seconds:,.0f}"),
            ("TFLOP/s per device", f"{tflops:.2f}"),
            ("MFU", f"{100 * tflops / peak:.1f}% of {peak} TFLOP/s ({peak_source})" if peak else peak_source),
            (f"peak memory ({memory_kind})", f"{peak_memory.item() / 2**30:.2f} GiB (max over ranks)"),
            ("last loss", f"{loss:.4f}"),
        ]
        width = max(len(name) for name, _ in rows)
        print_rank_last("\n".join(f"| {name:<{width}} | {value}" for name, value in rows))
    finally:
        destroy()


if __name__ == "__main__":
    main()
