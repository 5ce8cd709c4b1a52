"""`--dp-mode post-local-sgd`: Post-Local-SGD (Lin et al., arXiv 1808.07217), a baseline for EDiT.

Synchronous data parallelism for W iterations, then local steps; at the end of every H-th local step the
replicas' parameters are averaged over the sync group, the whole model at once, with nothing overlapping it
and no outer optimizer. DiLoCo (diloco.py) keeps this schedule and replaces the average by an outer step.
"""
import time
from typing import Dict

import torch.distributed as dist

from megatron_edit.dp.edit.shards import FlatParams, MainParams
from megatron_edit.dp.local_sgd import LocalSGDDataParallel
from megatron_edit.logging import print_rank_last


class PostLocalSGDDataParallel(LocalSGDDataParallel):
    name = "post-local-sgd"

    def build_optimizer(self, model_chunks, optimizer_config):
        optimizer = super().build_optimizer(model_chunks, optimizer_config)
        main_params = MainParams(optimizer)
        self.views = [self._whole_model_view(index, [p for p in chunk.parameters() if p.requires_grad], main_params)
                      for index, chunk in enumerate(model_chunks)]
        return optimizer

    def _whole_model_view(self, index: int, params, main_params: MainParams) -> FlatParams:
        return FlatParams(params, main_params)

    def after_optimizer_step(self, iteration: int) -> None:
        if self.has_peers and self.local_sgd.syncs_after(iteration):
            start, bytes_before = time.perf_counter(), self.counter.snapshot().get("sync", 0)
            values = self._synchronize(iteration)
            seconds = time.perf_counter() - start
            self.sync_seconds += seconds
            values.update({"sync/exposed ms": 1000 * seconds,
                           "sync/bytes": float(self.counter.snapshot().get("sync", 0) - bytes_before)})
            self._events.append((iteration, values))
            print_rank_last(f" {self.name} sync at iteration {iteration} |"
                            + "".join(f" {key[5:]}: {value:.4g} |" for key, value in values.items()))
        super().after_optimizer_step(iteration)

    def _synchronize(self, iteration: int) -> Dict[str, float]:
        """theta <- the replicas' mean theta. Returns numbers for the log line and tracker ("sync/..." keys)."""
        for view in self.views:
            theta = view.read_full(self.groups.shard)
            dist.all_reduce(theta, group=self.groups.sync)
            view.write_full(theta.div_(self.groups.num_replicas))
        return {}
