"""Layer-wise synchronization: each module syncs its shard just before its own forward, in sync iterations only.

A forward pre-hook on every synchronized module (embedding, each transformer layer, final norm,
output layer) does, for the shard this rank owns:
    d = anchor - theta            pseudo-gradient (with the penalty: its norm judged, its weight decided)
    d = sum over replicas w_i d_i issued as an async exchange over the sync group (../local_sgd/exchange.py),
                                  waited for here
    d = clip(d)                   (optional)
    anchor <- outer step(anchor, d)
    theta <- anchor               all-gathered in the shard group into the full module
Before finishing module k it issues module k+1's all-reduce, so that collective runs while module k computes.
`sync_now` runs the same pipeline outside a forward (the final sync).

With a delay of tau iterations (`--sync-delay-steps`), a sync only issues each module's exchange, and training goes
on from the local parameters; tau iterations later, just before that module's forward, the exchange is waited for,
the outer step applied, and the progress this replica made since the exchange was issued is carried over:
    theta <- anchor' + (theta_now - theta_issued),  theta_issued = anchor - d_local
so the exchange hides behind tau iterations of compute. An exchange in stages (a quantized sum's all-to-all, then
its all-gather) moves to its second stage at the first module boundary after its first stage is done, so both run
behind compute; the second stages go out in the order the exchanges were issued, on a communicator of their own
(groups.py), so the moment each rank gets there does not change any rank's order of collectives. It costs, per rank
and module, d_local and the exchanged
sum while they are in flight: two more fp32 values per owned parameter, sharded (and offloaded) as anchor and
momentum are.
"""
import dataclasses
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.exchange import InFlight, SyncExchange
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.members import ProcessGroupMembers
from megatron_edit.dp.local_sgd.outer import outer_sgd_step
from megatron_edit.dp.edit.penalty import (EwmaAnomalyDetector, PenaltyConfig, blend_step_shares, clip_factor,
                                            replica_weights)
from megatron_edit.dp.local_sgd.params import ModuleShard


@dataclasses.dataclass
class ModuleSyncRecord:
    """What one module's sync decided, for logs and tests."""
    name: str
    norms: List[float]             # pseudo-gradient norm of every replica (empty without the penalty)
    outliers: List[bool]
    weights: List[float]
    averaged_norm: float = math.nan
    clipped_norm: float = math.nan
    reset_to_anchor: bool = False
    non_finite: bool = False       # the averaged pseudo-gradient was NaN/inf (a replica's, nothing left it out)
    sync_iteration: int = 0        # the iteration whose sync issued it


@dataclasses.dataclass
class _Pending:
    """A module's weighted pseudo-gradient whose sync-group exchange is in flight; with a delayed outer step, also
    this replica's own pseudo-gradient when the exchange was issued and the iteration that applies it."""
    exchange: InFlight
    record: ModuleSyncRecord
    local_pseudo_grad: Optional[torch.Tensor] = None
    apply_at: int = 0


