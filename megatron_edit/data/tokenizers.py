"""Tokenizers with the small surface megatron-core's datasets use: vocab_size, eod, unique_identifiers."""
from collections import OrderedDict


class NullTokenizer:
    """Token ids are the text; the last id of the vocabulary is the end-of-document token."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(cls=type(self).__name__, vocab_size=self.vocab_size)
