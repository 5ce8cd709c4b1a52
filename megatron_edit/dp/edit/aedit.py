"""`--dp-mode aedit`: A-EDiT, EDiT with a wall-clock sync trigger, so stragglers don't stall anyone.

A replica syncs at its first iteration that starts once tau (`--aedit-sync-seconds`) has passed since its last
sync; fast replicas take more local steps, slow ones fewer, nobody waits for a step count. All ranks of a replica
(shard x tensor x pipeline) decide as one, through a one-flag all-reduce over the replica group each iteration;
replicas meet in the sync itself (they leave it together, so their clocks restart together).

Every sync opens with a small exchange over the sync group: whether any replica has run --train-iters (then
everyone syncs at once and ends, holding the same parameters), whether any replica passed a save point since the
last checkpoint (then everyone saves after this sync's iteration, under the highest iteration among them), and
the replicas' iteration and local-step counts. Replicas run different numbers of iterations, so the logged and
validation losses are each replica's own: validation evaluates the anchor, the same on every replica, over the
whole validation batch.
"""
import dataclasses
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.meeting import ReplicaMeeting
from megatron_edit.dp.local_sgd.progress import ReplicaProgress
from megatron_edit.dp.local_sgd.schedule import ClockTrigger, SyncSchedule
from megatron_edit.errors import require


@dataclasses.dataclass(frozen=True)
class AEditConfig:
    tau_seconds: float    # wall-clock time between a replica's syncs
    step_weight: float    # in [0, 1]: how much each replica's share of local steps counts in the weights

    @classmethod
    def from_args(cls, args) -> "AEditConfig":
        return cls(args.aedit_sync_seconds, args.aedit_step_weight)


def validate(args) -> None:
    """A-EDiT's own flags, and the run-control flags that assume every replica reaches an iteration together."""
    require(0 <= args.aedit_step_weight <= 1, "--aedit-step-weight must be in [0, 1]")
    require(args.aedit_sync_seconds > 0, "--aedit-sync-seconds must be > 0")
    require(args.ckpt_format == "torch" or not (args.save or args.load),
            f"--ckpt-format {args.ckpt_format}: A-EDiT's replicas stand at different iterations (learning rate, "
            "optimizer steps), which one state for all ranks cannot hold: use --ckpt-format torch (a file per rank)")
    require(args.exit_duration_in_mins is None,
            "--exit-duration-in-mins does not apply to --dp-mode aedit (replicas reach an iteration at different "
            "times); use --train-iters")
    require(not args.exit_signal_handler,
            "--exit-signal-handler does not apply to --dp-mode aedit (replicas reach an iteration at different "
            "times); checkpoint with --save-interval")
    require(not args.exit_interval,
            "--exit-interval does not apply to --dp-mode aedit (replicas reach an iteration at different times); "
            "stop with --train-iters, or checkpoint with --save-interval")


class WallClockTrigger:
    """The trigger of the module-wise sync (edit/module_sync.py) under A-EDiT: a sync is due once any rank of the
    replica finds tau passed since its last sync (or training over); the sync opens with the replicas' flags."""
    on_step_count = False

    def __init__(self, schedule: SyncSchedule, progress: ReplicaProgress, meeting: ReplicaMeeting,
                 groups: LocalSGDGroups, clock: Callable[[], float], device: torch.device, aedit: AEditConfig, **_):
        self.schedule, self.progress, self.meeting, self.groups = schedule, progress, meeting, groups
        self.clock, self.device = clock, device
        self.trigger = ClockTrigger(aedit.tau_seconds)
        self.last_sync_time = None  # the clock starts with the first iteration, not while the model is built
        self._save_wanted = False   # this replica passed a save point since the last checkpoint
        self._checkpoint_at: Optional[int] = None  # the label of the checkpoint due after this sync's iteration
        self._final_checkpoint_at: Optional[int] = None

    @staticmethod
    def options(args) -> dict:
        """Its own settings, and how much the replicas' shares of local steps count in the sync's weights."""
        config = AEditConfig.from_args(args)
        return {"aedit": config, "step_weight": config.step_weight}

    def _flags(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def before_plan(self) -> None:
        if self.last_sync_time is None:
            self.last_sync_time = self.clock()

    def due(self, iteration: int, finished: bool, retry: bool) -> bool:
        due = self._flags([float(finished or self.trigger.due(self.last_sync_time, self.clock()))])
        dist.all_reduce(due, op=dist.ReduceOp.MAX, group=self.groups.whole_replica)
        return bool(due.item())

    def sync_plan(self, iteration: int, finished: bool, retry: bool) -> StepPlan:
        """The replicas met: one small exchange says whether any finished (everyone ends, after a final sync unless
        a run resumed from its final checkpoint has nothing left to sync) or wants a checkpoint."""
        rows, _ = self.meeting.members.gather(  # every flag and count >= 0: an absent replica's zero row changes no max
            self._flags([finished, self._save_wanted, iteration - 1, self.progress.local_steps_since_sync]))
        stop, save, last_iteration, local_steps = rows.amax(dim=0).tolist()
        if save:
            self._save_wanted = False
        if stop:
            if local_steps > 0:
                self._final_checkpoint_at = int(last_iteration)
            return StepPlan(iteration, train=False, final_sync=local_steps > 0)
        if save:
            self._checkpoint_at = int(last_iteration) + 1
        return StepPlan(iteration, sync_fragments=(0,))

    def after_step(self, plan: StepPlan, synced: bool) -> None:
        if synced or plan.iteration == self.schedule.warmup_iters:
            self.last_sync_time = self.clock()

    def checkpoint_due(self, iteration: int, requested: bool) -> Optional[int]:
        """Replicas meet only in syncs: a requested checkpoint waits for the next one, then all save together."""
        self._save_wanted = self._save_wanted or requested
        label, self._checkpoint_at = self._checkpoint_at, None
        return label

    def final_checkpoint(self, iteration: int, last_saved: Optional[int]) -> Optional[int]:
        return self._final_checkpoint_at
