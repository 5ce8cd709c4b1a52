"""What every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD) does the same way.

M replicas, each sharded over a shard group of ranks (DDP and the optimizer see only that group), linked by
the sync group (edit/groups.py). Warm-up (iterations <= W) is synchronous data parallelism over all replicas:
DDP reduces gradients in the shard group and `finalize_model_grads` then averages this rank's gradient shard
over the sync group (megatron-core's distributed-optimizer-instance scheme). After warm-up gradients stay
inside the replica; how and when replicas meet is the subclass's business.
"""
import collections
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from megatron_edit.dp import comm_stats
from megatron_edit.dp.ddp import SynchronousDataParallel
from megatron_edit.dp.edit.config import LocalSGDConfig
from megatron_edit.dp.edit.groups import EditGroups
from megatron_edit.dp.faults import FaultInjector, random_token_batches


class LocalSGDDataParallel(SynchronousDataParallel):
    """Synchronous data parallelism inside each replica (DDP and the optimizer on the replica's groups)."""
    name = ""

    def __init__(self, ddp_config, transformer_config, local_sgd: LocalSGDConfig, groups: EditGroups,
                 faults: FaultInjector):
        super().__init__(ddp_config, transformer_config, faults)
        self.local_sgd, self.groups = local_sgd, groups
        self.pg_collection = groups.replica_process_groups()  # DDP and the optimizer see one replica
        self.counter = comm_stats.install()
        self.counter.name_group(groups.shard, "shard")
        self.counter.name_group(groups.sync, "sync")
        self.in_warmup = local_sgd.warmup_iters > 0
        self.sync_seconds = 0.0  # training time spent in blocking syncs, in all
        self._bytes_at_log, self._exposed_at_log = self.counter.snapshot(), 0.0
        self._iterations_since_log = 0
        self._events: List[tuple] = []

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        groups = EditGroups.from_parallel_state()
        replica = 0 if groups.sync is None else dist.get_rank(groups.sync)
        return cls(ddp_config, transformer_config, LocalSGDConfig.from_args(args), groups,
                   FaultInjector.from_args(args, replica))

    @property
    def has_peers(self) -> bool:
        """A single replica has no one to synchronize with: it trains exactly like plain data parallelism."""
        return self.groups.sync is not None

    def begin_iteration(self, iteration: int, finished: bool) -> bool:
        self.in_warmup = self.local_sgd.is_warmup(iteration)
        return super().begin_iteration(iteration, finished)

    def finalize_model_grads(self, model, num_tokens=None, **_):
        finalize_model_grads(model, num_tokens, pg_collection=self.pg_collection)
        if self.in_warmup and self.has_peers:
            self._average_gradients_over_replicas(model)

    @torch.no_grad()
    def _average_gradients_over_replicas(self, model) -> None:
        """Warm-up: each rank averages, over the sync group, the gradient shard its optimizer reads."""
        shard_rank, shard_size = dist.get_rank(self.groups.shard), self.groups.shard_size
        for chunk in model:
            for buffer in chunk.buffers:
                for bucket in buffer.buckets:
                    grads = bucket.grad_data
                    if self.ddp_config.use_distributed_optimizer:
                        size = grads.numel() // shard_size
                        grads = grads[shard_rank * size:(shard_rank + 1) * size]
                    dist.all_reduce(grads, group=self.groups.sync)
                    grads.div_(self.groups.num_replicas)

    def after_optimizer_step(self, iteration: int) -> None:
        self._iterations_since_log += 1
        super().after_optimizer_step(iteration)

    def loss_group(self):
        return self.groups.shard

    def wrap_train_batches(self, batches, args):
        start = self.faults.bad_data_from()
        if start is None:
            return batches
        return random_token_batches(batches, start, args.num_microbatches, args.padded_vocab_size, args.seed)

    def pop_events(self):
        events, self._events = self._events, []
        return events

    def exposed_sync_seconds(self) -> float:
        """Training time spent waiting on syncs so far, in all (a mode that overlaps syncs says how much it waited)."""
        return self.sync_seconds

    def metrics(self) -> Dict[str, float]:
        """Per iteration since the last log line: bytes on each group and exposed sync time."""
        now = self.counter.snapshot()
        steps = max(self._iterations_since_log, 1)
        sent = collections.Counter(now)
        sent.subtract(self._bytes_at_log)
        exposed = self.exposed_sync_seconds()
        values = {
            "shard bytes/iter": sent["shard"] / steps,
            "sync bytes/iter": sent["sync"] / steps,
            "exposed sync ms/iter": 1000 * (exposed - self._exposed_at_log) / steps,
        }
        self._bytes_at_log, self._exposed_at_log, self._iterations_since_log = now, exposed, 0
        return values
