"""The torch_dist checkpoint format (`--ckpt-format torch_dist`): megatron-core's dist_checkpointing, in Megatron-LM's
layout, so that a checkpoint reshards across TP/PP/DP at load.

One state dict for all ranks, with Megatron-LM's top-level keys: `args`, `checkpoint_version` (3.0), `iteration`,
`model` (`model0`, `model1`, ... with virtual pipeline chunks), `optimizer`, `opt_param_scheduler`, `rng_state`,
and ours under `megatron_edit`: the evaluations run so far (common to all ranks), the data-parallel mode's state
that reshards, and each rank's remaining mode state (a per-rank object: it loads on the layout it was saved on).
dist_checkpointing writes the tensors once (replicas skip), `common.pt` from rank 0, and its own `metadata.json`.

What reshards: the model weights, always; the optimizer, saved in the distributed optimizer's `fully_reshardable`
format (its state gathered on each replica's first rank at save, every rank reading what it needs at load) or per
parameter without it, so Adam's moments and fp32 main parameters follow the weights to any TP/PP/DP layout.
Local-SGD modes (edit, diloco, post-local-sgd) save every replica's model and optimizer, and their outer state in
model space (dp/local_sgd/sharded_state.py), so they also change shard group and replica count at resume; what
stays with the layout is error feedback's residuals (dropped, with a warning) and delayed outer steps in flight
(such a checkpoint resumes on its own layout only). RNG states load only on the layout they were saved on.
A-EDiT's replicas stand at different iterations: it keeps --ckpt-format torch.
"""
import re
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_edit.dp.local_sgd.sharded_state import entries_by_parameter
from megatron_edit.errors import UsageError
from megatron_edit.lr_schedule import load_scheduler_state
from megatron_edit.model import unwrap_model
from megatron_edit.platform import checkpoint_writer, torch_adam_fixes
from megatron_edit.rng_state import rng_state, set_rng_state
from megatron_edit.safe_load import check_dcp_metadata

CHECKPOINT_VERSION = 3.0
# How megatron-core builds our sharded state dicts (kept in the checkpoint, used again to load it; one without it,
# Megatron-LM's, was built with megatron-core's defaults).
CONTENT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
                    "singleton_local_shards": False}


def _layout() -> tuple:
    return (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_data_parallel_world_size())


def _coordinates() -> tuple:
    return (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_data_parallel_rank())


def _model_states(trainer, metadata: dict) -> dict:
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
                       rng: bool = True, progress: bool = True, saved_replicas: Optional[int] = None) -> dict:
    """The checkpoint filed under iteration `label`; `rank_iteration` is this rank's own (A-EDiT's replicas differ).
    optimizer: the inner optimizer and LR schedule; progress: evaluations and the data-parallel mode's state;
    saved_replicas: the model replicas of the checkpoint being loaded (a local-SGD mode keys each replica's model
    apart, dp/local_sgd/sharded_state.py)."""
    metadata = CONTENT_METADATA if metadata is None else metadata
    mode = trainer.dp_mode
    saved_replicas = trainer.args.num_model_replicas if saved_replicas is None else saved_replicas
    models = _model_states(trainer, metadata)
    state = {"args": trainer.args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": label,
             "content_metadata": metadata,
             **{key: mode.checkpoint_model_state(model, saved_replicas) for key, model in models.items()}}
    if optimizer:
        state["optimizer"] = trainer.optimizer.sharded_state_dict(state, is_loading=loading, metadata=metadata)
        state["opt_param_scheduler"] = trainer.scheduler.state_dict()
    if rng and same_layout:
        state["rng_state"] = _rng_object()
    if progress:
        state["megatron_edit"] = {"evaluations": trainer.evaluations,
                                  "dp_mode": mode.sharded_state_dict(entries_by_parameter(list(models.values())),
                                                                     saved_replicas, loading)}
        if same_layout:
            state["megatron_edit"]["rank_state"] = _rank_object(
                {"iteration": label if rank_iteration is None else rank_iteration,
                 "dp_mode": mode.layout_state_dict()})
        if not loading:
            in_flight = torch.tensor([mode.outer_steps_in_flight()])
            dist.all_reduce(in_flight)
            state["megatron_edit"]["outer_steps_in_flight"] = int(in_flight)
    return state


def save(trainer, label: int, rank_iteration: int, directory: str) -> None:
    """Every rank takes part; `directory` exists and is empty."""
    checkpoint_writer.tie_writer_to_this_process()
    args = trainer.args
    state = sharded_state_dict(trainer, label, loading=False, rank_iteration=rank_iteration,
                               optimizer=not args.no_save_optim, rng=not args.no_save_rng)
    try:
        dist_checkpointing.save(state, directory)
    except CheckpointException as exc:  # every rank gets it; the coordinator with each failed rank's error
        error = _write_error(exc)
        if error is None and exc.failures:
            raise
        raise (error or OSError("the coordinating rank reports a failed write")) from exc


