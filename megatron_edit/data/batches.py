"""Micro-batches in Megatron-LM's order, so every parallel layout trains on the same global batches.

Global batch i is samples [i*G, (i+1)*G). It is cut into micro-batch rounds of size
micro_batch x DP; in each round data-parallel rank r takes its contiguous micro_batch slice.
"""
from typing import Dict, Iterator

import torch


def micro_batches(dataset, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  device: torch.device, cyclic: bool = False) -> Iterator[Dict[str, torch.Tensor]]:
    """Stream of this rank's micro-batches from global sample `start_sample`. Training data is sized exactly and
    never wraps; validation is `cyclic`, like Megatron-LM's, so extra evaluations (at exit, at resume) re-read it."""
    round_size = micro_batch_size * dp_size
    position = start_sample
    while True:
        first = position + dp_rank * micro_batch_size
        samples = [dataset[(first + k) % len(dataset) if cyclic else first + k] for k in range(micro_batch_size)]
        # A blend's samples carry their dataset's index as a numpy integer beside the tensors.
        yield {key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device) for key in samples[0]}
        position += round_size
