"""What every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD) does the same way.

M replicas, each sharded over a shard group of ranks (DDP and the optimizer see only that group), linked by
the sync group (edit/groups.py). Warm-up (iterations <= W) is synchronous data parallelism over all replicas:
DDP reduces gradients in the shard group and `finalize_model_grads` then averages this rank's gradient shard
over the sync group (megatron-core's distributed-optimizer-instance scheme). After warm-up gradients stay
inside the replica; how and when replicas meet is the subclass's business.
"""
import collections
import time
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer

from megatron_edit.dp import comm_stats
from megatron_edit.dp.base import DataParallelMode
from megatron_edit.dp.edit.config import LocalSGDConfig
from megatron_edit.dp.edit.groups import EditGroups
from megatron_edit.dp.faults import FaultInjector, random_token_batches


class LocalSGDDataParallel(DataParallelMode):
    def __init__(self, ddp_config, transformer_config, local_sgd: LocalSGDConfig, groups: EditGroups,
                 faults: FaultInjector):
        self.ddp_config, self.transformer_config = ddp_config, transformer_config
        self.local_sgd, self.groups, self.faults = local_sgd, groups, faults
        self.replica_groups = groups.replica_process_groups()
        self.counter = comm_stats.install()
        self.counter.name_group(groups.shard, "shard")
        self.counter.name_group(groups.sync, "sync")
        self.in_warmup = local_sgd.warmup_iters > 0
        self.sync_seconds = 0.0  # training time spent in blocking syncs, in all
        self._iteration_start = 0.0
        self._bytes_at_log, self._exposed_at_log = self.counter.snapshot(), 0.0
        self._iterations_since_log = 0
        self._events: List[tuple] = []

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        groups = EditGroups.from_parallel_state()
        replica = 0 if groups.sync is None else dist.get_rank(groups.sync)
        return cls(ddp_config, transformer_config, LocalSGDConfig.from_args(args), groups,
                   FaultInjector.from_args(args, replica))

    def wrap_model(self, model_chunks):
        self.model = [
            DistributedDataParallel(config=self.transformer_config, ddp_config=self.ddp_config, module=chunk,
                                    disable_bucketing=index > 0, pg_collection=self.replica_groups)
            for index, chunk in enumerate(model_chunks)
        ]
        return self.model

    def build_optimizer(self, model_chunks, optimizer_config):
        # Gloo side groups only serve megatron's own checkpoint format; with explicit groups megatron refuses them.
        return get_megatron_optimizer(optimizer_config, model_chunks, use_gloo_process_groups=False,
                                      pg_collection=self.replica_groups)

    @property
    def has_peers(self) -> bool:
        """A single replica has no one to synchronize with: it trains exactly like plain data parallelism."""
        return self.groups.sync is not None

    def begin_iteration(self, iteration: int, finished: bool) -> bool:
        self._iteration_start = time.perf_counter()
        self.in_warmup = self.local_sgd.is_warmup(iteration)
        return not finished

    def finalize_model_grads(self, model, num_tokens=None, **_):
        finalize_model_grads(model, num_tokens, pg_collection=self.replica_groups)
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
        self.faults.straggle(self._iteration_start)

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