class LayerwiseSync:
    def __init__(self, units: List[ModuleShard], modules: List[torch.nn.Module], groups: LocalSGDGroups,
                 exchange: SyncExchange, members: ProcessGroupMembers, config: LocalSGDConfig, penalty: PenaltyConfig,
                 pseudo_gradient_hooks: List[Callable[[torch.Tensor, int], None]] = (), step_weight: float = 0.0,
                 undoable: bool = False):
        self.units, self.groups, self.config, self.penalty = units, groups, config, penalty
        self.pseudo_gradient_hooks = pseudo_gradient_hooks  # (pseudo-gradient, sync iteration): fault injection
        self.exchange, self.members = exchange, members
        self.step_weight = step_weight
        self.replica = members.slot
        self.undoable = undoable  # keep what a sync changes until it commits (replica jobs: undo_sync)
        self._undo: Dict[int, tuple] = {}  # module -> (theta, anchor, momentum) owned values before the sync
        self._undo_penalty: tuple = ()  # (detector states, excluded modules) when the sync was armed
        self.local_steps = 0  # this replica's local steps since the previous sync, for the step weights
        self.detectors = [EwmaAnomalyDetector.from_config(penalty) for _ in units]
        self.delay = config.sync_delay_steps
        self.armed, self.iteration = False, 0
        self.armed_units: set = set()  # the modules the armed sync covers (all of them, or one fragment's)
        self.current_iteration = 0  # the training iteration running now (set by the mode), for delayed steps
        self.pending: Dict[int, _Pending] = {}  # exchanges the current sync's forward will wait for
        self.delayed: Dict[int, _Pending] = {}  # exchanges whose outer step waits for their apply_at iteration
        self.synced: set = set()
        self.excluded: set = set()  # modules whose next sync leaves this replica out (a skipped non-finite step)
        self._delaying = False
        self._open: Dict[int, tuple] = {}  # sync iteration -> (modules it covers, records of those applied so far)
        self.completed: List[List[ModuleSyncRecord]] = []  # records of syncs applied to every module, not yet reported
        self.trace: Optional[list] = None  # (event, module name) in order, when a test or tool asks for it
        self.exposed_seconds = 0.0
        self._modules = modules
        for i, module in enumerate(modules):
            module.register_forward_pre_hook(self._make_pre_hook(i))

    def enable_trace(self) -> list:
        """Record sync events and each module's forward end (the latter needs a post-hook, so only on request)."""
        self.trace = []
        for unit, module in zip(self.units, self._modules):
            module.register_forward_hook(lambda *_, name=unit.name: self._record("forward_end", name))
        return self.trace

    def _record(self, event: str, name: str) -> None:
        if self.trace is not None:
            self.trace.append((event, name))

    def arm(self, iteration: int, local_steps: int, units: Optional[Sequence[int]] = None,
            delayed: bool = True) -> None:
        """The coming forward passes belong to a sync iteration of `units` (indices; default: every module); this
        replica took `local_steps` since the last. A delayed outer step of those modules still outstanding (A-EDiT's
        clock can come round sooner) is applied first."""
        self.armed_units = set(range(len(self.units)) if units is None else units)
        for index in sorted(self.armed_units & set(self.delayed)):
            self._apply_delayed(index)
        self._open[iteration] = (len(self.armed_units), [])
        self.armed, self.iteration, self.synced = True, iteration, set()
        self._delaying = delayed and self.delay > 0
        self.local_steps = local_steps
        self.armed_at = time.time()
        if self.undoable:
            self._undo = {}
            self._undo_penalty = ([d.state_dict() for d in self.detectors], set(self.excluded))

    def pop_completed(self) -> List[List[ModuleSyncRecord]]:
        completed, self.completed = self.completed, []
        return completed

    def disarm(self) -> None:
        if self.armed and self.synced != self.armed_units:
            missing = [self.units[i].name for i in sorted(self.armed_units - self.synced)]
            raise RuntimeError(f"EDiT sync iteration ended without a forward through {missing}")
        self.armed = False

    def sync_now(self, iteration: int, local_steps: int) -> None:
        """Synchronize every module at once, outside a forward pass, without delay (training ends on one model)."""
        self.arm(iteration, local_steps, delayed=False)
        for index in range(len(self.units)):
            self._sync_module(index)
        self.disarm()

    def initialize_anchors(self) -> None:
        """anchor <- current parameters (at the end of warm-up); momentum starts at zero."""
        for unit in self.units:
            unit.anchor.copy_(unit.read_full(self.groups.shard)[unit.owned])
            unit.momentum.zero_()

    def _make_pre_hook(self, index: int):
        def hook(module, args):
            delayed = self.delayed.get(index)
            due = delayed is not None and delayed.apply_at <= self.current_iteration
            syncing = self.armed and index in self.armed_units and index not in self.synced
            if self.delayed or syncing:
                start = time.perf_counter()
                if due:
                    self._apply_delayed(index)
                self._advance_ready()
                if syncing:
                    self._sync_module(index)
                self.exposed_seconds += time.perf_counter() - start
        return hook

    def _advance_ready(self, through: Optional[int] = None) -> None:
        """Move delayed exchanges to their second stage in the order they were issued (the order of every rank's
        all-gathers): each whose first stage is done, stopping at the first still under way; or, with `through`,
        every one up to that module's, waiting for their first stages."""
        for index, pending in self.delayed.items():
            if pending.exchange.ready_to_advance() or (through is not None and pending.exchange.stages_left):
                pending.exchange.advance()
                self._record("advance", self.units[index].name)
            elif pending.exchange.stages_left:
                return
            if index == through:
                return

    def _apply_delayed(self, index: int) -> None:
        self._advance_ready(through=index)
        pending = self.delayed.pop(index)
        self._apply(index, pending.exchange.wait(), pending.record, pending.local_pseudo_grad)

    def _sync_module(self, index: int) -> None:
        self._issue(index)
        if self._delaying:  # nothing waits for this exchange until `delay` iterations later
            self.delayed[index] = self.pending.pop(index)
            self.synced.add(index)
            return
        following = [i for i in self.armed_units if i > index]
        if following:
            self._issue(min(following))  # overlaps with this module's forward
        self._finish(index)

    def exclude_from_next_sync(self) -> None:
        """Leave this replica out of every module's next sync, as an outlier (its local steps went wrong)."""
        self.excluded = set(range(len(self.units)))

    def _norm(self, index: int, owned_values: torch.Tensor) -> float:
        """Norm of a module-wide vector from this rank's slice: over the shard group and the tensor-parallel
        slices, tensor-replicated elements counted once. Every rank of the replica gets the same number."""
        parts = self.units[index].squared_norm_parts(owned_values)
        dist.all_reduce(parts, group=self.groups.shard)
        tensor_size = 1
        if self.groups.tensor is not None:
            dist.all_reduce(parts, group=self.groups.tensor)
            tensor_size = self.groups.tensor.size()
        return math.sqrt((parts[0] + parts[1] / tensor_size).item())

    def _weights(self, index: int, pseudo_grad: torch.Tensor) -> ModuleSyncRecord:
        """Every replica's weight for this module (one per slot, members.py): uniform over the replicas that
        contribute, or decided from the exchanged norms. A slot that does not contribute (its replica absent, or
        healing in this sync's quorum) weighs 0 and is no outlier."""
        slots, name = self.members.slots, self.units[index].name
        measured = self.penalty.needs_norms or self.step_weight
        if not measured and self.members.always_all_present:
            return ModuleSyncRecord(name, [], [False] * slots, [1.0 / slots] * slots)
        norm = self._norm(index, pseudo_grad) if measured else 0.0
        outlier = index in self.excluded or not math.isfinite(norm) or (
            self.members.contributing and self.penalty.anomaly_elimination and self.detectors[index].observe(norm))
        self.excluded.discard(index)
        mine = torch.tensor([norm if math.isfinite(norm) else math.inf, float(outlier), float(self.local_steps)],
                            dtype=torch.float64, device=pseudo_grad.device)
        rows, contributing = self.members.gather(mine)
        norms, flags, steps = rows.t().tolist()
        outliers = [bool(flag) and here for flag, here in zip(flags, contributing)]
        left_out = [bool(flag) or not here for flag, here in zip(flags, contributing)]
        weights = replica_weights(norms, left_out, self.penalty.weighted_average, self.penalty.weight_temperature)
        weights = blend_step_shares(weights, steps, left_out, self.step_weight)
        return ModuleSyncRecord(name, norms if measured else [], outliers, weights)

    def _issue(self, index: int) -> None:
        if index in self.pending or index in self.synced:
            return
        unit = self.units[index]
        theta = unit.read_full(self.groups.shard)[unit.owned]
        if self.undoable:
            self._undo[index] = (theta.clone(), unit.anchor.clone(), unit.momentum.clone())
        pseudo_grad = unit.anchor.to(theta.device) - theta
        local = pseudo_grad.to(unit.anchor.device, copy=True) if self._delaying else None
        for hook in self.pseudo_gradient_hooks:
            hook(pseudo_grad, self.iteration)
        record = self._weights(index, pseudo_grad)
        record.sync_iteration = self.iteration
        weight = record.weights[self.replica]
        if weight == 0.0:
            pseudo_grad.zero_()  # also keeps a NaN from reaching anyone
        else:
            pseudo_grad.mul_(weight)
        self.pending[index] = _Pending(self.exchange.start(index, pseudo_grad, unit.tensor_replicated), record, local,
                                       apply_at=self.iteration + self.delay)
        self._record("issue", unit.name)

    def _finish(self, index: int) -> None:
        pending = self.pending.pop(index)
        self._apply(index, pending.exchange.wait(), pending.record, None)
        self.synced.add(index)

    def _apply(self, index: int, pseudo_grad: torch.Tensor, record: ModuleSyncRecord,
               local_pseudo_grad: Optional[torch.Tensor]) -> None:
        """The outer step on the anchor from the summed pseudo-gradient, then theta <- anchor (+ the local progress
        made since a delayed exchange was issued)."""
        unit = self.units[index]
        progress = None
        if local_pseudo_grad is not None:
            theta = unit.read_full(self.groups.shard)[unit.owned]
            progress = theta - (unit.anchor.to(theta.device) - local_pseudo_grad.to(theta.device))
        if any(record.weights):
            record.averaged_norm = self._norm(index, pseudo_grad)  # the same on every rank of every replica
            record.non_finite = not math.isfinite(record.averaged_norm)
        # Every replica an outlier, or a non-finite average (without the penalty nothing judges the replicas):
        # keep the anchor, undo the local steps.
        record.reset_to_anchor = not any(record.weights) or record.non_finite
        if record.non_finite:
            self.exchange.forget(index)
        if not record.reset_to_anchor:
            factor = clip_factor(record.averaged_norm, self.penalty.pseudo_grad_clip)
            record.clipped_norm = record.averaged_norm * factor
            if factor != 1.0:
                pseudo_grad.mul_(factor)
            outer_sgd_step(unit.anchor, unit.momentum, pseudo_grad.to(unit.anchor.device), self.config.outer_lr,
                           self.config.outer_momentum, self.config.outer_nesterov)
        owned = unit.anchor.to(unit.device)
        if progress is not None and not record.reset_to_anchor:
            owned = owned + progress
        full = torch.empty(unit.shard_numel * self.groups.shard_size, dtype=torch.float32, device=unit.device)
        dist.all_gather_into_tensor(full, owned, group=self.groups.shard)
        unit.write_full(full)
        covered, records = self._open[record.sync_iteration]
        records.append(record)
        if len(records) == covered:
            del self._open[record.sync_iteration]
            self.completed.append(records)
        self._record("synced", unit.name)

    @torch.no_grad()
    def undo_sync(self) -> None:
        """Undo the sync just run (it did not commit: a replica failed during it): each module's anchor, momentum and
        penalty state as they were, and theta as the local steps left it, plus any inner step taken since."""
        for index, (theta_before, anchor, momentum) in self._undo.items():
            unit = self.units[index]
            theta = unit.read_full(self.groups.shard)[unit.owned]
            theta += theta_before - unit.anchor.to(theta.device)  # the sync set theta to the anchor
            unit.anchor.copy_(anchor)
            unit.momentum.copy_(momentum)
            full = torch.empty(unit.shard_numel * self.groups.shard_size, dtype=torch.float32, device=unit.device)
            dist.all_gather_into_tensor(full, theta, group=self.groups.shard)
            unit.write_full(full)
        detector_states, self.excluded = self._undo_penalty
        for detector, state in zip(self.detectors, detector_states):
            detector.load_state_dict(state)
        self._open.pop(self.iteration, None)
        self.completed = [records for records in self.completed if records[0].sync_iteration != self.iteration]
        self._undo = {}

    def state_dict(self) -> dict:
        """Delayed outer steps still to apply: their exchange is completed (waited for) and its sum kept, so a
        resumed run applies exactly what the uninterrupted one will."""
        return {"delayed": {index: {"sum": p.exchange.wait().cpu().clone(), "record": dataclasses.asdict(p.record),
                                    "local_pseudo_grad": p.local_pseudo_grad.cpu().clone(), "apply_at": p.apply_at}
                            for index, p in self.delayed.items()},
                "open": {iteration: (covered, [dataclasses.asdict(r) for r in records])
                         for iteration, (covered, records) in self._open.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.delayed = {}
        for index, saved in state["delayed"].items():
            unit = self.units[index]
            summed = saved["sum"].to(unit.device)
            self.delayed[index] = _Pending(InFlight([], lambda summed=summed: summed),
                                           ModuleSyncRecord(**saved["record"]),
                                           saved["local_pseudo_grad"].to(unit.anchor.device),
                                           apply_at=saved["apply_at"])
        self._open = {iteration: (covered, [ModuleSyncRecord(**r) for r in records])
                      for iteration, (covered, records) in state["open"].items()}
