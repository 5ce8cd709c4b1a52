"""Small facts about megatron-core optimizers that several modules need."""


def inner_optimizers(optimizer) -> list:
    """The optimizers a megatron-core optimizer consists of (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))
