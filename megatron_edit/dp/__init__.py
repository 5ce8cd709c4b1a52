"""Data-parallel modes: how replicas of the model agree with each other.

Each `--dp-mode` is one class with the hooks the train loop calls and the checks the arguments need (base.py);
neither the loop nor the argument checks branch on the mode's name. `ddp` reduces gradients over all replicas
every step; the local-SGD modes reduce them inside a replica and synchronize replicas only periodically.
"""
from megatron_edit.dp.base import DataParallelMode, StepPlan
from megatron_edit.dp.ddp import SynchronousDataParallel
from megatron_edit.dp.diloco import DiLoCoDataParallel
from megatron_edit.dp.edit import AsyncEditDataParallel, EditDataParallel
from megatron_edit.dp.post_local_sgd import PostLocalSGDDataParallel

DP_MODES = {mode.name: mode for mode in (SynchronousDataParallel, EditDataParallel, AsyncEditDataParallel,
                                         DiLoCoDataParallel, PostLocalSGDDataParallel)}


def build_dp_mode(args, ddp_config, transformer_config) -> DataParallelMode:
    return DP_MODES[args.dp_mode].from_args(args, ddp_config, transformer_config)


__all__ = ["DP_MODES", "DataParallelMode", "StepPlan", "build_dp_mode"]
