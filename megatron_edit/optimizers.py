"""Small facts about megatron-core optimizers that several modules need."""
import torch


def inner_optimizers(optimizer) -> list:
    """The optimizers a megatron-core optimizer consists of (a ChainedOptimizer holds several)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def describe_sgd_state(optimizer) -> None:
    """megatron-core knows how to create the state of a fresh Adam (`init_state_fn`), which the template a torch_dist
    checkpoint loads into needs, but not SGD's: give its SGD optimizers one (zero momentum buffers)."""
    for inner in inner_optimizers(optimizer):
        if getattr(inner, "init_state_fn", True) is None and isinstance(inner.optimizer, torch.optim.SGD):
            inner.init_state_fn = _init_sgd_state


def _init_sgd_state(optimizer: torch.optim.SGD, config=None) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if group["momentum"] and "momentum_buffer" not in optimizer.state[param]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param.data)
