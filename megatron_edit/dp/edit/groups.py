"""EDiT's two groups over the data-parallel ranks of one (tensor, pipeline) coordinate.

The *shard group* holds one model replica together (consecutive DP ranks, usually one node): gradients
are reduced and optimizer state sharded inside it every step. The *sync group* links the ranks that hold
the same shard in every replica (usually across nodes) and carries only the periodic synchronization.
megatron-core builds exactly this topology for its distributed-optimizer instances
(`initialize_model_parallel(num_distributed_optimizer_instances=M)`), so the groups are taken from there.
"""
import dataclasses
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclasses.dataclass(frozen=True)
class EditGroups:
    shard: dist.ProcessGroup
    sync: Optional[dist.ProcessGroup]  # None when there is a single replica: nothing to synchronize with

    @property
    def shard_size(self) -> int:
        return self.shard.size()

    @property
    def num_replicas(self) -> int:
        return 1 if self.sync is None else self.sync.size()

    @classmethod
    def from_parallel_state(cls) -> "EditGroups":
        shard = parallel_state.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)
        several_replicas = parallel_state.get_data_parallel_world_size(with_context_parallel=True) > shard.size()
        sync = parallel_state.get_inter_distributed_optimizer_instance_group() if several_replicas else None
        return cls(shard=shard, sync=sync)

    def replica_process_groups(self) -> ProcessGroupCollection:
        """megatron-core's groups with data parallelism narrowed to the shard group: DDP and the optimizer
        built on these reduce gradients and shard state inside one replica only."""
        groups = ProcessGroupCollection.use_mpu_process_groups()
        groups.dp = groups.dp_cp = groups.intra_dp_cp = groups.intra_dist_opt = self.shard
        groups.inter_dist_opt = None
        return groups
