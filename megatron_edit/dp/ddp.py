"""Synchronous data parallelism: the baseline every step all-reduces (or reduce-scatters) gradients.

This is megatron-core's DistributedDataParallel over the full data-parallel group, with
megatron-core's optimizer (optionally the distributed optimizer, which shards optimizer state).
"""
from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_edit.dp.base import DataParallelMode
from megatron_edit.optimizers import describe_sgd_state
from megatron_edit.swap.layers import detached_from_ddp


class SynchronousDataParallel(DataParallelMode):
    name = "ddp"
    pg_collection = None  # megatron-core's own groups; the local-SGD modes narrow data parallelism to one replica
    unbucketed_params: List[torch.nn.Parameter] = []  # wrap_model's: gradients outside DDP's buckets

    def __init__(self, ddp_config: DistributedDataParallelConfig, transformer_config):
        self.ddp_config = ddp_config
        self.transformer_config = transformer_config

    @classmethod
    def check_resume(cls, meta: dict, args):
        if meta["data_parallel_size"] != args.data_parallel_size and args.use_distributed_optimizer:
            return [f"data_parallel_size {meta['data_parallel_size']} vs {args.data_parallel_size} "
                    "(the distributed optimizer's shards cannot be regrouped)"]
        return []

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        return cls(ddp_config, transformer_config)

    def wrap_model(self, model_chunks, unbucketed_params=()):
        self.unbucketed_params = list(unbucketed_params)
        with detached_from_ddp(self.unbucketed_params):
            return [
                DistributedDataParallel(
                    config=self.transformer_config,
                    ddp_config=self.ddp_config,
                    module=chunk,
                    # Like Megatron-LM: only the first chunk's buckets overlap with backward.
                    disable_bucketing=index > 0,
                    pg_collection=self.pg_collection,
                )
                for index, chunk in enumerate(model_chunks)
            ]

    def build_optimizer(self, model_chunks, optimizer_config):
        if self.pg_collection is None:
            optimizer = get_megatron_optimizer(optimizer_config, model_chunks)
        else:
            # Gloo side groups only serve megatron's own checkpoint format; with explicit groups megatron refuses them.
            optimizer = get_megatron_optimizer(optimizer_config, model_chunks, use_gloo_process_groups=False,
                                               pg_collection=self.pg_collection)
        describe_sgd_state(optimizer)
        return optimizer
