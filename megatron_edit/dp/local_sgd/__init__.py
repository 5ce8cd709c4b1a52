"""The local-SGD engine and the parts every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD) shares.

    engine.py       LocalSGDDataParallel: the DataParallelMode the train loop drives, composed of the parts below
    validation.py   the shared flags, checked against what a recipe can do; the defaults filled in
    config.py       LocalSGDConfig (H, W, the outer optimizer, codecs), built once from the flags; recipes' defaults
    schedule.py     when to sync: warm-up, H, ramps, fragments (pure), the step-count trigger
    warmup.py       the warm-up's gradient average over the replicas
    whole_model.py  the whole-model synchronizer (Post-Local-SGD's average, DiLoCo's outer step)
    exchange.py     the sync's sum: fp32/bf16/intN/topk codecs over a transport
    meeting.py      who meets at a sync (the launch's replicas or torchft's quorum), commit
    members.py      the small gather of the replicas' norms and flags
    torchft_replicas.py   replicas as separate jobs: torchft's quorum as the sync group, step watchdog
    groups.py       shard group x sync group (and the replica and tensor groups), from megatron-core's parallel state
    params.py       parameters seen as flat fp32 vectors; a module's shard with its anchor and momentum
    outer.py        the outer (Nesterov) SGD step (pure math)
    inner_lr.py     the inner LR's scale during local steps
    progress.py     the step counters the parts share
    reports.py      bytes, exposed sync time and sync events
    sharded_state.py      per-replica checkpoint entries
"""
