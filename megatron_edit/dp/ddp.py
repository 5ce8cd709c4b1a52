"""Synchronous data parallelism: the baseline every step all-reduces (or reduce-scatters) gradients.

This is megatron-core's DistributedDataParallel over the full data-parallel group, with
megatron-core's optimizer (optionally the distributed optimizer, which shards optimizer state).
"""
from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_edit.dp.base import DataParallelMode


class SynchronousDataParallel(DataParallelMode):
    name = "ddp"

    def __init__(self, ddp_config: DistributedDataParallelConfig, transformer_config):
        self.ddp_config = ddp_config
        self.transformer_config = transformer_config

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        return cls(ddp_config, transformer_config)

    def wrap_model(self, model_chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        return [
            DistributedDataParallel(
                config=self.transformer_config,
                ddp_config=self.ddp_config,
                module=chunk,
                # Like Megatron-LM: only the first chunk's buckets overlap with backward.
                disable_bucketing=index > 0,
            )
            for index, chunk in enumerate(model_chunks)
        ]

    def build_optimizer(self, model_chunks, optimizer_config):
        return get_megatron_optimizer(optimizer_config, model_chunks)
