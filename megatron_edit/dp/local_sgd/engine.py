"""The local-SGD engine every local-SGD mode runs (EDiT, A-EDiT, DiLoCo, Post-Local-SGD: dp/recipes.py).

M replicas, each sharded over a shard group of ranks (DDP and the optimizer see only that group: `replica_ddp`),
linked by the sync group (groups.py). Warm-up (iterations <= W) is synchronous data parallelism over all replicas
(warmup.py). After it, gradients stay inside the replica; a recipe's parts say the rest:

    trigger        when a sync is due and what the step plan is (schedule.py's step count, edit/aedit.py's clock)
    synchronizer   how replicas synchronize: module by module inside the forward (edit/module_sync.py) or the
                   whole model after a step (whole_model.py, with its update: an average or an outer step)
    exchange       what crosses the sync group, through a codec (exchange.py)
    meeting        who takes part: the launch's replicas or torchft's quorum of replica jobs (meeting.py)

Training always ends with a sync, so every replica finishes on the same model. The engine owns the step counters
(progress.py) and the reports (reports.py) the parts share; no part knows another's kind.
"""
import contextlib
import datetime
from typing import Dict, Tuple

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from megatron_edit.dp.base import DataParallelMode, RankRoles, StepPlan, data_parallel_roles
from megatron_edit.dp.ddp import SynchronousDataParallel
from megatron_edit.dp.local_sgd import torchft_replicas
from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.exchange import ProcessGroupTransport, SyncExchange
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.inner_lr import LocalStepLR
from megatron_edit.dp.local_sgd.meeting import ReplicaMeeting
from megatron_edit.dp.local_sgd.progress import ReplicaProgress
from megatron_edit.dp.local_sgd.reports import SyncReports
from megatron_edit.dp.local_sgd.schedule import SyncSchedule
from megatron_edit.dp.local_sgd.sharded_state import replica_entries, replica_object
from megatron_edit.dp.local_sgd.warmup import WarmupAverage


