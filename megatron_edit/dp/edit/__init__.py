"""EDiT: Local SGD where each replica is sharded over a shard group and synchronized layer by layer.
(What all local-SGD modes share is in ../local_sgd/; fault injection in ../faults.py.)

    penalty.py  anomaly detection, softmax weights, clipping (pure math)
    sync.py     per-module sync at forward pre-hooks, overlapping the next module's all-reduce
    mode.py     the DataParallelMode the train loop drives (step-count trigger)
    aedit.py    A-EDiT: the same with a wall-clock trigger
"""
from megatron_edit.dp.edit.aedit import AsyncEditDataParallel
from megatron_edit.dp.edit.mode import EditDataParallel

__all__ = ["AsyncEditDataParallel", "EditDataParallel"]
