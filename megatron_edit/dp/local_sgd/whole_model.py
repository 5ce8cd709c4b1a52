"""The whole-model synchronizer of Post-Local-SGD (Lin et al., arXiv 1808.07217) and DiLoCo (Douillard et al., arXiv
2311.08105), as a part of the local-SGD engine (engine.py): at the end of every H-th local step (and after the last
iteration) the whole model synchronizes at once, nothing overlapping it. What it exchanges and applies is its
update's: the parameters' average (Post-Local-SGD), or the pseudo-gradient anchor - theta driving an outer
(Nesterov) step on an unsharded anchor that every rank keeps for its whole model chunk (DiLoCo; no penalty).
"""
import math
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.exchange import SyncExchange
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.meeting import ReplicaMeeting
from megatron_edit.dp.local_sgd.outer import outer_sgd_step
from megatron_edit.dp.local_sgd.params import FlatParams, MainParams, ModuleShard
from megatron_edit.dp.local_sgd.progress import ReplicaProgress
from megatron_edit.dp.local_sgd.reports import SyncReports
from megatron_edit.dp.local_sgd.schedule import SyncSchedule
from megatron_edit.dp.local_sgd.sharded_state import (from_model_space, load_vectors_state, model_space_tensors,
                                                     vectors_state)
from megatron_edit.logging import print_rank_last


class ParameterAverage:
    """Post-Local-SGD's update: theta <- the replicas' mean theta (in fp32; no outer optimizer)."""
    exchanges_pseudo_gradients = False
    fault_kinds = frozenset()

    def __init__(self, config: LocalSGDConfig, shard: dist.ProcessGroup):
        self.shard = shard
        self.averages: List[torch.Tensor] = []

    def view(self, index: int, params, main_params: MainParams) -> FlatParams:
        return FlatParams(params, main_params)

    def begin(self, views: List[FlatParams]) -> None:
        """Replicas are about to part: remember what they agree on (the last sync's average from then on)."""
        self.averages = [view.read_full(self.shard) for view in views]

    def contribution(self, view: FlatParams, iteration: int, hooks) -> torch.Tensor:
        return view.read_full(self.shard)

    def apply(self, views: List[FlatParams], means: List[torch.Tensor]) -> Dict[str, float]:
        for index, (view, mean) in enumerate(zip(views, means)):
            self.averages[index] = mean
            view.write_full(mean)
        return {}

    def consensus(self, views: List[FlatParams]) -> List[tuple]:
        return list(zip(views, self.averages))

    def outer_vectors(self, views) -> Dict[str, List[torch.Tensor]]:
        return {"averages": self.averages}


class OuterStep:
    """DiLoCo's update: an outer step on each anchor from the mean pseudo-gradient, then theta <- anchor."""
    exchanges_pseudo_gradients = True
    fault_kinds = frozenset({"scale", "nan"})

    def __init__(self, config: LocalSGDConfig, shard: dist.ProcessGroup):
        self.config, self.shard = config, shard

    def view(self, index: int, params, main_params: MainParams) -> ModuleShard:
        return ModuleShard(f"model chunk {index}", params, 0, 1, main_params, self.config.offload_outer_state)

    @torch.no_grad()
    def begin(self, views: List[ModuleShard]) -> None:
        for view in views:
            view.anchor.copy_(view.read_full(self.shard))
            view.momentum.zero_()

    def contribution(self, view: ModuleShard, iteration: int, hooks) -> torch.Tensor:
        """The pseudo-gradient anchor - theta."""
        pseudo_grad = view.anchor.to(view.device) - view.read_full(self.shard)
        for hook in hooks:
            hook(pseudo_grad, iteration)
        return pseudo_grad

    def apply(self, views: List[ModuleShard], means: List[torch.Tensor]) -> Dict[str, float]:
        squares = 0.0
        for view, pseudo_grad in zip(views, means):
            squares += pseudo_grad.double().pow(2).sum().item()
            outer_sgd_step(view.anchor, view.momentum, pseudo_grad.to(view.anchor.device), self.config.outer_lr,
                           self.config.outer_momentum, self.config.outer_nesterov)
            view.write_full(view.anchor.to(view.device))
        return {"sync/pseudo-grad norm": math.sqrt(squares)}

    def consensus(self, views: List[ModuleShard]) -> List[tuple]:
        return [(view, view.anchor.to(view.device)) for view in views]

    def outer_vectors(self, views) -> Dict[str, List[torch.Tensor]]:
        return {"anchors": [v.anchor for v in views], "momenta": [v.momentum for v in views]}


