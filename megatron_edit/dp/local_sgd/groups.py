"""The groups a local-SGD mode uses, over the data-parallel ranks of one (tensor, pipeline) coordinate and beyond.

The *shard group* holds one model replica's data-parallel shards together (consecutive DP ranks, usually one
node): gradients are reduced and optimizer state sharded inside it every step. The *sync group* links the ranks
that hold the same shard in every replica (usually across nodes) and carries only the periodic synchronization.
megatron-core builds exactly this topology for its distributed-optimizer instances
(`initialize_model_parallel(num_distributed_optimizer_instances=M)`), so those two are taken from there.
The *replica group* is every rank of one replica (shard x tensor x pipeline): where a replica decides as one
(A-EDiT's clock). The *tensor group* is where a module's tensor-parallel slices meet (the penalty's norms).
The pseudo-gradient exchange runs on a communicator of the sync group's ranks of its own, so that the small
collectives of a sync (the penalty's norms, A-EDiT's flags) never queue behind a bulk exchange still in flight (a
process group runs its collectives in order, on two gloo threads or one NCCL stream). A quantized exchange's second
stage (the all-gather of the summed chunks) has one more, so each rank can start it as soon as its own first stage is
done: ranks get there at different moments, and on a communicator of its own no rank's order of collectives changes.
"""
import dataclasses
import datetime
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclasses.dataclass(frozen=True)
class LocalSGDGroups:
    shard: dist.ProcessGroup
    sync: Optional[dist.ProcessGroup]  # None when there is a single replica: nothing to synchronize with
    replica: Optional[dist.ProcessGroup] = None   # None: the shard group is the whole replica
    tensor: Optional[dist.ProcessGroup] = None    # None: no tensor parallelism
    sync_exchange: Optional[dist.ProcessGroup] = None  # the sync group's ranks for the bulk exchange; None: sync
    sync_gather: Optional[dist.ProcessGroup] = None  # the same ranks again, for the exchange's second stage

    @property
    def shard_size(self) -> int:
        return self.shard.size()

    @property
    def num_replicas(self) -> int:
        return 1 if self.sync is None else self.sync.size()

    @property
    def replica_index(self) -> int:
        """This rank's replica: its position in the sync group."""
        return 0 if self.sync is None else dist.get_rank(self.sync)

    @property
    def exchange(self) -> Optional[dist.ProcessGroup]:
        """Where pseudo-gradients are summed."""
        return self.sync if self.sync_exchange is None else self.sync_exchange

    @property
    def gather(self) -> Optional[dist.ProcessGroup]:
        """Where a quantized exchange all-gathers the summed chunks."""
        return self.exchange if self.sync_gather is None else self.sync_gather

    @property
    def whole_replica(self) -> dist.ProcessGroup:
        return self.shard if self.replica is None else self.replica

    @classmethod
    def from_parallel_state(cls, timeout: datetime.timedelta) -> "LocalSGDGroups":
        """Collective over the world: every rank must call it (it creates the replica groups, whose collectives
        give up after `timeout`, as every other group's do)."""
        shard = parallel_state.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=True)
        several_replicas = parallel_state.get_data_parallel_world_size(with_context_parallel=True) > shard.size()
        sync = parallel_state.get_inter_distributed_optimizer_instance_group() if several_replicas else None
        tensor = parallel_state.get_tensor_model_parallel_group() \
            if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
        replica = None  # the shard group is the whole replica unless tensor or pipeline ranks belong to it too
        if dist.get_world_size() > shard.size() * (1 if sync is None else sync.size()):
            replica = dist.group.WORLD if sync is None else _group_of_ranks_sharing(dist.get_rank(sync), timeout)
        sync_ranks = None if sync is None else tuple(dist.get_process_group_ranks(sync))
        sync_exchange, sync_gather = (None, None) if sync is None else (
            _group_of_ranks_sharing(sync_ranks, timeout), _group_of_ranks_sharing(sync_ranks, timeout))
        return cls(shard=shard, sync=sync, replica=replica, tensor=tensor, sync_exchange=sync_exchange,
                   sync_gather=sync_gather)

    def replica_process_groups(self) -> ProcessGroupCollection:
        """megatron-core's groups with data parallelism narrowed to the shard group: DDP and the optimizer
        built on these reduce gradients and shard state inside one replica only."""
        groups = ProcessGroupCollection.use_mpu_process_groups()
        groups.dp = groups.dp_cp = groups.intra_dp_cp = self.shard
        # The distributed optimizer reduces gradient statistics (the norm for clipping) over this group: the
        # whole replica, tensor and pipeline ranks included, as megatron-core's instance group would be.
        groups.intra_dist_opt = self.whole_replica
        groups.inter_dist_opt = None
        return groups


def _group_of_ranks_sharing(key, timeout: datetime.timedelta) -> dist.ProcessGroup:
    """The group of every rank whose `key` equals this rank's, made collectively (all ranks create all groups)."""
    keys = [None] * dist.get_world_size()
    dist.all_gather_object(keys, key)
    mine = None
    for shared in sorted(set(keys)):
        group = dist.new_group([rank for rank, k in enumerate(keys) if k == shared], timeout=timeout)
        if shared == key:
            mine = group
    return mine
