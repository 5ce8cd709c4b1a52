"""EDiT's synchronization (arXiv 2412.07210), as a part of the local-SGD engine (local_sgd/engine.py): at each due
sync every module's shard is synchronized just before that module's forward runs (sync.py), with the
pseudo-gradient penalty (penalty.py) and optional staggered fragments (fragments.py) and delayed outer steps; after
the last iteration one more sync runs outside a forward. When a sync is due is its trigger's: a step count
(local_sgd/schedule.py) or A-EDiT's clock (aedit.py).
"""
import collections
import time
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.edit.fragments import plan_fragments
from megatron_edit.dp.edit.penalty import PenaltyConfig
from megatron_edit.dp.edit.sync import LayerwiseSync, ModuleSyncRecord
from megatron_edit.dp.local_sgd.config import LocalSGDConfig
from megatron_edit.dp.local_sgd.exchange import SyncExchange
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.meeting import ReplicaMeeting
from megatron_edit.dp.local_sgd.params import MainParams, ModuleShard
from megatron_edit.dp.local_sgd.progress import ReplicaProgress
from megatron_edit.dp.local_sgd.reports import SyncReports
from megatron_edit.dp.local_sgd.sharded_state import (from_model_space, load_vectors_state, model_space_tensors,
                                                     replica_object, vectors_state)
from megatron_edit.errors import require
from megatron_edit.logging import print_rank_last
from megatron_edit.model import unwrap_model


TIED_TO = "embedding.word_embeddings"  # the unit a tied output layer's weight is a copy of


def sync_modules(model: torch.nn.Module) -> List[tuple]:
    """(name, module) of every module EDiT synchronizes on this pipeline stage, in forward order. The embedding's
    word and position tables are separate units, so a word embedding tied to the last stage's output layer is a
    unit of its own on both stages: the same values, decided on alike, stay the same."""
    candidates = []
    if model.pre_process:
        candidates += [("embedding.word_embeddings", model.embedding.word_embeddings),
                       ("embedding.position_embeddings", getattr(model.embedding, "position_embeddings", None))]
    for layer in model.decoder.layers:
        candidates.append((f"decoder.layers.{layer.layer_number - 1}", layer))
    if model.post_process:
        candidates += [("decoder.final_layernorm", model.decoder.final_layernorm), ("output_layer", model.output_layer)]
    units = [(name, module) for name, module in candidates
             if module is not None and any(p.requires_grad for p in module.parameters())]
    covered = {id(p) for _, module in units for p in module.parameters()}
    missed = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missed:
        raise RuntimeError(f"EDiT would leave parameters unsynchronized: {missed}")
    return units


def sync_summary(iteration: int, records: List[ModuleSyncRecord], units: int, meeting: Dict[str, float]) -> str:
    """One log line per sync: who met (meeting.py), how many of this rank's `units` modules it
    covered (with --sync-fragments), outliers by replica and module, mean weights, norms before/after clipping."""
    parts = [f" edit sync at iteration {iteration}"] + [f" {key[5:]}: {value:g}" for key, value in meeting.items()]
    if len(records) < units:
        parts.append(f" modules: {len(records)} of {units}")
    outliers = collections.defaultdict(list)
    for record in records:
        for replica, bad in enumerate(record.outliers):
            if bad:
                outliers[replica].append(record.name)
    parts.append(" outliers: " + ("; ".join(f"replica {r} in {', '.join(names)}" for r, names in outliers.items())
                                  if outliers else "none"))
    if records:
        weights = [sum(r.weights[i] for r in records) / len(records) for i in range(len(records[0].weights))]
        parts.append(" mean weights: " + " ".join(f"{w:.3f}" for w in weights))
    stepped = [r for r in records if not r.reset_to_anchor]
    if stepped:
        parts.append(f" pseudo-grad norm before/after clip (mean over modules): "
                     f"{sum(r.averaged_norm for r in stepped) / len(stepped):.3e}/"
                     f"{sum(r.clipped_norm for r in stepped) / len(stepped):.3e}")
    resets = [r.name for r in records if r.reset_to_anchor and not r.non_finite]
    if resets:
        parts.append(f" reset to anchor (all replicas outliers): {', '.join(resets)}")
    non_finite = [r.name for r in records if r.non_finite]
    if non_finite:
        parts.append(f" reset to anchor (non-finite averaged pseudo-gradient; --edit-anomaly-elimination leaves the "
                     f"replica that sends one out instead): {', '.join(non_finite)}")
    return " |".join(parts) + " |"


