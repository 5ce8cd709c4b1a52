"""`--dp-mode edit`: Local SGD with sharded, layer-wise synchronization (EDiT, arXiv 2412.07210).

Warm-up (iterations <= W): synchronous data parallelism over all replicas. DDP reduces gradients in the
shard group; `finalize_model_grads` then averages this rank's gradient shard over the sync group
(megatron-core's distributed-optimizer-instance scheme).
Local steps: gradients stay inside the shard group; nothing crosses the sync group.
Sync iterations (every H local steps): LayerwiseSync updates each module just before its forward.
"""
import collections
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer

from megatron_edit.dp import comm_stats
from megatron_edit.dp.base import DataParallelMode
from megatron_edit.dp.edit.config import LocalSGDConfig
from megatron_edit.dp.edit.groups import EditGroups
from megatron_edit.dp.edit.shards import MainParams, ModuleShard
from megatron_edit.dp.edit.sync import LayerwiseSync


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def sync_modules(model: torch.nn.Module) -> List[tuple]:
    """(name, module) of every module EDiT synchronizes on this pipeline stage, in forward order."""
    candidates = []
    if model.pre_process:
        candidates.append(("embedding", model.embedding))
    for layer in model.decoder.layers:
        candidates.append((f"decoder.layers.{layer.layer_number - 1}", layer))
    if model.post_process:
        candidates += [("decoder.final_layernorm", model.decoder.final_layernorm), ("output_layer", model.output_layer)]
    units = [(name, module) for name, module in candidates
             if module is not None and any(p.requires_grad for p in module.parameters())]
    covered = {id(p) for _, module in units for p in module.parameters()}
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise RuntimeError(f"EDiT would leave parameters unsynchronized: {missed}")
    return units


class EditDataParallel(DataParallelMode):
    name = "edit"

    def __init__(self, ddp_config, transformer_config, local_sgd: LocalSGDConfig, groups: EditGroups):
        self.ddp_config, self.transformer_config = ddp_config, transformer_config
        self.local_sgd, self.groups = local_sgd, groups
        self.replica_groups = groups.replica_process_groups()
        self.counter = comm_stats.install()
        self.counter.name_group(groups.shard, "shard")
        self.counter.name_group(groups.sync, "sync")
        self.model, self.sync = None, None
        self.in_warmup = local_sgd.warmup_iters > 0
        self._bytes_at_log = self.counter.snapshot()
        self._iterations_since_log = 0

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        return cls(ddp_config, transformer_config, LocalSGDConfig.from_args(args), EditGroups.from_parallel_state())

    def wrap_model(self, model_chunks):
        self.model = [
            DistributedDataParallel(config=self.transformer_config, ddp_config=self.ddp_config, module=chunk,
                                    disable_bucketing=index > 0, pg_collection=self.replica_groups)
            for index, chunk in enumerate(model_chunks)
        ]
        return self.model

    def build_optimizer(self, model_chunks, optimizer_config):
        # Gloo side groups only serve megatron's own checkpoint format; with explicit groups megatron refuses them.
        optimizer = get_megatron_optimizer(optimizer_config, model_chunks, use_gloo_process_groups=False,
                                           pg_collection=self.replica_groups)
        main_params = MainParams(optimizer)
        shard_rank = dist.get_rank(self.groups.shard)
        units, modules = [], []
        for chunk in model_chunks:
            for name, module in sync_modules(_unwrap(chunk)):
                params = [p for p in module.parameters() if p.requires_grad]
                units.append(ModuleShard(name, params, shard_rank, self.groups.shard_size, main_params,
                                         self.local_sgd.offload_outer_state))
                modules.append(module)
        self.sync = LayerwiseSync(units, modules, self.groups, self.local_sgd)
        if self.local_sgd.warmup_iters == 0:
            self.sync.initialize_anchors()
        return optimizer

    def finalize_model_grads(self, model, num_tokens=None, **_):
        finalize_model_grads(model, num_tokens, pg_collection=self.replica_groups)
        if self.in_warmup and self.groups.sync is not None:
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

    def loss_group(self):
        return self.groups.shard

    def start_iteration(self, iteration: int) -> None:
        self.in_warmup = self.local_sgd.is_warmup(iteration)
        # A single replica has no one to synchronize with: it trains exactly like plain data parallelism.
        if self.local_sgd.is_sync_iteration(iteration) and self.groups.sync is not None:
            self.sync.arm()

    def after_optimizer_step(self, iteration: int) -> None:
        self.sync.disarm()
        if iteration == self.local_sgd.warmup_iters:
            self.sync.initialize_anchors()
        self._iterations_since_log += 1

    def outer_state_numel(self) -> int:
        return sum(unit.outer_state_numel() for unit in self.sync.units)

    def metrics(self) -> Dict[str, str]:
        """Per iteration since the last log line: bytes on each group, exposed sync time, pseudo-gradient norms."""
        now = self.counter.snapshot()
        steps = max(self._iterations_since_log, 1)
        sent = collections.Counter(now)
        sent.subtract(self._bytes_at_log)
        values = {
            "shard bytes/iter": f"{sent['shard'] / steps:.3e}",
            "sync bytes/iter": f"{sent['sync'] / steps:.3e}",
            "exposed sync ms/iter": f"{1000 * self.sync.exposed_seconds / steps:.1f}",
        }
        norms = self.sync.pseudo_grad_norms
        if norms:
            values["pseudo-grad norm mean/max"] = f"{sum(norms) / len(norms):.3e}/{max(norms):.3e}"
        self._bytes_at_log, self._iterations_since_log = now, 0
        self.sync.exposed_seconds, self.sync.pseudo_grad_norms = 0.0, []
        return values
