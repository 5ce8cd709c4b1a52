"""Data-parallel modes: how replicas of the model agree with each other.

Each `--dp-mode` is one class with the hooks the train loop calls (base.py); the loop never branches on
the mode's name. `ddp` reduces gradients over all replicas every step; the local-SGD modes reduce them
inside a replica and synchronize replicas only periodically.
"""
from megatron_edit.dp.base import DataParallelMode
from megatron_edit.dp.ddp import SynchronousDataParallel
from megatron_edit.dp.diloco import DiLoCoDataParallel
from megatron_edit.dp.edit import AsyncEditDataParallel, EditDataParallel
from megatron_edit.dp.post_local_sgd import PostLocalSGDDataParallel

DP_MODES = {
    "ddp": SynchronousDataParallel,
    "edit": EditDataParallel,
    "aedit": AsyncEditDataParallel,
    "diloco": DiLoCoDataParallel,
    "post-local-sgd": PostLocalSGDDataParallel,
}
LOCAL_SGD_MODES = {"edit", "aedit", "diloco", "post-local-sgd"}
PSEUDO_GRADIENT_MODES = {"edit", "aedit", "diloco"}  # the modes --inject-fault scale|nan can corrupt
PENALTY_MODES = {"edit", "aedit"}


def build_dp_mode(args, ddp_config, transformer_config) -> DataParallelMode:
    return DP_MODES[args.dp_mode].from_args(args, ddp_config, transformer_config)


__all__ = ["DP_MODES", "LOCAL_SGD_MODES", "PENALTY_MODES", "PSEUDO_GRADIENT_MODES", "DataParallelMode", "build_dp_mode"]
