"""Micro-batches follow Megatron-LM's sample order; only validation streams wrap around."""
import pytest
import torch

from megatron_edit.data.batches import micro_batches

DATASET = [{"tokens": torch.tensor([i])} for i in range(10)]


def ids(stream, n):
    return [next(stream)["tokens"].view(-1).tolist() for _ in range(n)]


def test_each_data_parallel_rank_takes_its_slice_of_every_round():
    assert ids(micro_batches(DATASET, 0, 2, dp_rank=1, dp_size=2, device="cpu"), 2) == [[2, 3], [6, 7]]
    assert ids(micro_batches(DATASET, 4, 2, dp_rank=0, dp_size=2, device="cpu"), 1) == [[4, 5]]


def test_training_stream_never_wraps_but_validation_does():
    with pytest.raises(IndexError):
        ids(micro_batches(DATASET, 0, 4, dp_rank=0, dp_size=1, device="cpu"), 3)
    assert ids(micro_batches(DATASET, 0, 4, dp_rank=0, dp_size=1, device="cpu", cyclic=True), 3)[2] == [8, 9, 0, 1]
