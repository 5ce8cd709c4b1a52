"""Data-parallel modes: how replicas of the model agree with each other.

`DP_MODES` maps each `--dp-mode` to its spec: `validate(args)` checks the mode's flags (one UsageError line each)
and fills in what depends on them; `check_resume(meta, args)` says why a checkpoint cannot continue in this layout;
`fault_kinds` and `fault_replicas(args)` bound fault injection; `cross_replica_group` names the byte counter of the
group linking replicas; `from_args(args, ddp_config, transformer_config)` builds the DataParallelMode the train loop
drives (base.py), once torch.distributed and parallel_state are up. `ddp` is its own spec (ddp.py): gradients are
reduced over all replicas every step. The local-SGD modes are recipes (recipes.py) over one engine
(local_sgd/engine.py): gradients stay inside a replica and replicas synchronize only periodically. Neither the loop
nor the argument checks branch on a mode's name.
"""
from megatron_edit.dp.base import DataParallelMode, StepPlan
from megatron_edit.dp.ddp import SynchronousDataParallel
from megatron_edit.dp.recipes import RECIPES

DP_MODES = {SynchronousDataParallel.name: SynchronousDataParallel, **{recipe.name: recipe for recipe in RECIPES}}


def build_dp_mode(args, ddp_config, transformer_config) -> DataParallelMode:
    return DP_MODES[args.dp_mode].from_args(args, ddp_config, transformer_config)


__all__ = ["DP_MODES", "DataParallelMode", "StepPlan", "build_dp_mode"]
