"""Data-parallel modes: how replicas of the model agree with each other.

Each `--dp-mode` is one class with the hooks the train loop calls; the loop never branches on
the mode's name. A mode decides which ranks reduce gradients every step (`wrap_model`,
`build_optimizer`) and what happens between optimizer steps (`after_optimizer_step`).
"""
from megatron_edit.dp.base import DataParallelMode
from megatron_edit.dp.ddp import SynchronousDataParallel

DP_MODES = {
    "ddp": SynchronousDataParallel,
}


def build_dp_mode(name: str, **kwargs) -> DataParallelMode:
    return DP_MODES[name](**kwargs)


__all__ = ["DP_MODES", "DataParallelMode", "build_dp_mode"]
