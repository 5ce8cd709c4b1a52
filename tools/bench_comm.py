"""Bytes per iteration on each process group, and time per iteration, for DDP and EDiT at several H,
measured on the same model side by side with the formula.

    python tools/bench_comm.py --nproc 4 --model-shard-group-size 2 --intervals 1 4 16 --train-iters 33

P is the number of parameters, S the shard-group size, M = DP / S the replicas. Bytes each rank sends per
iteration (ring algorithms, see megatron_edit/dp/comm_stats.py: an all-reduce of N bytes over n ranks sends
2(n-1)/n N, an all-gather (n-1)/n N): DDP all-reduces 4P bytes of fp32 gradients over the whole DP group.
EDiT (W=0) all-reduces 4P inside the shard group every iteration; a sync iteration adds an all-reduce of 4P/S
on the sync group (the owned pseudo-gradient slice) and an all-gather of 4P in the shard group.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
         "--micro-batch-size", "4", "--lr", "1e-3", "--mock-data", "--vocab-size", "2047",
         "--log-interval", "1000", "--eval-interval", "100000", "--eval-iters", "1"]


def worker(argv):
    import megatron_edit  # noqa: F401
    import torch.distributed as dist

    import pretrain_gpt
    from megatron_edit import platform
    from megatron_edit.arguments import parse_args
    from megatron_edit.dp import comm_stats
    from megatron_edit.initialize import destroy, initialize_megatron, launch_env
    from megatron_edit.training import build_trainer

    env = launch_env()
    args = parse_args(argv, world_size=env.world_size, local_world_size=env.local_world_size)
    device = initialize_megatron(args)
    trainer = build_trainer(args, device, pretrain_gpt.train_valid_test_datasets_provider,
                            pretrain_gpt.model_provider, pretrain_gpt.forward_step)
    counter = comm_stats.install()
    before = counter.snapshot()
    platform.synchronize()
    start = time.perf_counter()
    for plan in trainer.plans():  # the train loop's protocol: a mode's syncs (the final one too) are counted
        trainer.train_step(plan)
    platform.synchronize()
    seconds = time.perf_counter() - start
    after = counter.snapshot()
    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    if dist.get_rank() == 0:
        print("BENCH_COMM " + json.dumps({
            "bytes_per_iter": {k: (after[k] - before[k]) / args.train_iters for k in after},
            "ms_per_iter": 1000 * seconds / args.train_iters, "params": params}), flush=True)
    destroy()


def expected(mode, params, nproc, shard, interval, iters):
    """Bytes per iteration by group, from the formula in the module docstring."""
    from megatron_edit.dp.comm_stats import wire_fraction

    if mode == "ddp":
        return {"dp": 4 * params * wire_fraction("all_reduce", nproc)}
    syncs = (iters - 1) // interval
    return {"shard": 4 * params * (wire_fraction("all_reduce", shard) + syncs / iters * wire_fraction("all_gather", shard)),
            "sync": syncs * 4 * params / shard / iters * wire_fraction("all_reduce", nproc // shard)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--model-shard-group-size", type=int, default=2)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--train-iters", type=int, default=33)
    args, model_args = parser.parse_known_args()
    model_args = MODEL + model_args + ["--train-iters", str(args.train_iters),
                                       "--global-batch-size", str(4 * args.nproc)]
    configs = [("ddp", None, [])] + [
        ("edit", h, ["--dp-mode", "edit", "--model-shard-group-size", str(args.model_shard_group_size),
                     "--local-sgd-sync-interval", str(h), "--local-sgd-warmup-iters", "0",
                     "--sync-dtype", "fp32"]) for h in args.intervals]  # the formula's fp32 all-reduce
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    print(f"{'mode':>5} | {'H':>3} | {'group':>6} | {'measured B/iter':>15} | {'formula B/iter':>15} | {'ms/iter':>8}")
    for mode, interval, extra in configs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   __file__, "--worker", *model_args, *extra]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_COMM ")]
        if result.returncode != 0 or not lines:
            sys.exit(f"error: {mode} H={interval} failed:\n{result.stderr[-3000:]}")
        measured = json.loads(lines[0][len("BENCH_COMM "):])
        formula = expected(mode, measured["params"], args.nproc, args.model_shard_group_size, interval,
                           args.train_iters)
        for group in formula:
            print(f"{mode:>5} | {interval or '-':>3} | {group:>6} | {measured['bytes_per_iter'].get(group, 0):>15,.0f} | "
                  f"{formula[group]:>15,.0f} | {measured['ms_per_iter']:>8.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
