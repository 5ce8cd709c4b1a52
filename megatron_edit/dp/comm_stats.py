"""Payload bytes of torch.distributed collectives, per process group: the numbers behind
"bytes on the wire" in logs, benchmarks and tests.

Installed once per process, it wraps the torch.distributed functions that megatron-core and this
project call (looked up at call time, so megatron-core's calls are counted too). Payload is the
size of the collective's full buffer: the tensor for all-reduce/broadcast/send, the input of a
reduce-scatter, the output of an all-gather; pipeline sends are counted through batch_isend_irecv
(isend itself is left alone: torch.distributed.P2POp checks its identity). Groups are counted under
the names given with `name_group`; megatron-core's model-parallel groups are named by `install`.
Collectives of a one-rank group are not counted: nothing of them leaves the process.
"""
import collections
import functools

import torch.distributed as dist

_PAYLOAD = {
    "all_reduce": lambda tensor, *a, **k: tensor,
    "broadcast": lambda tensor, *a, **k: tensor,
    "reduce_scatter_tensor": lambda output, input, *a, **k: input,
    "all_gather_into_tensor": lambda output_tensor, input_tensor, *a, **k: output_tensor,
}


def _group_of(name, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    position = {"all_reduce": 2, "broadcast": 2, "reduce_scatter_tensor": 3, "all_gather_into_tensor": 2}[name]
    return args[position] if len(args) > position else None


class CommunicationCounter:
    def __init__(self):
        self.bytes = collections.Counter()
        self._names = {}

    def name_group(self, group, name: str) -> None:
        if group is not None:
            self._names[group] = name

    def _record(self, group, nbytes: int) -> None:
        if dist.get_world_size(group) == 1:
            return
        if group is None or group is dist.GroupMember.WORLD:
            key = "world"
        else:
            key = self._names.get(group) or f"ranks{dist.get_process_group_ranks(group)}"
        self.bytes[key] += nbytes

    def snapshot(self) -> collections.Counter:
        return collections.Counter(self.bytes)


COUNTER = CommunicationCounter()


def _counted(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        tensor = _PAYLOAD[name](*args, **kwargs)
        COUNTER._record(_group_of(name, args, kwargs), tensor.numel() * tensor.element_size())
        return function(*args, **kwargs)

    wrapper._counted = True
    return wrapper


def _counted_batch_isend_irecv(function):
    @functools.wraps(function)
    def wrapper(p2p_op_list):
        for op in p2p_op_list:
            if op.op is dist.isend:
                COUNTER._record(op.group, op.tensor.numel() * op.tensor.element_size())
        return function(p2p_op_list)

    wrapper._counted = True
    return wrapper


def _name_megatron_groups() -> None:
    from megatron.core import parallel_state

    getters = {
        "dp": lambda: parallel_state.get_data_parallel_group(with_context_parallel=True),
        "mp": parallel_state.get_model_parallel_group,
        "pp": parallel_state.get_pipeline_model_parallel_group,
        "tp": parallel_state.get_tensor_model_parallel_group,
        "embd": lambda: parallel_state.get_embedding_group(check_initialized=False),
        "pos_embd": lambda: parallel_state.get_position_embedding_group(check_initialized=False),
    }
    for name, getter in getters.items():  # later names win where megatron-core reuses one group
        COUNTER.name_group(getter(), name)


def install() -> CommunicationCounter:
    """Start counting in this process (idempotent); returns the process-wide counter.
    Call it once megatron-core's parallel state exists, so its groups get their names."""
    _name_megatron_groups()
    for name in _PAYLOAD:
        function = getattr(dist, name)
        if not getattr(function, "_counted", False):
            setattr(dist, name, _counted(name, function))
    if not getattr(dist.batch_isend_irecv, "_counted", False):
        dist.batch_isend_irecv = _counted_batch_isend_irecv(dist.batch_isend_irecv)
    return COUNTER