_ERRNO = re.compile(r"\[Errno (\d+)\] ([^\n]*)")


def _write_error(exc: CheckpointException) -> Optional[OSError]:
    """The OSError a rank's writer met (a full disk), from megatron-core's report: its write worker passes the error
    on as text."""
    for failure, _ in exc.failures.values():
        found = _ERRNO.search(str(failure))
        if found:
            return OSError(int(found.group(1)), found.group(2))
    return None


def load(trainer, directory: str, parts) -> Tuple[int, bool]:
    """Restore this rank from a torch_dist checkpoint, ours or Megatron-LM's, the `parts` (checkpointing.LoadParts)
    asked for; returns the iteration to continue from and whether the data-parallel mode's state came back (it
    does not with --finetune, from Megatron-LM, or from another --dp-mode: the mode then starts from the weights)."""
    check_dcp_metadata(directory)
    common = dist_checkpointing.load_common_state_dict(directory)
    if parts.optimizer:
        torch_adam_fixes.prepare_to_load(trainer.optimizer)
    saved = common["args"]
    ours = "megatron_edit" in common
    same_layout = _saved_layout(saved) == _saved_layout(trainer.args)
    mode_state = parts.progress and ours and getattr(saved, "dp_mode", "ddp") == trainer.args.dp_mode
    if mode_state and not same_layout:
        _check_reshardable(common, saved)
    template = sharded_state_dict(trainer, common["iteration"], loading=True, same_layout=same_layout,
                                  metadata=common.get("content_metadata", {}), optimizer=parts.optimizer,
                                  rng=parts.rng, progress=mode_state,
                                  saved_replicas=getattr(saved, "num_model_replicas", 1))
    state = dist_checkpointing.load(template, directory, strict=trainer.args.dist_ckpt_strictness)
    for key, chunk in zip(_model_state_keys(trainer), trainer.model):
        unwrap_model(chunk).load_state_dict(state[key])
    if parts.optimizer:
        trainer.optimizer.load_state_dict(state["optimizer"])
        torch_adam_fixes.after_load(trainer.optimizer)
        _load_schedule(trainer.scheduler, state["opt_param_scheduler"], ours, common["iteration"])
    if "rng_state" in state:
        set_rng_state(state["rng_state"][parallel_state.get_data_parallel_rank()])
    if not parts.progress:
        return 0, False
    if not mode_state:
        if ours:
            trainer.evaluations = common["megatron_edit"]["evaluations"]
        return common["iteration"], False
    trainer.evaluations = state["megatron_edit"]["evaluations"]
    trainer.dp_mode.load_sharded_state_dict(state["megatron_edit"]["dp_mode"])
    if not same_layout:
        return state["iteration"], True
    rank_state = state["megatron_edit"]["rank_state"]
    trainer.dp_mode.load_layout_state_dict(rank_state["dp_mode"])
    return rank_state["iteration"], True


def _load_schedule(scheduler, schedule: dict, ours: bool, iteration: int) -> None:
    """Our checkpoint's schedule as saved; Megatron-LM's only as a position: this run's flags give the curve (what
    Megatron-LM's --override-opt_param-scheduler does), at the sample count the checkpoint reached."""
    if ours:
        load_scheduler_state(scheduler, schedule, iteration)
    else:
        scheduler.step(increment=schedule["num_steps"])


def _saved_layout(args) -> tuple:
    """What the per-rank part of a checkpoint depends on: TP, PP, DP and the local-SGD shard group."""
    return (args.pipeline_model_parallel_size, args.tensor_model_parallel_size, args.data_parallel_size,
            getattr(args, "model_shard_group_size", None))


def _check_reshardable(common: dict, saved) -> None:
    """A checkpoint resumed on another layout leaves its per-rank state behind: refuse it where that loses a
    step, warn where it loses error-feedback residuals (a quantization step of each module, carried no further)."""
    in_flight = common["megatron_edit"].get("outer_steps_in_flight", 0)
    if in_flight:
        raise UsageError(f"checkpoint {common['iteration']} holds {in_flight} delayed outer steps in flight "
                         "(--sync-delay-steps), which resume only on the TP/PP/DP/shard-group layout they were saved "
                         "on: resume there, or take a checkpoint where none is in flight")
    if getattr(saved, "sync_error_feedback", False) and dist.get_rank() == 0:
        print("WARNING: the layout changed: error-feedback residuals start again from zero", file=sys.stderr,
              flush=True)


def _model_state_keys(trainer) -> list:
    return ["model"] if len(trainer.model) == 1 else [f"model{i}" for i in range(len(trainer.model))]
