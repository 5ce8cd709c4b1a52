"""What every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD) shares.

    config.py   LocalSGDConfig: H, W, the outer optimizer's settings, built once from the flags
    groups.py   shard group x sync group (and the replica and tensor groups), from megatron-core's parallel state
    params.py   parameters seen as flat fp32 vectors; a module's shard with its anchor and momentum
    outer.py    the outer (Nesterov) SGD step (pure math)
    exchange.py the pseudo-gradient sum: fp32/bf16/int8 codecs over a transport
    members.py  who takes part in a sync, and the small gather of the replicas' norms and flags
    torchft_replicas.py   replicas as separate jobs: torchft's quorum as the sync group, step watchdog
    sharded_state.py      per-replica checkpoint entries
    mode.py     LocalSGDDataParallel: warm-up, local steps, the final sync, consensus views, joining
"""
from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.mode import LocalSGDDataParallel

__all__ = ["LocalSGDConfig", "LocalSGDDataParallel", "LocalSGDGroups"]
