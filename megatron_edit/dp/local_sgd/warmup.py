"""The warm-up (iterations <= W): synchronous data parallelism over every replica. DDP reduces gradients inside the
shard group; then each rank averages, over the sync group, the gradient shard its optimizer reads (megatron-core's
distributed-optimizer-instance scheme), through an exchange of its own: an fp32 all-reduce, or a codec that always
carries its error (gradients compressed step after step drift without it)."""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_edit.dp.local_sgd.exchange import ProcessGroupTransport, SyncExchange
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.platform import mcore_internals

# Synchronous iterations first, as a fraction of training: at a quarter, EDiT at H=16 came within 0.5% of DDP's
# validation loss on the benchmark corpus, against 6% with 5% (docs/baselines.md: "Choosing H, the outer optimizer
# and warm-up").
DEFAULT_WARMUP_FRACTION = 0.25
# What the warm-up's gradient average sends unless told, with error feedback: int2 gradients kept that quality at
# 1/16 of the bytes (docs/low_communication.md).
DEFAULT_WARMUP_CODEC = "int2"


def _gradient_segments(buffer, bucket, start: int, numel: int) -> List[Tuple[slice, List[slice]]]:
    """[start, start + numel) of a gradient bucket cut into the vectors a codec exchanges: a word embedding tied to
    the output layer on another pipeline stage alone (its copies sit among other parameters on the two stages, and
    must be quantized alike), the rest between. Each with its tensor-replicated ranges: gradients of parameters
    every tensor rank holds whole (megatron-core leaves them unmarked by `tensor_model_parallel`), which a codec
    quantizes in blocks of their own so their copies stay the same on every tensor rank."""
    spans = []  # (begin, end, tied, tensor-replicated) of each parameter inside the range, by position
    for param, first, last in mcore_internals.params_in_bucket(buffer, bucket):
        begin, end = max(first, start), min(last, start + numel)
        if begin < end:
            spans.append((begin, end, getattr(param, "shared_embedding", False),
                          not getattr(param, "tensor_model_parallel", False)))
    spans.sort()
    cuts = sorted({start, start + numel} | {edge for begin, end, tied, _ in spans if tied for edge in (begin, end)})
    segments = []
    for low, high in zip(cuts, cuts[1:]):
        replicated = [slice(max(b, low) - low, min(e, high) - low) for b, e, _, rep in spans
                      if rep and max(b, low) < min(e, high)]
        segments.append((slice(low - start, high - start), replicated))
    return segments


class WarmupAverage:
    def __init__(self, groups: LocalSGDGroups, grad_dtype: str, topk_fraction: float, sharded_grads: bool):
        self.groups, self.sharded_grads = groups, sharded_grads  # sharded: the distributed optimizer's shards
        self.exchange = SyncExchange(ProcessGroupTransport(groups.exchange, groups.gather), grad_dtype, True,
                                     topk_fraction)
        self._segments: Dict[tuple, list] = {}  # (chunk, bucket) -> what the exchange sends of it

    @torch.no_grad()
    def average_gradients(self, model, unbucketed_params) -> None:
        """Average over the sync group this rank's gradient shard of every bucket, and the host-held gradients of
        the parameters outside DDP's buckets (--swap-layers, where a replica is one rank)."""
        shard_rank, shard_size = dist.get_rank(self.groups.shard), self.groups.shard_size
        in_flight = []
        for c, chunk in enumerate(model):
            for k, (buffer, bucket) in enumerate(mcore_internals.gradient_buckets(chunk)):
                grads, start = mcore_internals.bucket_grads(bucket), 0
                if self.sharded_grads:
                    size = grads.numel() // shard_size
                    start = shard_rank * size
                    grads = grads[start:start + size]
                if (c, k) not in self._segments:  # a bucket's parameters and shard never change
                    self._segments[c, k] = _gradient_segments(buffer, bucket, start, grads.numel())
                for segment, replicated in self._segments[c, k]:
                    part = grads[segment]
                    values = part if part.dtype == torch.float32 else part.float()
                    key = ("grads", c, k, segment.start)
                    in_flight.append((part, self.exchange.start(key, values, replicated)))
        for index, param in enumerate(unbucketed_params):
            values = param.main_grad.to(param.compute_device).view(-1)
            in_flight.append((param.main_grad.view(-1), self.exchange.start(("host grads", index), values, [])))
        for part, exchange in in_flight:
            part.copy_(exchange.wait().div_(self.groups.num_replicas))
