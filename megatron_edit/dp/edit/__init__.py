"""EDiT's parts of the local-SGD engine: Local SGD where each replica is sharded over a shard group and synchronized
layer by layer. (The engine and what all local-SGD modes share are in ../local_sgd/; the recipes in ../recipes.py.)

    penalty.py      anomaly detection, softmax weights, clipping (pure math)
    fragments.py    staggered fragments: which modules sync at which offset of the H
    sync.py         per-module sync at forward pre-hooks, overlapping the next module's all-reduce
    module_sync.py  the synchronizer the engine drives: arming syncs, the final sync, reports, its state
    aedit.py        A-EDiT's wall-clock trigger
"""
