"""Runs pretrain_gpt.py's pieces for --train-iters under torchrun and dumps, per rank, what EDiT tests inspect:
parameters by global name, the sync trace, bytes per group per iteration, the outer state's size and place, the
bytes of megatron-core's DDP buckets (gradient and parameter buffers), and with --swap-layers what the swapper saw
at every layer boundary."""
import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import megatron_edit  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

import pretrain_gpt  # noqa: E402
from megatron_edit.arguments import parse_args  # noqa: E402
from megatron_edit.checkpointing import save_checkpoint  # noqa: E402
from megatron_edit.dp import comm_stats  # noqa: E402
from megatron_edit.initialize import destroy, initialize_megatron, launch_env  # noqa: E402
from megatron_edit.model import global_parameter_name  # noqa: E402
from megatron_edit.training import build_trainer  # noqa: E402


def add_dump_args(parser: argparse.ArgumentParser):
    parser.add_argument("--dump-dir", required=True)
    parser.add_argument("--dump-param-history", action="store_true", help="parameters after every iteration too")
    return parser


def group_timeouts(mode) -> dict:
    """Seconds each process group of this rank (megatron-core's and the mode's) gives a collective before failing."""
    groups = {name: group for name, group in vars(parallel_state).items() if isinstance(group, dist.ProcessGroup)}
    if hasattr(mode, "groups"):
        groups.update({f"local_sgd.{field.name}": getattr(mode.groups, field.name)
                       for field in dataclasses.fields(mode.groups) if getattr(mode.groups, field.name) is not None})
    return {name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name, group in groups.items()}


def main():
    env = launch_env()
    args = parse_args(None, world_size=env.world_size, extra_args_provider=add_dump_args)
    device = initialize_megatron(args)
    trainer = build_trainer(args, device, pretrain_gpt.train_valid_test_datasets_provider,
                            pretrain_gpt.model_provider, pretrain_gpt.forward_step)
    mode = trainer.dp_mode
    layerwise = getattr(getattr(mode, "sync", None), "layerwise", None)  # EDiT's module-wise sync
    trace = layerwise.enable_trace() if layerwise else []
    model = trainer.model[0]
    while hasattr(model, "module"):
        model = model.module

    def named_params(model):
        return {global_parameter_name(n, model): p.detach().float().cpu().clone() for n, p in model.named_parameters()}

    swap_events = []
    swapper = trainer.swapper
    if swapper is not None:
        def record_boundary(event, layer):
            swap_events.append({
                "event": event, "layer": layer, "resident": sorted(swapper.copies), "bound": sorted(swapper.bound),
                "limit": swapper.resident, "resident_bytes": swapper.resident_bytes,
                "on_copy": layer in swapper.copies and all(
                    p.data.data_ptr() == c.data_ptr() for p, c in zip(swapper.params[layer], swapper.copies[layer]))})

        swapper.boundary_hooks.append(record_boundary)
    counter = comm_stats.install()
    iterations, losses, syncs, history, learning_rates = [], [], [], [], []
    if layerwise:
        report = mode.sync.report_sync

        def record_sync(iteration, records):  # every sync, including A-EDiT's final one outside any iteration
            syncs.append({"iteration": iteration, "entered": layerwise.armed_at,
                          "anchor_checksum": sum(u.anchor.double().sum().item() for u in layerwise.units),
                          "anchors": [u.anchor.cpu().clone() for u in layerwise.units],
                          "records": [dataclasses.asdict(r) for r in records]})
            report(iteration, records)

        mode.sync.report_sync = record_sync
    for plan in trainer.plans():
        before, events_before = counter.snapshot(), len(trace)
        loss_sums = trainer.train_step(plan).loss_sums
        after = counter.snapshot()
        losses.append(trainer.mean_loss(loss_sums))
        learning_rates.append(sorted({group["lr"] for group in trainer.optimizer.param_groups}))
        iterations.append({"bytes": {k: after[k] - before[k] for k in after}, "trace": trace[events_before:]})
        if args.dump_param_history:
            history.append(named_params(model))
    if args.save:
        save_checkpoint(trainer, trainer.start_iteration + len(losses))
    dump = {
        "rank": dist.get_rank(),
        "params": named_params(model),
        "param_history": history,
        "iterations": iterations,
        "losses": losses,
        "learning_rates": learning_rates,  # of each parameter group, as the step left them (for the next step)
        "swap_events": swap_events,
        "swap_layer_bytes": swapper.layer_bytes if swapper is not None else [],
        "syncs": syncs,
        "replica": mode.groups.replica_index if hasattr(mode, "groups") else 0,
        "tensor_rank": parallel_state.get_tensor_model_parallel_rank(),
        "tensor_parallel": {global_parameter_name(n, model) for n, p in model.named_parameters()
                            if getattr(p, "tensor_model_parallel", False)},
    }
    if layerwise:
        units = layerwise.units
        names = {id(p): n for n, p in model.named_parameters()}
        dump["units"] = [{"name": u.name, "numel": u.numel, "shard_numel": u.shard_numel,
                          "params": [global_parameter_name(names[id(p)], model) for p in u.params],
                          "anchor": u.anchor.cpu().clone(),
                          "anchor_device": str(u.anchor.device), "momentum_device": str(u.momentum.device)}
                         for u in units]
    def nbytes(tensor):
        return 0 if tensor is None else tensor.numel() * tensor.element_size()

    dump["ddp_buckets"] = [{"grad_bytes": nbytes(b.grad_data), "param_bytes": nbytes(b.param_data)}
                           for chunk in trainer.model for buffer in chunk.buffers + chunk.expert_parallel_buffers
                           for b in buffer.buckets]
    dump["group_timeouts"] = group_timeouts(mode)
    if hasattr(mode, "outer_state_numel"):
        dump["outer_state_numel"] = mode.outer_state_numel()
    torch.save(dump, os.path.join(args.dump_dir, f"rank{dist.get_rank()}.pt"))
    destroy()


if __name__ == "__main__":
    main()
