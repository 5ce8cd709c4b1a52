"""Settings shared by every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD), built once from the flags."""
import dataclasses
from typing import List, Tuple


@dataclasses.dataclass(frozen=True)
class LocalSGDConfig:
    sync_interval: int          # H: local steps between synchronizations
    warmup_iters: int           # W: plain synchronous data-parallel iterations before local steps begin
    outer_lr: float
    outer_momentum: float
    outer_nesterov: bool
    offload_outer_state: bool   # keep anchor and momentum in (pinned) CPU memory
    sync_dtype: str = "fp32"    # what the pseudo-gradient exchange puts on the wire (exchange.py)
    sync_error_feedback: bool = False
    sync_delay_steps: int = 0   # tau: iterations between issuing a sync's exchange and applying its outer step
    sync_fragments: int = 1     # F: groups of modules that sync at staggered iterations (edit/fragments.py)
    initial_sync_interval: int = 0  # H0: the first interval, doubled at each sync up to H (0: every interval is H)
    warmup_grad_dtype: str = "fp32"  # what the warm-up's gradient average over the replicas sends (exchange.py)
    topk_fraction: float = 0.01  # the share of values a topk codec sends

    @classmethod
    def from_args(cls, args) -> "LocalSGDConfig":
        return cls(args.local_sgd_sync_interval, args.local_sgd_warmup_iters, args.outer_lr, args.outer_momentum,
                   args.outer_nesterov, args.offload_outer_state, args.sync_dtype, args.sync_error_feedback,
                   args.sync_delay_steps, args.sync_fragments, args.local_sgd_initial_sync_interval or 0,
                   args.local_sgd_warmup_grad_dtype, args.sync_topk_fraction)

    def is_warmup(self, iteration: int) -> bool:
        return iteration <= self.warmup_iters

    def ramp(self) -> Tuple[List[int], int]:
        """The ramp's sync points (local steps done when each sync comes: after H0, then 2 H0 more, 4 H0, ...
        while an interval is below H) and the local step count where the ramp ends and fixed H intervals begin."""
        points, done, interval = [], 0, self.initial_sync_interval
        while 0 < interval < self.sync_interval:
            done += interval
            points.append(done)
            interval *= 2
        return points, done

    def syncing_fragments(self, iteration: int) -> List[int]:
        """The fragments that synchronize in iteration t's first forward: fragment f once f x H / F local steps have
        passed (fragment 0: H), then every H. With F=1: the whole model every H local steps, after the ramp's sync
        points when there is one (a ramp syncs the whole model: fragments refuse it)."""
        local_steps_done = iteration - 1 - self.warmup_iters
        if local_steps_done <= 0:
            return []
        ramp_points, ramp_end = self.ramp()
        if local_steps_done <= ramp_end:
            return [0] if local_steps_done in ramp_points else []
        since_ramp = local_steps_done - ramp_end
        due = []
        for fragment in range(self.sync_fragments):
            since_first = since_ramp - fragment * self.sync_interval // self.sync_fragments
            if since_first >= 0 and since_first % self.sync_interval == 0:
                due.append(fragment)
        return due

    def is_sync_iteration(self, iteration: int) -> bool:
        return bool(self.syncing_fragments(iteration))

    def syncs_after(self, iteration: int) -> bool:
        """Modes that synchronize at the end of a step (DiLoCo, Post-Local-SGD) do so after iteration t when
        the next one is a sync iteration: the same parameters EDiT's next forward sees."""
        return self.is_sync_iteration(iteration + 1)