class WholeModelSync:
    """The synchronizer the engine drives for Post-Local-SGD and DiLoCo (`update`: ParameterAverage, OuterStep)."""
    accepts_penalty = False
    delays_outer_step = False
    staggers_fragments = False
    skips_non_finite_steps = False

    @staticmethod
    def options(args) -> dict:
        return {}

    def __init__(self, name: str, config: LocalSGDConfig, schedule: SyncSchedule, groups: LocalSGDGroups,
                 exchange: SyncExchange, meeting: ReplicaMeeting, progress: ReplicaProgress, reports: SyncReports,
                 pseudo_gradient_hooks: list, update, **_):
        self.name, self.schedule, self.groups, self.exchange, self.meeting = name, schedule, groups, exchange, meeting
        self.progress, self.reports, self.hooks = progress, reports, pseudo_gradient_hooks
        self.update = update(config, groups.shard)
        self.views: List[FlatParams] = []

    def build(self, model_chunks, optimizer) -> None:
        main_params = MainParams(optimizer)
        self.views = [self.update.view(index, [p for p in chunk.parameters() if p.requires_grad], main_params)
                      for index, chunk in enumerate(model_chunks)]
        self.begin_local_steps()  # until the replicas part, what they agree on is the model itself (reset at W)

    def begin_local_steps(self) -> None:
        self.update.begin(self.views)

    def plan(self, iteration: int, finished: bool) -> StepPlan:
        """Once replicas train apart: a sync at the end of every H-th local step; when training is over, a final
        sync if any replica stepped since the last one (a checkpoint taken after the final sync resumes without
        another)."""
        if finished:
            return StepPlan(iteration, train=False, final_sync=self.progress.local_steps_since_sync > 0)
        return StepPlan(iteration, sync_after=self.schedule.syncs_after(iteration))

    def before_step(self, plan: StepPlan) -> None:
        """Nothing syncs inside a step."""

    def end_step(self, plan: StepPlan) -> bool:
        return False

    def join_sync(self) -> None:
        """A replica job takes part in the others' next sync: one now."""
        self.sync_now(self.progress.iteration)

    def sync_now(self, iteration: int) -> None:
        """Synchronize now, after `iteration`: every sync of this schedule, the final one included."""
        start, bytes_before = time.perf_counter(), self.reports.sync_bytes()
        values = self._synchronize(iteration)
        iteration = self.progress.iteration if self.meeting.healed else iteration  # took a live replica's place
        self.progress.local_steps_since_sync = 0
        seconds = time.perf_counter() - start
        self.reports.blocked_seconds += seconds
        values.update({"sync/exposed ms": 1000 * seconds,
                       "sync/bytes": float(self.reports.sync_bytes() - bytes_before)})
        self.reports.add_event(iteration, values)
        print_rank_last(f" {self.name} sync at iteration {iteration} |"
                        + "".join(f" {key[5:]}: {value:.4g} |" for key, value in values.items()))

    @torch.no_grad()
    def _synchronize(self, iteration: int) -> Dict[str, float]:
        """Every view's contribution averaged over the replicas that met, applied once all of them completed the
        exchange (with torchft a failed sync applies nothing and the next one tries again). Returns numbers for
        the log line and tracker ("sync/..." keys)."""
        self.meeting.meet()
        sums = []
        for index, view in enumerate(self.views):
            # A replica that healed adds nothing: its parameters are what the others agreed on.
            contribution = self.update.contribution(view, iteration, self.hooks)
            if self.meeting.healed:
                contribution.zero_()
            if not bool(torch.isfinite(contribution).all()):
                print(f" {self.name} sync at iteration {iteration}: replica {self.meeting.data_slot[0]} (rank "
                      f"{dist.get_rank()}) sends a non-finite value of model chunk {index}", flush=True)
            self.exchange.start(index, contribution, view.tensor_replicated).wait()
            sums.append(contribution)
        contributors = self.meeting.contributors(sums[0].device)
        meeting = self.meeting.meeting
        if not self.meeting.commit():
            return {**meeting, "sync/committed": 0.0}
        if not self._all_finite(sums):
            return {**self._keep_consensus(iteration), **meeting}
        return {**self.update.apply(self.views, [summed.div_(contributors) for summed in sums]), **meeting}

    def _all_finite(self, sums: List[torch.Tensor]) -> bool:
        """Whether the exchanged sums are finite on every rank of this replica (they are the same in every
        replica, so every rank of every replica gets the same answer)."""
        finite = torch.tensor([float(all(bool(torch.isfinite(s).all()) for s in sums))], device=sums[0].device)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.groups.whole_replica)
        return bool(finite.item())

    def _keep_consensus(self, iteration: int) -> Dict[str, float]:
        """A replica sent a non-finite value: apply nothing, return every replica to what they agreed on at the
        last sync (the local steps since are lost), and carry no error-feedback residual of this exchange."""
        for index, (view, agreed) in enumerate(self.consensus_views()):
            view.write_full(agreed)
            self.exchange.forget(index)
        print_rank_last(f" {self.name} sync at iteration {iteration}: a replica sent a non-finite value; nothing "
                        "applied, every replica back at the last sync's model")
        return {"sync/non-finite": 1.0}

    def consensus_views(self) -> List[tuple]:
        return self.update.consensus(self.views)

    def outer_vectors(self) -> Dict[str, List[torch.Tensor]]:
        return self.update.outer_vectors(self.views)

    def outer_state(self) -> dict:
        """What every replica holds alike: the outer vectors."""
        return vectors_state(self.outer_vectors())

    def load_outer_state(self, state: dict) -> None:
        load_vectors_state(self.outer_vectors(), state)

    def layout_state_dict(self) -> dict:
        return {}

    def load_layout_state_dict(self, state: dict) -> None:
        """Nothing is in flight between whole-model syncs."""

    def sharded_state_dict(self, entries: dict, loading: bool, replica: int, shard_rank: int) -> dict:
        """The outer vectors in model space (sharded_state.py)."""
        return {name: [model_space_tensors(name, view, None if loading else vector, entries)
                       for view, vector in zip(self.views, vectors)]
                for name, vectors in self.outer_vectors().items()}

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        for name, vectors in self.outer_vectors().items():
            for view, vector, loaded in zip(self.views, vectors, state[name]):
                vector.copy_(from_model_space(view, loaded))

    def outer_steps_in_flight(self) -> int:
        return 0
