"""A local-SGD mode's state in torch_dist checkpoints (../../dist_checkpoint.py), in forms that reshard.

- Each replica's model, and through its keys the optimizer's state: the first replica's under the model's own keys,
  as Megatron-LM writes them (so `model` is a model Megatron-LM and tools/export_hf.py can read), replica m's under
  `megatron_edit.replica{m}.` + key. A rank reads the replica it continues, m mod the saved count, so a run can
  resume with more or fewer replicas. Within a replica, the ranks of the shard group hold one copy: the
  data-parallel part of each entry's replica id becomes the rank's place in that group.
- Outer vectors kept per module or model chunk as flat fp32 (anchor, momentum, Post-Local-SGD's average), each
  rank's shard or the whole: gathered over the shard group and written in model space, one tensor per parameter
  under `megatron_edit.<name>.` + the parameter's key, with the parameter's own sharding (a tied output layer's as
  the embedding's), so they follow the weights to any TP/PP layout and shard-group size.
"""
import dataclasses
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

from megatron_edit.dp.local_sgd.params import FlatParams


def replica_prefix(replica: int) -> str:
    return "" if replica == 0 else f"megatron_edit.replica{replica}."


def replica_object(replica: int, name: str, value, replica_id) -> ShardedObject:
    """A value that one replica's ranks hold alike; the rank whose `replica_id` is 0 (or all zeros) writes it."""
    return ShardedObject(f"megatron_edit.replica{replica}.{name}", value, (1,), (0,), replica_id=replica_id)


def _within_replica(replica_id, rank_in_replica: int):
    return (*replica_id[:-1], rank_in_replica) if isinstance(replica_id, tuple) else rank_in_replica


def replica_entries(model_state: dict, replica: int, rank_in_replica: int) -> dict:
    """`model_state` (a model chunk's sharded state dict) as replica `replica`'s copy."""
    def rewrite(entry):
        if not isinstance(entry, ShardedBase):
            return entry
        return dataclasses.replace(entry, key=replica_prefix(replica) + entry.key,
                                   replica_id=_within_replica(entry.replica_id, rank_in_replica))
    return dict_list_map_outplace(rewrite, model_state)


def entries_by_parameter(model_states: List[dict]) -> Dict[int, ShardedBase]:
    """id(parameter) -> its sharded entry, from the model chunks' sharded state dicts (built with keep_vars)."""
    return {id(entry.data): entry for state in model_states for entry in nested_values(state)
            if isinstance(entry, ShardedBase) and isinstance(getattr(entry, "data", None), torch.Tensor)}


def model_space_tensors(name: str, view: FlatParams, values: Optional[torch.Tensor], entries: Dict[int, ShardedBase],
                        shard_group: Optional[dist.ProcessGroup] = None) -> list:
    """`view`'s flat vector as one sharded tensor per parameter. `values`: this rank's part of it (the whole
    vector, or its slice of a vector split evenly over `shard_group`); None builds a template to load into."""
    if values is None:
        full = torch.empty(view.padded_numel, dtype=torch.float32)
    elif values.numel() < view.padded_numel:
        full = torch.empty(view.padded_numel, dtype=torch.float32, device=view.device)
        dist.all_gather_into_tensor(full, values.to(view.device), group=shard_group)
        full = full.cpu()
    else:
        full = values.detach().cpu()
    tensors, offset = [], 0
    for param in view.params:
        part = full[offset:offset + param.numel()].view(param.shape).clone()  # a tensor of its own to write
        tensors.append(make_sharded_optimizer_tensor(entries[id(param)], part, f"megatron_edit.{name}"))
        offset += param.numel()
    return tensors


def from_model_space(view: FlatParams, tensors: List[torch.Tensor], owned: slice = slice(None)) -> torch.Tensor:
    """The `owned` part of `view`'s flat vector from the per-parameter tensors loaded (model_space_tensors' order)."""
    flat = torch.zeros(view.padded_numel, dtype=torch.float32)
    flat[:view.numel] = torch.cat([t.reshape(-1).float() for t in tensors])
    return flat[owned]


def vectors_state(vectors: Dict[str, List[torch.Tensor]]) -> dict:
    """Outer vectors by name as host copies: a torch-format checkpoint's, or the state a healing replica takes."""
    return {name: [vector.cpu().clone() for vector in values] for name, values in vectors.items()}


@torch.no_grad()
def load_vectors_state(vectors: Dict[str, List[torch.Tensor]], state: dict) -> None:
    for name, values in vectors.items():
        for vector, saved in zip(values, state[name]):
            vector.copy_(saved)
