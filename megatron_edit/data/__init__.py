"""Tokenizers, megatron-core datasets, and the batches the train loop reads."""
