"""Every megatron-core internal this project reads or patches, in one place: megatron-core has no public API for
them (DDP's gradient buckets, the distributed optimizer's parameter ranges and state set-up).

`check(model, optimizer)` probes each one on the objects a run built and names what is missing in one line, so a
megatron-core upgrade that moves one fails when training is set up (and in tests/test_mcore_internals.py), not
deep inside a sync.
"""
from typing import Iterator, List, Tuple

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

# Methods of DistributedOptimizer: the range of a parameter's main fragment, and state for a fresh optimizer
# (platform/torch_adam_fixes.py also wraps the third).
OPTIMIZER_METHODS = ("_get_model_param_range_map", "_init_optimizer_states_with_dummy_values",
                     "_set_main_param_and_optimizer_states")
CHUNK_ATTRIBUTES = ("buffers",)                                    # DistributedDataParallel
BUFFER_ATTRIBUTES = ("buckets", "param_index_map", "grad_data")    # _ParamAndGradBuffer
BUCKET_ATTRIBUTES = ("params", "offset", "grad_data")              # _ParamAndGradBucket


def gradient_buckets(chunk) -> Iterator[Tuple[object, object]]:
    """(buffer, bucket) of every dense gradient bucket of a DDP-wrapped model chunk, in order."""
    for buffer in chunk.buffers:
        for bucket in buffer.buckets:
            yield buffer, bucket


def bucket_grads(bucket) -> torch.Tensor:
    """The bucket's gradients, one flat tensor (a view into its buffer)."""
    return bucket.grad_data


def params_in_bucket(buffer, bucket) -> Iterator[Tuple[torch.nn.Parameter, int, int]]:
    """(parameter, begin, end): each parameter of the bucket and where its gradient lies inside bucket_grads."""
    for param in bucket.params:
        first, last, _ = buffer.param_index_map[param]  # in the whole buffer; the bucket starts at its offset
        yield param, first - bucket.offset, last - bucket.offset


def grad_buffers(chunk) -> List[torch.Tensor]:
    """Every gradient of a DDP-wrapped model chunk, as megatron-core's flat buffers."""
    return [buffer.grad_data for buffer in chunk.buffers]


def main_param_range(optimizer: DistributedOptimizer, param: torch.nn.Parameter) -> Tuple[int, int]:
    """[start, end) of `param` (flattened) that this rank's fp32 main fragment holds."""
    param_range = optimizer._get_model_param_range_map(param)["param"]
    return param_range.start, param_range.end


def init_state_for_load(optimizer: DistributedOptimizer) -> None:
    """Give a fresh distributed optimizer state (megatron-core's zero-gradient step), so it can describe it."""
    optimizer._init_optimizer_states_with_dummy_values()


def missing(model_chunks, optimizers) -> List[str]:
    """The internals above that the given DDP chunks and (inner) optimizers lack."""
    gaps = []
    for chunk in model_chunks:
        gaps += [f"DistributedDataParallel.{name}" for name in CHUNK_ATTRIBUTES if not hasattr(chunk, name)]
        for buffer in getattr(chunk, "buffers", []):
            gaps += [f"_ParamAndGradBuffer.{name}" for name in BUFFER_ATTRIBUTES if not hasattr(buffer, name)]
            for bucket in getattr(buffer, "buckets", []):
                gaps += [f"_ParamAndGradBucket.{name}" for name in BUCKET_ATTRIBUTES if not hasattr(bucket, name)]
    for inner in optimizers:
        if isinstance(inner, DistributedOptimizer):
            gaps += [f"DistributedOptimizer.{name}" for name in OPTIMIZER_METHODS if not hasattr(inner, name)]
    return sorted(set(gaps))


def check(model_chunks, optimizers) -> None:
    gaps = missing(model_chunks, optimizers)
    if gaps:
        import megatron.core

        raise RuntimeError(f"megatron-core {megatron.core.__version__} lacks {', '.join(gaps)}, which "
                           "megatron_edit/platform/mcore_internals.py reads: adapt that module to this release")
