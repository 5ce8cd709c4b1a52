"""Bytes each rank sends in torch.distributed collectives, per process group: the numbers behind
"bytes on the wire" in logs, benchmarks and tests.

Installed once per process, it wraps the torch.distributed functions that megatron-core and this
project call, and the copies megatron-core binds at import (`dist_all_gather_func =
torch.distributed.all_gather_into_tensor` in param_and_grad_buffer.py and the tensor-parallel code:
the distributed optimizer's gradient reduce-scatter and parameter all-gather go through those), listed
in `_BOUND_AT_IMPORT`. A collective's bytes are what each of its M ranks sends with a bandwidth-optimal (ring)
algorithm, in terms of its full buffer N (the tensor of an all-reduce/broadcast, the input of a reduce-scatter
or all-to-all, the output of an all-gather; for the list forms, the sum of the list): 2 (M-1)/M N for an
all-reduce, (M-1)/M N for the others. So a reduce-scatter plus an all-gather (the distributed optimizer)
counts what an all-reduce of the same buffer does, and codecs that exchange by all-to-all and all-gather
(local_sgd/exchange.py) compare with an fp32 all-reduce byte for byte. Collectives issued inside torch's
`_coalescing_manager` (megatron-core coalesces its buckets) are counted one by one as they are queued; the
coalesced launch at the end calls the process group directly, so nothing is counted twice. Pipeline sends are
counted through batch_isend_irecv (isend itself is left alone: torch.distributed.P2POp checks its identity).
Groups are counted under the names given with `name_group`; megatron-core's model-parallel groups are named by
`install`. Collectives of a one-rank group are not counted: nothing of them leaves the process. Not counted:
barriers and object collectives (no tensor payload), gather/scatter (checkpoint-time only).
"""
import collections
import functools
import importlib
import inspect

import torch.distributed as dist

# The buffer each collective moves, from its bound arguments (names as in torch.distributed).
_PAYLOAD = {
    "all_reduce": lambda a: a["tensor"],
    "broadcast": lambda a: a["tensor"],
    "reduce_scatter_tensor": lambda a: a["input"],
    "reduce_scatter_single": lambda a: a["input"],
    "_reduce_scatter_base": lambda a: a["input"],
    "reduce_scatter": lambda a: a["input_list"],
    "all_gather_into_tensor": lambda a: a["output_tensor"],
    "all_gather_single": lambda a: a["output_tensor"],
    "_all_gather_base": lambda a: a["output_tensor"],
    "all_gather": lambda a: a["tensor_list"],
    "all_to_all_single": lambda a: a["input"],
}


def wire_fraction(collective: str, ranks: int) -> float:
    """Bytes each rank sends per byte of the collective's buffer (ring algorithms)."""
    share = (ranks - 1) / ranks
    return 2 * share if collective == "all_reduce" else share

# megatron-core modules that bind a torch.distributed collective to a name of their own at import, so
# that replacing torch.distributed's attribute does not reach their calls.
_BOUND_AT_IMPORT = [
    ("megatron.core.distributed.param_and_grad_buffer", "dist_all_gather_func"),  # distributed optimizer
    ("megatron.core.distributed.param_and_grad_buffer", "dist_reduce_scatter_func"),
    ("megatron.core.tensor_parallel.mappings", "dist_all_gather_func"),  # sequence parallelism
    ("megatron.core.tensor_parallel.mappings", "dist_reduce_scatter_func"),
    ("megatron.core.tensor_parallel.layers", "dist_all_gather_func"),
    ("megatron.core.tensor_parallel.layers", "dist_reduce_scatter_func"),
    ("megatron.core.tensor_parallel.utils", "dist_all_gather_func"),
    ("megatron.core.transformer.multi_token_prediction", "dist_all_gather_func"),
    ("megatron.core.timers", "dist_all_gather_func"),
    ("megatron.core.utils", "dist_all_gather_func"),
]


class CommunicationCounter:
    def __init__(self):
        self.bytes = collections.Counter()
        self._names = {}

    def name_group(self, group, name: str) -> None:
        if group is not None:
            self._names[group] = name

    def add(self, name: str, nbytes: float) -> None:
        """Bytes sent by collectives outside torch.distributed's functions (torchft's process group)."""
        self.bytes[name] += nbytes

    def _record(self, group, nbytes: float) -> None:
        if dist.get_world_size(group) == 1:
            return
        if group is None or group is dist.GroupMember.WORLD:
            key = "world"
        else:
            # no spaces: the summary line separates groups with ", " (logging.TrainingLog.parse)
            key = self._names.get(group) or f"ranks[{','.join(map(str, dist.get_process_group_ranks(group)))}]"
        self.bytes[key] += nbytes

    def snapshot(self) -> collections.Counter:
        return collections.Counter(self.bytes)


COUNTER = CommunicationCounter()


def _nbytes(payload) -> int:
    tensors = payload if isinstance(payload, (list, tuple)) else [payload]
    return sum(t.numel() * t.element_size() for t in tensors)


def _counted(function):
    payload, signature = _PAYLOAD[function.__name__], inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        group = arguments.get("group")
        sent = _nbytes(payload(arguments)) * wire_fraction(function.__name__, dist.get_world_size(group))
        COUNTER._record(group, sent)
        return function(*args, **kwargs)

    wrapper._counted = True
    return wrapper


def _wrap(namespace, attribute: str) -> None:
    """Count calls through `namespace.attribute` (once; functions we have no payload rule for stay as they are,
    e.g. megatron-core's reduce_scatter_with_fp32_accumulation, whose all_to_all_single is counted)."""
    function = getattr(namespace, attribute)
    if not getattr(function, "_counted", False) and getattr(function, "__name__", None) in _PAYLOAD:
        setattr(namespace, attribute, _counted(function))


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

    if not parallel_state.model_parallel_is_initialized():  # a process that only exchanges (tests, tools)
        return
    getters = {
        # all ranks of one distributed-optimizer instance: its gradient statistics (norm, zeros, found-inf)
        "dist_opt": parallel_state.get_intra_distributed_optimizer_instance_group,
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
        _wrap(dist, name)
    for module, attribute in _BOUND_AT_IMPORT:
        _wrap(importlib.import_module(module), attribute)
    if not getattr(dist.batch_isend_irecv, "_counted", False):
        dist.batch_isend_irecv = _counted_batch_isend_irecv(dist.batch_isend_irecv)
    return COUNTER
