"""The outer optimizer: SGD with (Nesterov) momentum on the anchor, driven by the averaged pseudo-gradient.

Pure tensor math, in place, with no communication: the same update as torch.optim.SGD(nesterov=True)
applied to `anchor` with `.grad = pseudo_grad`, which is what DiLoCo and EDiT use.
"""
import torch


@torch.no_grad()
def outer_sgd_step(anchor: torch.Tensor, momentum: torch.Tensor, pseudo_grad: torch.Tensor,
                   lr: float, momentum_coefficient: float, nesterov: bool) -> None:
    """anchor -= lr * update, with momentum = mu * momentum + d and update = d + mu * momentum (Nesterov) or momentum."""
    if momentum_coefficient == 0.0:
        anchor.add_(pseudo_grad, alpha=-lr)
        return
    momentum.mul_(momentum_coefficient).add_(pseudo_grad)
    update = pseudo_grad.add(momentum, alpha=momentum_coefficient) if nesterov else momentum
    anchor.add_(update, alpha=-lr)
