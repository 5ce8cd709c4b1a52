"""The inner learning rate of local steps: the schedule's, times `--local-sgd-lr-scale` once the replicas part.

Each replica's Adam divides by the second moments of its own gradients, taken on 1/M of the global batch. Where noise
dominates a coordinate those moments are up to M times DDP's, so a replica's steps are up to sqrt(M) shorter than
DDP's, and averaging the replicas does not lengthen them (docs/low_communication.md, "Local Adam at M=4")."""
from typing import List


class LocalStepLR:
    """Scales the LR schedule of an optimizer's parameter groups: their peak and floor (megatron-core's `max_lr` and
    `min_lr`, which OptimizerParamScheduler reads per group), and the LR it already set for the coming step."""

    def __init__(self, param_groups: List[dict], scale: float):
        self.groups, self.scale = param_groups, scale
        self.base = [(group["max_lr"], group["min_lr"]) for group in param_groups]

    def apply(self, local: bool) -> None:
        """Before a step: the scaled schedule for a local step, the plain one for a synchronous step. Idempotent, and
        right after a checkpoint load too: the factor a group's LR was set with is read from its peak."""
        factor = self.scale if local else 1.0
        for group, (max_lr, min_lr) in zip(self.groups, self.base):
            in_use = group["max_lr"] / max_lr if max_lr else factor
            if in_use != factor:
                group["max_lr"], group["min_lr"] = max_lr * factor, min_lr * factor
                group["lr"] *= factor / in_use  # the schedule's LR is linear in its peak and floor together
