"""Checkpoint save and load time and bytes on disk: --ckpt-format torch against torch_dist, side by side in one job.

    python tools/bench_checkpoint.py                         # a ~100M-parameter GPT on 2 and 4 CPU ranks
    python tools/bench_checkpoint.py --nprocs 2 --num-layers 2 --hidden-size 128    # a quick look

Each job (one per --nprocs) builds the model once, takes one training step so the optimizer has its state, then for
every (format, optimizer) row saves a checkpoint through pretrain_gpt.py's own save_checkpoint and loads it back
through load_checkpoint, timing both on every rank (the slowest rank is the time) with a barrier before each. Rows:
torch and torch_dist with the plain optimizer, and with --use-distributed-optimizer (a job of its own, since the
optimizer is built once). Bytes are everything the checkpoint directory holds. Data-parallel training with no model
parallelism: torch writes the whole model and optimizer once per rank, torch_dist each tensor once.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tools.experiment import job_env, torchrun_command, write_table  # noqa: E402

FORMATS = ("torch", "torch_dist")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4], help="ranks per job (data parallel)")
    parser.add_argument("--num-layers", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-attention-heads", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--output-dir", default="runs/bench_checkpoint")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints are written (default: a temporary "
                                                               "directory, removed afterwards)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--distributed-optimizer", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def model_argv(args, nproc: int) -> list:
    return ["--num-layers", str(args.num_layers), "--hidden-size", str(args.hidden_size),
            "--num-attention-heads", str(args.num_attention_heads), "--seq-length", "128",
            "--max-position-embeddings", "128", "--micro-batch-size", "1", "--global-batch-size", str(nproc),
            "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--vocab-size", str(args.vocab_size),
            "--eval-iters", "0", "--device", "cpu"]


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(path) for name in names)


def worker(args) -> None:
    """One torchrun rank: build, step once, then save and load in each format."""
    import megatron_edit  # noqa: F401
    import torch
    import torch.distributed as dist

    import pretrain_gpt
    from megatron_edit.arguments import parse_args
    from megatron_edit.checkpointing import load_checkpoint, save_checkpoint
    from megatron_edit.initialize import destroy, initialize_megatron, launch_env
    from megatron_edit.training import build_trainer

    env = launch_env()
    argv = model_argv(args, env.world_size) + (["--use-distributed-optimizer"] if args.distributed_optimizer else [])
    train_args = parse_args(argv, world_size=env.world_size, local_world_size=env.local_world_size)
    device = initialize_megatron(train_args)
    trainer = build_trainer(train_args, device, pretrain_gpt.train_valid_test_datasets_provider,
                            pretrain_gpt.model_provider, pretrain_gpt.forward_step)
    trainer.train_step(next(trainer.plans()))
    parameters = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    rows = []
    for ckpt_format in FORMATS:
        train_args.ckpt_format = ckpt_format
        train_args.save = train_args.load = os.path.join(args.checkpoint_dir, f"{env.world_size}", ckpt_format)
        seconds = {}
        for step, action in (("save", lambda: save_checkpoint(trainer, 1)), ("load", lambda: load_checkpoint(trainer))):
            dist.barrier()
            start = time.perf_counter()
            action()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            seconds[step] = elapsed.item()
        if dist.get_rank() == 0:
            rows.append({"ranks": env.world_size, "format": ckpt_format,
                         "optimizer": "distributed" if args.distributed_optimizer else "plain",
                         "parameters (M)": round(parameters / 1e6, 1), "save s": round(seconds["save"], 2),
                         "load s": round(seconds["load"], 2),
                         "MB on disk": round(directory_bytes(train_args.save) / 1e6, 1)})
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(train_args.save)
    if dist.get_rank() == 0:
        print("BENCH_ROWS " + json.dumps(rows), flush=True)
    destroy()


def run_job(args, nproc: int, distributed_optimizer: bool) -> list:
    worker_argv = ["--worker", "--checkpoint-dir", args.checkpoint_dir, "--num-layers", str(args.num_layers),
                   "--hidden-size", str(args.hidden_size), "--num-attention-heads", str(args.num_attention_heads),
                   "--vocab-size", str(args.vocab_size)] + (["--distributed-optimizer"] if distributed_optimizer else [])
    command = torchrun_command(nproc, worker_argv, script=__file__)
    result = subprocess.run(command, cwd=REPO, env=job_env(), capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("BENCH_ROWS ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"error: the {nproc}-rank job failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH_ROWS "):])


def main(argv=None):
    args = get_args(argv)
    if args.worker:
        worker(args)
        return
    temporary = args.checkpoint_dir is None
    args.checkpoint_dir = tempfile.mkdtemp(prefix="bench-ckpt-") if temporary else args.checkpoint_dir
    try:
        rows = [row for nproc in args.nprocs for distributed_optimizer in (False, True)
                for row in run_job(args, nproc, distributed_optimizer)]
    finally:
        if temporary:
            shutil.rmtree(args.checkpoint_dir, ignore_errors=True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    print(write_table(rows, output_dir, "checkpoint"))


if __name__ == "__main__":
    main()
