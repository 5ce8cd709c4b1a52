"""Micro-batches in Megatron-LM's order, so every parallel layout trains on the same global batches.

Global batch i is samples [i*G, (i+1)*G). It is cut into micro-batch rounds of size
micro_batch x DP; in each round data-parallel rank r takes its contiguous micro_batch slice.
"""
from typing import Dict, Iterator, Optional

import torch

from megatron_edit.errors import UsageError


def micro_batches(dataset, start_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  device: torch.device, cyclic: bool = False,
                  vocab_size: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Stream of this rank's micro-batches from global sample `start_sample`. Training data is sized exactly and
    never wraps; validation is `cyclic`, like Megatron-LM's, so extra evaluations (at exit, at resume) re-read it.
    A token id of `vocab_size` or more (data made with another tokenizer) stops the run with one line, here on the
    host, not as an embedding's index error (a device assert on a GPU)."""
    round_size = micro_batch_size * dp_size
    position = start_sample
    while True:
        first = position + dp_rank * micro_batch_size
        indices = [(first + k) % len(dataset) if cyclic else first + k for k in range(micro_batch_size)]
        # A blend's samples carry their dataset's index as a numpy integer beside the tensors.
        samples = [dataset[i] for i in indices]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}
        if vocab_size is not None:
            check_token_ids(batch, indices, vocab_size)
        yield {key: value.to(device) for key, value in batch.items()}
        position += round_size


def check_token_ids(batch: Dict[str, torch.Tensor], indices, vocab_size: int) -> None:
    largest = max(int(batch[key].max()) for key in ("tokens", "labels") if key in batch)
    if largest >= vocab_size:
        raise UsageError(f"the data hold token id {largest} (in samples {indices[0]}-{indices[-1]}), beyond the "
                         f"model's vocabulary of {vocab_size}: they were tokenized with another tokenizer; pass "
                         "that one's --tokenizer-* flags, or rerun tools/preprocess_data.py with this one")
