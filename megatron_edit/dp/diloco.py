"""`--dp-mode diloco`: DiLoCo (Douillard et al., arXiv 2311.08105), the baseline EDiT is closest to.

Post-Local-SGD's schedule (a sync at the end of every H-th local step, whole model, nothing overlapping it),
with EDiT's update: the pseudo-gradient d = anchor - theta, averaged over the sync group, drives an outer
Nesterov step on the anchor, and theta <- anchor. Unlike EDiT, every rank keeps a full, unsharded outer copy
(anchor and momentum for every parameter of its model chunk), and there is no penalty.
"""
import math
from typing import Dict, List

import torch

from megatron_edit.dp.local_sgd.config import SIXTEEN_STEP_RECIPE
from megatron_edit.dp.local_sgd.outer import outer_sgd_step
from megatron_edit.dp.local_sgd.params import MainParams, ModuleShard
from megatron_edit.dp.post_local_sgd import PostLocalSGDDataParallel


class DiLoCoDataParallel(PostLocalSGDDataParallel):
    name = "diloco"
    fault_kinds = PostLocalSGDDataParallel.fault_kinds | {"scale", "nan"}
    exchanges_pseudo_gradients = True
    defaults = SIXTEEN_STEP_RECIPE

    def _whole_model_view(self, index: int, params, main_params: MainParams) -> ModuleShard:
        return ModuleShard(f"model chunk {index}", params, 0, 1, main_params, self.local_sgd.offload_outer_state)

    @torch.no_grad()
    def _begin_local_steps(self) -> None:
        for view in self.views:
            view.anchor.copy_(view.read_full(self.groups.shard))
            view.momentum.zero_()

    def _contribution(self, view: ModuleShard, iteration: int) -> torch.Tensor:
        """The pseudo-gradient anchor - theta (zero for a replica that healed: its parameters are the anchor)."""
        pseudo_grad = view.anchor.to(view.device) - view.read_full(self.groups.shard)
        for hook in self.pseudo_gradient_hooks:
            hook(pseudo_grad, iteration)
        return pseudo_grad

    def _apply(self, means: List[torch.Tensor]) -> Dict[str, float]:
        """The outer step on each anchor from the mean pseudo-gradient, then theta <- anchor."""
        squares = 0.0
        for view, pseudo_grad in zip(self.views, means):
            squares += pseudo_grad.double().pow(2).sum().item()
            outer_sgd_step(view.anchor, view.momentum, pseudo_grad.to(view.anchor.device), self.local_sgd.outer_lr,
                           self.local_sgd.outer_momentum, self.local_sgd.outer_nesterov)
            view.write_full(view.anchor.to(view.device))
        return {"sync/pseudo-grad norm": math.sqrt(squares)}

    def _consensus_views(self):
        return [(view, view.anchor.to(view.device)) for view in self.views]

    def _outer_vectors(self) -> Dict[str, List[torch.Tensor]]:
        return {"anchors": [v.anchor for v in self.views], "momenta": [v.momentum for v in self.views]}

    def outer_state_numel(self) -> int:
        return sum(view.outer_state_numel() for view in self.views)
