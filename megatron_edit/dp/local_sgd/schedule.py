"""When local-SGD replicas synchronize: pure functions of the iteration (a step count) or of the time (A-EDiT).

A mode turns these into the train loop's StepPlan (dp/base.py); nothing here talks to another rank.
"""
import dataclasses
from typing import List, Tuple

from megatron_edit.dp.local_sgd.config import LocalSGDConfig


@dataclasses.dataclass(frozen=True)
class SyncSchedule:
    """Warm-up for W iterations, then a sync every H local steps: after a ramp of intervals H0, 2 H0, 4 H0, ...
    below H when H0 is given, and with F > 1 fragments each at its own offset inside the H."""
    warmup_iters: int           # W
    sync_interval: int          # H
    initial_sync_interval: int = 0  # H0 (0: every interval is H)
    fragments: int = 1          # F

    @classmethod
    def of(cls, config: LocalSGDConfig) -> "SyncSchedule":
        return cls(config.warmup_iters, config.sync_interval, config.initial_sync_interval, config.sync_fragments)

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
        for fragment in range(self.fragments):
            since_first = since_ramp - fragment * self.sync_interval // self.fragments
            if since_first >= 0 and since_first % self.sync_interval == 0:
                due.append(fragment)
        return due

    def is_sync_iteration(self, iteration: int) -> bool:
        return bool(self.syncing_fragments(iteration))

    def syncs_after(self, iteration: int) -> bool:
        """Modes that synchronize at the end of a step (DiLoCo, Post-Local-SGD) do so after iteration t when
        the next one is a sync iteration: the same parameters EDiT's next forward sees."""
        return self.is_sync_iteration(iteration + 1)


@dataclasses.dataclass(frozen=True)
class ClockTrigger:
    """A-EDiT's trigger: a sync is due at the first iteration that starts once tau seconds have passed since the
    last one (times from the mode's clock, which a test or benchmark may simulate: dp/faults.py)."""
    tau_seconds: float

    def due(self, last_sync: float, now: float) -> bool:
        return now - last_sync >= self.tau_seconds
