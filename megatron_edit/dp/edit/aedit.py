"""`--dp-mode aedit`: A-EDiT, EDiT with a wall-clock sync trigger, so stragglers don't stall anyone.

A replica syncs at its first iteration that starts once `--aedit-sync-seconds` (tau) have passed since its last
sync; fast replicas take more local steps, slow ones fewer, nobody waits for a step count. Ranks of a replica
agree through a one-flag all-reduce in the shard group at each iteration; replicas meet in the sync itself
(they leave it together, so their clocks restart together). The first collective of every sync carries a stop
flag over the sync group: once a replica has run --train-iters iterations it syncs at once with the flag set,
and everyone ends after that final sync (outside a forward), holding the same parameters.
"""
import time

import torch
import torch.distributed as dist

from megatron_edit.dp.edit.mode import EditDataParallel


class AsyncEditDataParallel(EditDataParallel):
    name = "aedit"

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        mode = super().from_args(args, ddp_config, transformer_config)
        mode.sync_seconds, mode.step_weight = args.aedit_sync_seconds, args.aedit_step_weight
        mode.last_sync_time = None  # the clock starts with the first iteration, not while the model is built
        return mode

    def begin_iteration(self, iteration: int, finished: bool) -> bool:
        if self.last_sync_time is None:
            self.last_sync_time = time.monotonic()
        return super().begin_iteration(iteration, finished)

    def after_optimizer_step(self, iteration: int) -> None:
        synced = self.sync.armed
        super().after_optimizer_step(iteration)
        if synced or iteration == self.local_sgd.warmup_iters:
            self.last_sync_time = time.monotonic()

    def sync_due(self, iteration: int, finished: bool) -> bool:
        due = torch.tensor([float(finished or time.monotonic() - self.last_sync_time >= self.sync_seconds)])
        dist.all_reduce(due, op=dist.ReduceOp.MAX, group=self.groups.shard)
        return bool(due.item())

    def _start_sync(self, iteration: int, finished: bool) -> bool:
        """Every sync opens with the stop flag: if any replica has run --train-iters, all sync now and end."""
        stop = torch.tensor([float(finished)])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.groups.sync)
        if stop.item():
            self.sync.sync_now(iteration)
            self._report_sync(iteration)
            return False
        return super()._start_sync(iteration, finished)
