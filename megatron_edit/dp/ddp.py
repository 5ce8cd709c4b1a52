"""Synchronous data parallelism: the baseline every step all-reduces (or reduce-scatters) gradients.

This is megatron-core's DistributedDataParallel over the full data-parallel group, with
megatron-core's optimizer (optionally the distributed optimizer, which shards optimizer state).
"""
from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_edit.dp.base import DataParallelMode
from megatron_edit.errors import require
from megatron_edit.optimizers import describe_sgd_state
from megatron_edit.swap.layers import detached_from_ddp


class SynchronousDataParallel(DataParallelMode):
    """Its own spec (dp/__init__.py): the class is what DP_MODES["ddp"] names."""
    name = "ddp"
    fault_kinds = frozenset({"nan-loss"})
    cross_replica_group = "dp"

    @staticmethod
    def validate(args) -> None:
        """Megatron-LM's checkpoint format unless told; one distributed-optimizer instance over all replicas."""
        args.num_model_replicas = 1
        if args.ckpt_format is None:
            args.ckpt_format = "torch_dist"
        require(args.replica_coordinator == "process-group",
                f"--replica-coordinator torchft: --dp-mode {args.dp_mode} reduces gradients every step, which "
                "separate jobs do not do; use --dp-mode edit, aedit, diloco or post-local-sgd")

    @staticmethod
    def fault_replicas(args) -> int:
        return args.data_parallel_size
    unbucketed_params: List[torch.nn.Parameter] = []  # wrap_model's: gradients outside DDP's buckets

    def __init__(self, ddp_config: DistributedDataParallelConfig, transformer_config, pg_collection=None):
        """pg_collection: megatron-core's own groups when None; the local-SGD engine narrows them to one replica."""
        self.ddp_config = ddp_config
        self.transformer_config = transformer_config
        self.pg_collection = pg_collection

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
