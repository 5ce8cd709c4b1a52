"""Runs pretrain_gpt.py's pieces for --train-iters under torchrun and dumps, per rank, what EDiT tests inspect:
parameters by global name, the sync trace, bytes per group per iteration, and the outer state's size and place."""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import megatron_edit  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pretrain_gpt  # noqa: E402
from megatron_edit.arguments import parse_args  # noqa: E402
from megatron_edit.dp import comm_stats  # noqa: E402
from megatron_edit.initialize import destroy, initialize_megatron, launch_env  # noqa: E402
from megatron_edit.model import global_parameter_name  # noqa: E402
from megatron_edit.training import build_trainer  # noqa: E402


def add_dump_args(parser: argparse.ArgumentParser):
    parser.add_argument("--dump-dir", required=True)
    return parser


def main():
    env = launch_env()
    args = parse_args(None, world_size=env.world_size, extra_args_provider=add_dump_args)
    device = initialize_megatron(args)
    trainer = build_trainer(args, device, pretrain_gpt.train_valid_test_datasets_provider,
                            pretrain_gpt.model_provider, pretrain_gpt.forward_step)
    mode = trainer.dp_mode
    trace = mode.sync.enable_trace() if hasattr(mode, "sync") else []
    counter = comm_stats.install()
    iterations, losses = [], []
    for iteration in range(1, args.train_iters + 1):
        before, events_before = counter.snapshot(), len(trace)
        loss, _ = trainer.train_step(iteration)
        after = counter.snapshot()
        losses.append(loss)
        iterations.append({"bytes": {k: after[k] - before[k] for k in after}, "trace": trace[events_before:]})
    model = trainer.model[0].module
    while hasattr(model, "module"):
        model = model.module
    dump = {
        "rank": dist.get_rank(),
        "params": {global_parameter_name(n, model): p.detach().float().cpu().clone()
                   for n, p in model.named_parameters()},
        "iterations": iterations,
        "losses": losses,
    }
    if hasattr(mode, "sync"):
        units = mode.sync.units
        dump["units"] = [{"name": u.name, "numel": u.numel, "shard_numel": u.shard_numel,
                          "anchor_device": str(u.anchor.device), "momentum_device": str(u.momentum.device)}
                         for u in units]
        dump["outer_state_numel"] = mode.outer_state_numel()
    torch.save(dump, os.path.join(args.dump_dir, f"rank{dist.get_rank()}.pt"))
    destroy()


if __name__ == "__main__":
    main()
