"""What every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD) shares.

    config.py   LocalSGDConfig: H, W, the outer optimizer's settings, built once from the flags
    groups.py   shard group x sync group (and the replica and tensor groups), from megatron-core's parallel state
    params.py   parameters seen as flat fp32 vectors; a module's shard with its anchor and momentum
    outer.py    the outer (Nesterov) SGD step (pure math)
    mode.py     LocalSGDDataParallel: warm-up, local steps, the final sync, consensus views
"""
from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.mode import LocalSGDDataParallel

__all__ = ["LocalSGDConfig", "LocalSGDDataParallel", "LocalSGDGroups"]
