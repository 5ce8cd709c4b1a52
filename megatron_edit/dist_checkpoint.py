"""The torch_dist checkpoint format (`--ckpt-format torch_dist`): megatron-core's dist_checkpointing, in Megatron-LM's
layout, so that a checkpoint reshards across TP/PP/DP at load.

One state dict for all ranks, with Megatron-LM's top-level keys: `args`, `checkpoint_version` (3.0), `iteration`,
`model` (`model0`, `model1`, ... with virtual pipeline chunks), `optimizer`, `opt_param_scheduler`, `rng_state`,
and ours under `megatron_edit`: the evaluations run so far (common to all ranks) and each rank's data-parallel mode
state (a per-rank object: it loads on the layout it was saved on). dist_checkpointing writes the tensors once
(replicas skip), `common.pt` from rank 0, and its own `metadata.json`.

What reshards: the model weights, always; the optimizer, saved in the distributed optimizer's `fully_reshardable`
format (its state gathered on each replica's first rank at save, every rank reading what it needs at load) or per
parameter without it, so Adam's moments and fp32 main parameters follow the weights to any TP/PP/DP layout.
RNG states load only on the (TP, PP, DP) layout they were saved on.
"""
from typing import Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_edit.model import unwrap_model
from megatron_edit.platform import torch_adam_fixes
from megatron_edit.rng_state import rng_state, set_rng_state

CHECKPOINT_VERSION = 3.0
# How megatron-core builds the sharded state dicts (kept in the checkpoint, used again to load it).
CONTENT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
                    "singleton_local_shards": False}


def _layout() -> tuple:
    return (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size())


def _coordinates() -> tuple:
    return (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())


def _model_state(trainer, metadata: dict) -> dict:
    return {key: unwrap_model(chunk).sharded_state_dict(metadata=metadata)
            for key, chunk in zip(_model_state_keys(trainer), trainer.model)}


def _rng_object() -> ShardedObject:
    """Every data-parallel rank's RNG states in one list per (PP, TP) rank, as Megatron-LM keeps them."""
    states = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(states, rng_state(), group=parallel_state.get_data_parallel_group())
    pp, tp, dp = _coordinates()
    pp_size, tp_size, _ = _layout()
    return ShardedObject("rng_state", states, (pp_size, tp_size), (pp, tp), replica_id=dp)


def _rank_object(value) -> ShardedObject:
    """A value of this rank's own (its data-parallel mode's state): loads only on the same layout."""
    return ShardedObject("megatron_edit.rank_state", value, _layout(), _coordinates(), replica_id=0)


def sharded_state_dict(trainer, label: int, loading: bool, rank_iteration: Optional[int] = None,
                       same_layout: bool = True, metadata: Optional[dict] = None, optimizer: bool = True,
                       rng: bool = True, progress: bool = True) -> dict:
    """The checkpoint filed under iteration `label`; `rank_iteration` is this rank's own (A-EDiT's replicas differ).
    optimizer: the inner optimizer and LR schedule; progress: evaluations and each rank's data-parallel mode state."""
    metadata = CONTENT_METADATA if metadata is None else metadata
    state = {"args": trainer.args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": label,
             "content_metadata": metadata, **_model_state(trainer, metadata)}
    if optimizer:
        state["optimizer"] = trainer.optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
        state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    if rng and same_layout:
        state["rng_state"] = _rng_object()
    if progress:
        state["megatron_edit"] = {"evaluations": trainer.evaluations}
        if same_layout:
            state["megatron_edit"]["rank_state"] = _rank_object(
                {"iteration": label if rank_iteration is None else rank_iteration,
                 "dp_mode": trainer.dp_mode.state_dict()})
    return state


def save(trainer, label: int, rank_iteration: int, directory: str) -> None:
    """Every rank takes part; `directory` exists and is empty."""
    args = trainer.args
    state = sharded_state_dict(trainer, label, loading=False, rank_iteration=rank_iteration,
                               optimizer=not args.no_save_optim, rng=not args.no_save_rng)
    dist_checkpointing.save(state, directory)


def load(trainer, directory: str, parts) -> int:
    """Restore this rank from a torch_dist checkpoint, the `parts` (checkpointing.LoadParts) asked for; returns the
    iteration to continue from."""
    common = dist_checkpointing.load_common_state_dict(directory)
    if parts.optimizer:
        torch_adam_fixes.prepare_to_load(trainer.optimizer)
    saved = common["args"]
    same_layout = (saved.pipeline_model_parallel_size, saved.tensor_model_parallel_size,
                   saved.data_parallel_size) == _layout()
    template = sharded_state_dict(trainer, common["iteration"], loading=True, same_layout=same_layout,
                                  metadata=common.get("content_metadata", CONTENT_METADATA),
                                  optimizer=parts.optimizer, rng=parts.rng, progress=parts.progress)
    state = dist_checkpointing.load(template, directory)
    for key, chunk in zip(_model_state_keys(trainer), trainer.model):
        unwrap_model(chunk).load_state_dict(state[key])
    if parts.optimizer:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["opt_param_scheduler"])
    if "rng_state" in state:
        set_rng_state(state["rng_state"][parallel_state.get_data_parallel_rank()])
    if not parts.progress:
        return 0
    trainer.evaluations = state["megatron_edit"]["evaluations"]
    if not same_layout:
        return state["iteration"]
    rank_state = state["megatron_edit"]["rank_state"]
    trainer.dp_mode.load_state_dict(rank_state["dp_mode"], same_replica=True)
    return rank_state["iteration"]


def _model_state_keys(trainer) -> list:
    return ["model"] if len(trainer.model) == 1 else [f"model{i}" for i in range(len(trainer.model))]