class LocalSGDDataParallel(DataParallelMode):
    cross_replica_group = "sync"

    def __init__(self, recipe, ddp_config, transformer_config, config: LocalSGDConfig, groups: LocalSGDGroups,
                 device: torch.device, options: dict):
        """`recipe` names the trigger and synchronizer classes; `options` are its parts' own settings."""
        self.config, self.groups = config, groups
        self.pg_collection = groups.replica_process_groups()  # DDP and the optimizer see one replica
        self.replica_ddp = SynchronousDataParallel(ddp_config, transformer_config, self.pg_collection)
        self.progress = ReplicaProgress(in_warmup=config.warmup_iters > 0)
        self.schedule = SyncSchedule.of(config)
        self.reports = SyncReports(groups)
        self.exchange = SyncExchange(ProcessGroupTransport(groups.exchange, groups.gather), config.sync_dtype,
                                     config.sync_error_feedback, config.topk_fraction)
        self.warmup = WarmupAverage(groups, config.warmup_grad_dtype, config.topk_fraction,
                                    ddp_config.use_distributed_optimizer)
        self.meeting = ReplicaMeeting(groups, self.progress)
        self.pseudo_gradient_hooks = []  # (pseudo-gradient, sync iteration) -> None: fault injection (faults.py)
        parts = dict(name=recipe.name, config=config, schedule=self.schedule, groups=groups, exchange=self.exchange,
                     meeting=self.meeting, progress=self.progress, reports=self.reports, device=device,
                     pseudo_gradient_hooks=self.pseudo_gradient_hooks, clock=lambda: self.clock(), **options)
        self.trigger = recipe.trigger(**parts)
        self.sync = recipe.sync(trigger=self.trigger, **parts)
        self.losses_per_replica = not self.trigger.on_step_count  # replicas stand at different iterations
        if self.sync.accepts_penalty:
            self.non_finite_remedy += ("; or --edit-anomaly-elimination to skip such a step and leave the replica "
                                       "out of its next sync")

    @classmethod
    def from_args(cls, recipe, args, ddp_config, transformer_config) -> "LocalSGDDataParallel":
        groups = LocalSGDGroups.from_parallel_state(datetime.timedelta(minutes=args.distributed_timeout_minutes))
        device = torch.device("cuda" if args.device_type == "cuda" else "cpu")
        mode = cls(recipe, ddp_config, transformer_config, LocalSGDConfig.from_args(args), groups, device,
                   recipe.options(args))
        if args.replica_coordinator == "torchft":
            mode.meeting.attach_jobs(args, mode.exchange, mode.heal_state, mode.load_heal_state)
        return mode

    # Building: DDP and the inner optimizer over one replica, then the synchronizer over the optimizer's parameters.
    def wrap_model(self, model_chunks, unbucketed_params=()):
        return self.replica_ddp.wrap_model(model_chunks, unbucketed_params)

    def build_optimizer(self, model_chunks, optimizer_config):
        optimizer = self.replica_ddp.build_optimizer(model_chunks, optimizer_config)
        self.local_step_lr = LocalStepLR(optimizer.param_groups, self.config.local_lr_scale)
        self.sync.build(model_chunks, optimizer)
        return optimizer

    # The train loop's calls, in order.
    def plan(self, iteration: int, finished: bool) -> StepPlan:
        self.trigger.before_plan()
        warmup = self.schedule.is_warmup(iteration)
        if warmup or not self.meeting.has_peers:
            return StepPlan(iteration, train=not finished, warmup=warmup)
        return self.sync.plan(iteration, finished)

    def before_step(self, plan: StepPlan) -> None:
        self.progress.in_warmup = plan.warmup
        self.local_step_lr.apply(local=not plan.warmup and self.meeting.has_peers)
        self.sync.before_step(plan)

    def finalize_model_grads(self, model, num_tokens=None, **_):
        finalize_model_grads(model, num_tokens, pg_collection=self.pg_collection)
        if self.progress.in_warmup and self.meeting.has_peers:
            self.warmup.average_gradients(model, self.replica_ddp.unbucketed_params)

    def after_step(self, plan: StepPlan) -> None:
        synced = self.sync.end_step(plan)
        if plan.iteration == self.schedule.warmup_iters:
            self.sync.begin_local_steps()
        self.progress.iteration = plan.iteration
        self.meeting.beat()
        if not self.progress.in_warmup:
            self.progress.local_steps_since_sync += 1
        self.reports.iteration_done()
        if plan.sync_after:
            self.sync.sync_now(plan.iteration)
        self.trigger.after_step(plan, synced)

    def finish(self, plan: StepPlan) -> None:
        if plan.final_sync:
            self.sync.sync_now(plan.iteration - 1)

    def join(self):
        """A replica launched on its own meets the others before training: at a sync like theirs, in whose quorum it
        heals from a live peer if it is behind (then it continues after the peer's iteration, returned)."""
        if self.meeting.jobs is None:
            return None
        self.sync.join_sync()
        return self.progress.iteration if self.meeting.healed else None

    def begin_from_loaded_weights(self) -> None:
        self.progress.local_steps_since_sync = 0
        self.sync.begin_local_steps()

    # What the loop asks.
    def roles(self) -> RankRoles:
        """Replicas step apart (no collective across them). A replica launched on its own reads its slot's share of
        every global batch, as its ranks would in one launch of all the replicas. Under a clock replicas stand at
        different iterations: losses and validation are each replica's own."""
        ddp = data_parallel_roles()
        train_data = ddp.train_data
        if self.meeting.jobs is not None:
            replica, replicas = self.meeting.data_slot
            train_data = (replica * ddp.train_data[1] + ddp.train_data[0], replicas * ddp.train_data[1])
        own = self.losses_per_replica
        return RankRoles(
            replica=self.meeting.data_slot[0], step_group=self.groups.whole_replica,
            loss_group=self.groups.shard if own else ddp.loss_group, train_data=train_data,
            validation_data=(dist.get_rank(self.groups.shard), self.groups.shard_size) if own else ddp.validation_data,
            synchronous_warmup_iters=self.schedule.warmup_iters if self.meeting.has_peers else 0)

    def non_finite_message(self, iteration: int, what: str, rank: int) -> str:
        return f"{super().non_finite_message(iteration, what, rank)} (replica {self.groups.replica_index})"

    def on_non_finite_step(self, iteration: int, what: str, rank: int) -> None:
        """The synchronizer may skip the step and leave what the replica trained since the last sync out of the
        next one (during warm-up every replica shares the step, and skips it alike)."""
        if not self.sync.skips_non_finite_steps:
            super().on_non_finite_step(iteration, what, rank)
        if not self.progress.in_warmup:
            self.sync.exclude_from_next_sync()
        if dist.get_rank(self.groups.whole_replica) == 0:
            print(f" {self.non_finite_message(iteration, what, rank)}: step skipped"
                  + ("" if self.progress.in_warmup else ", replica left out of its next sync"), flush=True)

    def checkpoint_due(self, iteration: int, requested: bool):
        return self.trigger.checkpoint_due(iteration, requested)

    def final_checkpoint(self, iteration: int, last_saved):
        return self.trigger.final_checkpoint(iteration, last_saved)

    @contextlib.contextmanager
    def consensus(self):
        """Between syncs the replicas differ; what they agree on is the last sync's result (the anchor). During
        warm-up, and with a single replica, the model itself is that."""
        if self.progress.in_warmup or not self.meeting.has_peers or self.progress.local_steps_since_sync == 0:
            yield
            return
        views = self.sync.consensus_views()
        saved = [[param.detach().clone() for param in view.params] for view, _ in views]
        for view, values in views:
            view.write_model_params(values)
        try:
            yield
        finally:
            with torch.no_grad():
                for (view, _), backup in zip(views, saved):
                    for param, value in zip(view.params, backup):
                        param.copy_(value)

    def metrics(self) -> Dict[str, float]:
        return self.reports.metrics()

    def pop_events(self):
        return self.reports.pop_events()

    def outer_steps_in_flight(self) -> int:
        return self.sync.outer_steps_in_flight()

    def outer_state_numel(self) -> int:
        return sum(v.numel() for vectors in self.sync.outer_vectors().values() for v in vectors)

    # Healing (replica jobs): what a replica joining late takes from a live one at a sync's quorum.
    def heal_state(self) -> dict:
        """The outer state, which every replica holds alike, and where training stands (the joining replica's own
        inner optimizer starts afresh)."""
        return {"iteration": self.progress.iteration, "layout": self.meeting.layout, **self.sync.outer_state()}

    @torch.no_grad()
    def load_heal_state(self, state: dict) -> None:
        torchft_replicas.require_same_layout(self.meeting.layout, state["layout"], "the replica it heals from")
        self.sync.load_outer_state(state)
        for view, values in self.sync.consensus_views():
            view.write_full(values)
        self.meeting.took_over(state["iteration"])

    # Checkpoints: the step counters are per replica; the outer state is the same in every replica.
    def state_dict(self) -> dict:
        return {**self.progress.state_dict(), **self.layout_state_dict(), **self.sync.outer_state()}

    @torch.no_grad()
    def load_state_dict(self, state: dict, same_replica: bool) -> None:
        """Step counters and error-feedback residuals come from the replica this one continues; residuals are
        dropped when the replica count (and with it the exchange's chunking) changed. The outer state carries over
        whatever the replica count."""
        self.progress.load_state_dict(state)
        self.load_layout_state_dict(state)
        self.sync.load_outer_state(state)

    def layout_state_dict(self) -> dict:
        return {**self.sync.layout_state_dict(),
                "exchange": {"replicas": self.groups.num_replicas, **self.exchange.state_dict(),
                             "warmup": self.warmup.exchange.state_dict()}}

    def load_layout_state_dict(self, state: dict) -> None:
        saved = state["exchange"]
        if saved["replicas"] == self.groups.num_replicas:
            self.exchange.load_state_dict(saved)
            if "warmup" in saved:  # checkpoints written before the warm-up had a codec hold no residuals for it
                self.warmup.exchange.load_state_dict(saved["warmup"])
        self.sync.load_layout_state_dict(state)

    def _saved_replica(self, saved_replicas: int) -> Tuple[int, int]:
        """(the replica of the checkpoint this one saves as or continues, this replica's place among those that
        continue it: each key must have one main reader as well as one writer)."""
        return self.groups.replica_index % saved_replicas, self.groups.replica_index // saved_replicas

    def _rank_among_copies(self, saved_replicas: int, group: dist.ProcessGroup) -> int:
        copy = self._saved_replica(saved_replicas)[1]
        return copy * group.size() + dist.get_rank(group)

    def checkpoint_model_state(self, model_state: dict, saved_replicas: int) -> dict:
        """The replicas differ between syncs: each is saved under keys of its own (sharded_state.py)."""
        return replica_entries(model_state, self._saved_replica(saved_replicas)[0],
                               self._rank_among_copies(saved_replicas, self.groups.shard))

    def sharded_state_dict(self, entries: dict, saved_replicas: int, loading: bool) -> dict:
        """The step counters (one object per replica) and the synchronizer's outer state."""
        replica = self._saved_replica(saved_replicas)[0]
        progress = replica_object(replica, "local_sgd", self.progress.state_dict(),
                                  self._rank_among_copies(saved_replicas, self.groups.whole_replica))
        return {"progress": progress, **self.sync.sharded_state_dict(
            entries, loading, replica, self._rank_among_copies(saved_replicas, self.groups.shard))}

    def load_sharded_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state["progress"])
        self.sync.load_sharded_state_dict(state)