def validate(args) -> None:
    """The flags of EDiT's own knobs (the delayed outer step, the penalty)."""
    shortest = min(args.local_sgd_initial_sync_interval or args.local_sgd_sync_interval, args.local_sgd_sync_interval)
    require(0 <= args.sync_delay_steps < shortest,
            f"--sync-delay-steps {args.sync_delay_steps} must be in [0, {shortest}) (the shortest sync interval, "
            "H or --local-sgd-initial-sync-interval): a sync's outer step is applied before the next sync")
    require(args.edit_anomaly_max_consecutive >= 1, "--edit-anomaly-max-consecutive must be >= 1")
    require(args.edit_weight_temperature > 0, "--edit-weight-temperature must be > 0")
    require(args.edit_pseudo_grad_clip is None or args.edit_pseudo_grad_clip > 0,
            "--edit-pseudo-grad-clip must be > 0")


class ModuleWiseSync:
    """EDiT's synchronizer: what the engine asks of one (plan, before/end of a step, sync now, consensus, state)."""
    exchanges_pseudo_gradients = True
    accepts_penalty = True      # --edit-anomaly-elimination, --edit-weighted-average, --edit-pseudo-grad-clip
    delays_outer_step = True    # --sync-delay-steps
    staggers_fragments = True   # --sync-fragments (on a step count)
    fault_kinds = frozenset({"scale", "nan"})

    @staticmethod
    def options(args) -> dict:
        return {"penalty": PenaltyConfig.from_args(args)}

    def __init__(self, config: LocalSGDConfig, groups: LocalSGDGroups, exchange: SyncExchange,
                 meeting: ReplicaMeeting, progress: ReplicaProgress, reports: SyncReports, trigger,
                 pseudo_gradient_hooks: list, penalty: PenaltyConfig, step_weight: float = 0.0, **_):
        self.config, self.groups, self.exchange, self.meeting = config, groups, exchange, meeting
        self.progress, self.reports, self.trigger, self.penalty = progress, reports, trigger, penalty
        self.pseudo_gradient_hooks, self.step_weight = pseudo_gradient_hooks, step_weight
        self.fragments = config.sync_fragments
        self.layerwise: LayerwiseSync = None  # built with the optimizer (build)
        self.fragment_units: List[List[int]] = []  # with --sync-fragments: this rank's unit indices per fragment
        self.tied_units: set = set()  # units holding a second copy of the word embedding (output_layer, PP > 1)
        self._sync_starts = {}  # sync iteration -> sync-group bytes and exposed seconds when that sync began
        self._steps_before_sync = 0  # local_steps_since_sync when the sync under way was armed
        self._sync_failed = False  # the last sync did not commit (replica jobs): the next iteration syncs again
        reports.overlapped_exposed = lambda: self.layerwise.exposed_seconds if self.layerwise else 0.0

    @property
    def skips_non_finite_steps(self) -> bool:
        """With anomaly elimination a replica's non-finite step is skipped, and what it trained since the last sync
        is left out of the next one."""
        return self.penalty.anomaly_elimination

    def exclude_from_next_sync(self) -> None:
        self.layerwise.exclude_from_next_sync()

    def build(self, model_chunks, optimizer) -> None:
        main_params = MainParams(optimizer)
        shard_rank = dist.get_rank(self.groups.shard)
        units, modules, tied = [], [], []
        for chunk in model_chunks:
            model = unwrap_model(chunk)
            for name, module in sync_modules(model):
                params = [p for p in module.parameters() if p.requires_grad]
                units.append(ModuleShard(name, params, shard_rank, self.groups.shard_size, main_params,
                                         self.config.offload_outer_state))
                modules.append(module)
                if name == "output_layer" and model.share_embeddings_and_output_weights:  # PP > 1: a second copy
                    tied.append(name)
        self.tied_units = set(tied)
        self.layerwise = LayerwiseSync(units, modules, self.groups, self.exchange, self.meeting.members, self.config,
                                       self.penalty, self.pseudo_gradient_hooks, step_weight=self.step_weight,
                                       undoable=self.meeting.jobs is not None)
        if self.fragments > 1:
            self.fragment_units = self._plan_fragments(units, tied)
        if self.config.warmup_iters == 0:
            self.begin_local_steps()

    def begin_local_steps(self) -> None:
        """The replicas are about to part (end of warm-up) or start over together: what they agree on is the model."""
        self.layerwise.initialize_anchors()

    def _plan_fragments(self, units: List[ModuleShard], tied: List[str]) -> List[List[int]]:
        """This rank's unit indices per fragment, from one plan of the whole model (every stage's units, gathered
        over the replica) that every rank of every replica computes alike."""
        mine = [(u.name, u.numel, TIED_TO if u.name in tied else None) for u in units]
        everyone = [None] * dist.get_world_size(self.groups.whole_replica)
        dist.all_gather_object(everyone, mine, group=self.groups.whole_replica)
        plan = plan_fragments(list({name: (name, numel, tie) for rank in everyone
                                    for name, numel, tie in rank}.values()), self.fragments)
        return [[i for i, u in enumerate(units) if plan[u.name] == f] for f in range(self.fragments)]

    def plan(self, iteration: int, finished: bool) -> StepPlan:
        """Once replicas train apart: the trigger's plan once it finds a sync due and the replicas met."""
        if self.layerwise.armed:  # by join_sync: this iteration's forward runs the sync the replica joined
            return StepPlan(iteration, sync_fragments=tuple(range(self.fragments)))
        if not self.trigger.due(iteration, finished, self._sync_failed):
            return StepPlan(iteration, train=not finished)
        self._meet()
        return self.trigger.sync_plan(iteration, finished, self._sync_failed)

    def _meet(self) -> None:
        """The wait for the others counts as exposed sync time (it is one with torchft: the quorum)."""
        self.meeting.meet()
        self.reports.blocked_seconds += self.meeting.wait_seconds

    def _commit(self) -> bool:
        start = time.perf_counter()
        committed = self.meeting.commit()
        self.reports.blocked_seconds += time.perf_counter() - start
        return committed

    def before_step(self, plan: StepPlan) -> None:
        self.layerwise.current_iteration = plan.iteration
        if plan.sync_fragments and not self.layerwise.armed:
            self._arm(plan)

    def end_step(self, plan: StepPlan) -> bool:
        """The step's forward ran any armed sync: conclude it and report what completed. Returns whether a sync
        committed in this step."""
        synced = self.layerwise.armed
        if synced:
            self.layerwise.disarm()
            synced = self._conclude_sync(plan.iteration)
        self._report_completed_syncs(plan.iteration)
        return synced

    def _note_sync_start(self, iteration: int) -> None:
        """The sync-group bytes and exposed time before this sync's meeting."""
        self._sync_starts[iteration] = (self.reports.sync_bytes(),
                                        self.reports.exposed_seconds() - self.meeting.wait_seconds)

    def _arm(self, plan: StepPlan) -> None:
        """The replicas met for this iteration's sync: its forward runs it, module by module."""
        self._steps_before_sync = self.progress.local_steps_since_sync
        if not self.fragment_units:
            self._note_sync_start(plan.iteration)
            self.layerwise.arm(plan.iteration, self.progress.local_steps_since_sync)
            self.progress.local_steps_since_sync = 0
            return
        # A fragment's sync: the replicas still differ in the other fragments, so the count of local steps since
        # every module last met (what the consensus and the final sync go by) runs on.
        units = [i for f in plan.sync_fragments for i in self.fragment_units[f]]
        if units:  # a fragment may have no module on this pipeline stage
            self._note_sync_start(plan.iteration)
            self.layerwise.arm(plan.iteration, self.progress.local_steps_since_sync, units)

    def join_sync(self) -> None:
        """A replica job meets the others at their next sync, and (as theirs) its first iteration's forward runs it."""
        self._meet()
        plan = self.trigger.sync_plan(self.progress.iteration + 1, False, self._sync_failed)
        if plan.train:
            self._arm(plan)
        elif plan.final_sync:
            self.sync_now(plan.iteration - 1)

    def sync_now(self, iteration: int) -> None:
        """After `iteration` (the last), the replicas having met: every module at once, outside a forward, again
        until a sync commits."""
        self._steps_before_sync = self.progress.local_steps_since_sync
        while True:
            self._note_sync_start(iteration)
            start = time.perf_counter()
            self.layerwise.sync_now(iteration, self.progress.local_steps_since_sync)  # nothing to overlap
            self.reports.blocked_seconds += time.perf_counter() - start
            if self._conclude_sync(iteration):
                break
            self._meet()
        self.progress.local_steps_since_sync = 0
        self._report_completed_syncs(iteration)

    def _conclude_sync(self, iteration: int) -> bool:
        """Commit the sync just run, or (a replica job failed during it) undo it so the next iteration retries;
        returns whether it committed."""
        self._sync_failed = not self._commit()
        if self._sync_failed:
            self.layerwise.undo_sync()
            self.progress.local_steps_since_sync = self._steps_before_sync
            values = {**self.meeting.meeting, "sync/committed": 0.0}
            print_rank_last(f" edit sync at iteration {iteration} |"
                            + "".join(f" {key[5:]}: {value:g} |" for key, value in values.items())
                            + " a replica failed during the sync: undone, the next iteration syncs again |")
            self.reports.add_event(iteration, values)
        return not self._sync_failed

    def _report_completed_syncs(self, iteration: int) -> None:
        for records in self.layerwise.pop_completed():
            self.report_sync(iteration, records)

    def report_sync(self, iteration: int, records: List[ModuleSyncRecord]) -> None:
        """The sync's log line, and its numbers as one tracker event: pseudo-gradient norms, outliers (module x
        replica pairs), each replica's mean weight, exposed time and bytes sent on the sync group (all from the
        sync's start, so with a delayed outer step they cover the iterations it was in flight)."""
        bytes_before, exposed_before = self._sync_starts.pop(records[0].sync_iteration, (0, 0.0))  # (0, 0): resumed
        meeting = self.meeting.meeting
        values = {**meeting, "sync/exposed ms": 1000 * (self.reports.exposed_seconds() - exposed_before),
                  "sync/bytes": float(self.reports.sync_bytes() - bytes_before)}
        print_rank_last(sync_summary(iteration, records, len(self.layerwise.units), meeting)
                        + f" exposed ms: {values['sync/exposed ms']:.4g} | bytes: {values['sync/bytes']:.4g} |")
        norms = [r.averaged_norm for r in records if not r.reset_to_anchor]
        if norms:
            values["sync/pseudo-grad norm mean"] = sum(norms) / len(norms)
            values["sync/pseudo-grad norm max"] = max(norms)
        if records:
            values["sync/outliers"] = float(sum(sum(r.outliers) for r in records))
            for replica in range(len(records[0].weights)):
                values[f"sync/weight replica {replica}"] = sum(r.weights[replica] for r in records) / len(records)
        self.reports.add_event(iteration, values)

    def consensus_views(self) -> List[tuple]:
        """(unit, its anchor gathered over the shard group) for every unit: what the replicas agreed on."""
        views = []
        for unit in self.layerwise.units:
            full = torch.empty(unit.padded_numel, dtype=torch.float32, device=unit.device)
            dist.all_gather_into_tensor(full, unit.anchor.to(unit.device), group=self.groups.shard)
            views.append((unit, full))
        return views

    def outer_vectors(self) -> Dict[str, List[torch.Tensor]]:
        return {"anchors": [u.anchor for u in self.layerwise.units],
                "momenta": [u.momentum for u in self.layerwise.units]}

    def outer_state(self) -> dict:
        """Anchors, momenta and each module's anomaly detector: what every replica holds alike (in a checkpoint
        the detectors are per replica; a replica that heals takes its peer's)."""
        return {**vectors_state(self.outer_vectors()), "detectors": [d.state_dict() for d in self.layerwise.detectors]}

    def load_outer_state(self, state: dict) -> None:
        load_vectors_state(self.outer_vectors(), state)
        for detector, detector_state in zip(self.layerwise.detectors, state["detectors"]):
            detector.load_state_dict(detector_state)

    def layout_state_dict(self) -> dict:
        """The delayed outer steps and open syncs (this first: it completes exchanges in flight, which sets their
        error-feedback residuals)."""
        return {"layerwise_sync": self.layerwise.state_dict()}

    def load_layout_state_dict(self, state: dict) -> None:
        self.layerwise.load_state_dict(state["layerwise_sync"])

    def sharded_state_dict(self, entries: dict, loading: bool, replica: int, shard_rank: int) -> dict:
        """Anchors and momenta in model space; each module's anomaly detector as an object of `replica` (a tied
        output layer's copy under the embedding's name, written by the first stage)."""
        units, state = self.layerwise.units, {}
        for name, vectors in self.outer_vectors().items():
            state[name] = [model_space_tensors(name, unit, None if loading else vector, entries, self.groups.shard)
                           for unit, vector in zip(units, vectors)]
        tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        state["detectors"] = [
            replica_object(replica, f"detector.{TIED_TO if unit.name in self.tied_units else unit.name}",
                           detector.state_dict(), (int(unit.name in self.tied_units), tensor_rank, shard_rank))
            for unit, detector in zip(units, self.layerwise.detectors)]
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        for name, vectors in self.outer_vectors().items():
            for unit, vector, loaded in zip(self.layerwise.units, vectors, state[name]):
                vector.copy_(from_model_space(unit, loaded, unit.owned))
        for detector, detector_state in zip(self.layerwise.detectors, state["detectors"]):
            detector.load_state_dict(detector_state)

    def outer_steps_in_flight(self) -> int:
        return len(self.layerwise.delayed)
