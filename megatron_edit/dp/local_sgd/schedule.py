"""When local-SGD replicas synchronize: pure functions of the iteration (a step count) or of the time (A-EDiT's
clock, whose agreement among replicas is edit/aedit.py's), and the step-count trigger that turns them into the
train loop's StepPlan (dp/base.py). Nothing here talks to another rank.
"""
import dataclasses
from typing import List, Optional, Tuple

from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.progress import ReplicaProgress


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


class StepCountTrigger:
    """A sync of the modules the schedule says every H local steps (or, after a sync that did not commit, of every
    module at the next iteration), and a final one once training ends if any replica stepped since the last.
    Checkpoints come where the flags ask (every replica stands at the same iteration)."""
    on_step_count = True

    def __init__(self, schedule: SyncSchedule, progress: ReplicaProgress, **_):
        self.schedule, self.progress = schedule, progress

    @staticmethod
    def options(args) -> dict:
        return {}

    def due(self, iteration: int, finished: bool, retry: bool) -> bool:
        if finished:
            return self.progress.local_steps_since_sync > 0  # none after a resume from the final checkpoint
        return retry or self.schedule.is_sync_iteration(iteration)

    def sync_plan(self, iteration: int, finished: bool, retry: bool) -> StepPlan:
        """The replicas met for a due sync: the final one once training is over, else this iteration's."""
        if finished:
            return StepPlan(iteration, train=False, final_sync=True)
        fragments = self.schedule.syncing_fragments(iteration)
        if retry or not fragments:
            fragments = range(self.schedule.fragments)
        return StepPlan(iteration, sync_fragments=tuple(fragments))

    def before_plan(self) -> None:
        """An iteration is about to be planned."""

    def after_step(self, plan: StepPlan, synced: bool) -> None:
        """plan.iteration stepped; `synced`: a sync committed in it."""

    def checkpoint_due(self, iteration: int, requested: bool) -> Optional[int]:
        return iteration if requested else None

    def final_checkpoint(self, iteration: int, last_saved: Optional[int]) -> Optional[int]:
        return None if last_saved == iteration else iteration
