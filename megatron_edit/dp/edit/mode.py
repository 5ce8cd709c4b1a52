"""`--dp-mode edit`: Local SGD with sharded, layer-wise synchronization (EDiT, arXiv 2412.07210).

Warm-up and local steps are local_sgd/mode.py's: synchronous data parallelism for W iterations, then gradients
stay inside the shard group and nothing crosses the sync group.
Sync iterations (every H local steps): LayerwiseSync updates each module just before its forward; after the
last iteration one more sync runs outside a forward. `sync_due` and `_sync_plan` are what A-EDiT (aedit.py)
changes.
"""
import collections
import time
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.local_sgd.config import EVERY_OTHER_STEP_RECIPE, LocalSGDConfig
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.edit.fragments import plan_fragments
from megatron_edit.dp.edit.penalty import PenaltyConfig
from megatron_edit.dp.local_sgd.params import MainParams, ModuleShard
from megatron_edit.dp.local_sgd.sharded_state import from_model_space, model_space_tensors, replica_object
from megatron_edit.dp.edit.sync import LayerwiseSync, ModuleSyncRecord
from megatron_edit.dp.local_sgd.mode import LocalSGDDataParallel
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
    """One log line per sync: who met (local_sgd/mode.py's `meeting`), how many of this rank's `units` modules it
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


class EditDataParallel(LocalSGDDataParallel):
    name = "edit"
    fault_kinds = LocalSGDDataParallel.fault_kinds | {"scale", "nan"}
    accepts_penalty = True
    delays_outer_step = True
    syncs_in_fragments = True
    step_weight = 0.0  # A-EDiT may blend replicas' shares of local steps into the weights
    defaults = EVERY_OTHER_STEP_RECIPE
    non_finite_remedy = LocalSGDDataParallel.non_finite_remedy + \
        "; or --edit-anomaly-elimination to skip such a step and leave the replica out of its next sync"

    def __init__(self, ddp_config, transformer_config, local_sgd: LocalSGDConfig, groups: LocalSGDGroups,
                 penalty: PenaltyConfig = PenaltyConfig()):
        super().__init__(ddp_config, transformer_config, local_sgd, groups)
        self.penalty = penalty
        self.sync = None
        self.fragment_units: List[List[int]] = []  # with --sync-fragments: this rank's unit indices per fragment
        self.tied_units: set = set()  # units holding a second copy of the word embedding (output_layer, PP > 1)
        self._sync_starts = {}  # sync iteration -> sync-group bytes and exposed seconds when that sync began
        self._steps_before_sync = 0  # local_steps_since_sync when the sync under way was armed
        self._sync_failed = False  # the last sync did not commit (replica jobs): the next iteration syncs again
        self._meet_seconds = 0.0  # how long the last meeting (torchft's quorum) held training up

    @classmethod
    def validate(cls, args) -> None:
        super().validate(args)
        shortest = min(args.local_sgd_initial_sync_interval or args.local_sgd_sync_interval,
                       args.local_sgd_sync_interval)
        require(0 <= args.sync_delay_steps < shortest,
                f"--sync-delay-steps {args.sync_delay_steps} must be in [0, {shortest}) (the shortest sync interval, "
                "H or --local-sgd-initial-sync-interval): a sync's outer step is applied before the next sync")
        require(args.edit_anomaly_max_consecutive >= 1, "--edit-anomaly-max-consecutive must be >= 1")
        require(args.edit_weight_temperature > 0, "--edit-weight-temperature must be > 0")
        require(args.edit_pseudo_grad_clip is None or args.edit_pseudo_grad_clip > 0,
                "--edit-pseudo-grad-clip must be > 0")

    @classmethod
    def mode_configs(cls, args) -> dict:
        return {"penalty": PenaltyConfig.from_args(args)}

    def build_optimizer(self, model_chunks, optimizer_config):
        optimizer = super().build_optimizer(model_chunks, optimizer_config)
        main_params = MainParams(optimizer)
        shard_rank = dist.get_rank(self.groups.shard)
        units, modules, tied = [], [], []
        for chunk in model_chunks:
            model = unwrap_model(chunk)
            for name, module in sync_modules(model):
                params = [p for p in module.parameters() if p.requires_grad]
                units.append(ModuleShard(name, params, shard_rank, self.groups.shard_size, main_params,
                                         self.local_sgd.offload_outer_state))
                modules.append(module)
                if name == "output_layer" and model.share_embeddings_and_output_weights:  # PP > 1: a second copy
                    tied.append(name)
        self.tied_units = set(tied)
        self.sync = LayerwiseSync(units, modules, self.groups, self.exchange, self.members, self.local_sgd,
                                  self.penalty, self.pseudo_gradient_hooks, step_weight=self.step_weight,
                                  undoable=self.replica_jobs is not None)
        if self.schedule.fragments > 1:
            self.fragment_units = self._plan_fragments(units, tied)
        if self.schedule.warmup_iters == 0:
            self._begin_local_steps()
        return optimizer

    def _begin_local_steps(self) -> None:
        self.sync.initialize_anchors()

    def _plan_fragments(self, units: List[ModuleShard], tied: List[str]) -> List[List[int]]:
        """This rank's unit indices per fragment, from one plan of the whole model (every stage's units, gathered
        over the replica) that every rank of every replica computes alike."""
        mine = [(u.name, u.numel, TIED_TO if u.name in tied else None) for u in units]
        everyone = [None] * dist.get_world_size(self.groups.whole_replica)
        dist.all_gather_object(everyone, mine, group=self.groups.whole_replica)
        plan = plan_fragments(list({name: (name, numel, tie) for rank in everyone
                                    for name, numel, tie in rank}.values()), self.schedule.fragments)
        return [[i for i, u in enumerate(units) if plan[u.name] == f] for f in range(self.schedule.fragments)]

    def sync_due(self, iteration: int, finished: bool) -> bool:
        """EDiT syncs on a step count: H local steps after the last sync (or the iteration after a sync that did
        not commit), and once more when training ends."""
        if finished:
            return self.local_steps_since_sync > 0  # none after a resume from the final checkpoint
        return self._sync_failed or self.schedule.is_sync_iteration(iteration)

    def _local_plan(self, iteration: int, finished: bool) -> StepPlan:
        if self.sync.armed:  # by _join_sync: this iteration's forward runs the sync the replica joined
            return StepPlan(iteration, sync_fragments=tuple(range(self.schedule.fragments)))
        if not self.sync_due(iteration, finished):
            return StepPlan(iteration, train=not finished)
        self._meet()
        return self._sync_plan(iteration, finished)

    def _sync_plan(self, iteration: int, finished: bool) -> StepPlan:
        """The replicas met for a due sync: the final one once training is over, else this iteration's (every
        fragment again after a sync that did not commit)."""
        if finished:
            return StepPlan(iteration, train=False, final_sync=True)
        fragments = self.schedule.syncing_fragments(iteration)
        if self._sync_failed or not fragments:
            fragments = range(self.schedule.fragments)
        return StepPlan(iteration, sync_fragments=tuple(fragments))

    def before_step(self, plan: StepPlan) -> None:
        super().before_step(plan)
        self.sync.current_iteration = plan.iteration
        if plan.sync_fragments and not self.sync.armed:
            self._arm(plan)

    def _meet(self) -> int:
        """As every mode's, the wait counted as exposed sync time (it is one with torchft: the quorum)."""
        start = time.perf_counter()
        present = super()._meet()
        self._meet_seconds = time.perf_counter() - start
        self.blocked_sync_seconds += self._meet_seconds
        return present

    def _commit(self) -> bool:
        start = time.perf_counter()
        committed = super()._commit()
        self.blocked_sync_seconds += time.perf_counter() - start
        return committed

    def _note_sync_start(self, iteration: int) -> None:
        """The sync-group bytes and exposed time before this sync's meeting."""
        self._sync_starts[iteration] = (self.counter.snapshot().get("sync", 0),
                                        self.exposed_sync_seconds() - self._meet_seconds)

    def _arm(self, plan: StepPlan) -> None:
        """The replicas met for this iteration's sync: its forward runs it, module by module."""
        self._steps_before_sync = self.local_steps_since_sync
        if not self.fragment_units:
            self._note_sync_start(plan.iteration)
            self.sync.arm(plan.iteration, self.local_steps_since_sync)
            self.local_steps_since_sync = 0
            return
        # A fragment's sync: the replicas still differ in the other fragments, so the count of local steps since
        # every module last met (what the consensus and the final sync go by) runs on.
        units = [i for f in plan.sync_fragments for i in self.fragment_units[f]]
        if units:  # a fragment may have no module on this pipeline stage
            self._note_sync_start(plan.iteration)
            self.sync.arm(plan.iteration, self.local_steps_since_sync, units)

    def _join_sync(self) -> None:
        """A replica job meets the others at their next sync, and (as theirs) its first iteration's forward runs it."""
        self._meet()
        plan = self._sync_plan(self.iteration + 1, finished=False)
        if plan.train:
            self._arm(plan)
        else:
            self.finish(plan)

    def _final_sync(self, iteration: int) -> None:
        """After the last iteration, the replicas having met: every module at once, outside a forward, again until
        a sync commits."""
        self._steps_before_sync = self.local_steps_since_sync
        while True:
            self._note_sync_start(iteration)
            start = time.perf_counter()
            self.sync.sync_now(iteration, self.local_steps_since_sync)  # nothing to overlap: all of it exposed
            self.blocked_sync_seconds += time.perf_counter() - start
            if self._conclude_sync(iteration):
                break
            self._meet()
        self.local_steps_since_sync = 0
        self._report_completed_syncs(iteration)

    def _conclude_sync(self, iteration: int) -> bool:
        """Commit the sync just run, or (a replica job failed during it) undo it so the next iteration retries;
        returns whether it committed."""
        self._sync_failed = not self._commit()
        if self._sync_failed:
            self.sync.undo_sync()
            self.local_steps_since_sync = self._steps_before_sync
            values = {**self.meeting, "sync/committed": 0.0}
            print_rank_last(f" edit sync at iteration {iteration} |"
                            + "".join(f" {key[5:]}: {value:g} |" for key, value in values.items())
                            + " a replica failed during the sync: undone, the next iteration syncs again |")
            self._events.append((iteration, values))
        return not self._sync_failed

    def on_non_finite_step(self, iteration: int, what: str, rank: int) -> None:
        """With anomaly elimination a replica's non-finite step is skipped, and what it trained since the last sync
        is left out of the next one (during warm-up every replica shares the step, and skips it alike)."""
        if not self.penalty.anomaly_elimination:
            super().on_non_finite_step(iteration, what, rank)
        if not self.in_warmup:
            self.sync.exclude_from_next_sync()
        if dist.get_rank(self.groups.whole_replica) == 0:
            print(f" {self.non_finite_message(iteration, what, rank)}: step skipped"
                  + ("" if self.in_warmup else ", replica left out of its next sync"), flush=True)

    def after_step(self, plan: StepPlan) -> None:
        if self.sync.armed:
            self.sync.disarm()
            self._conclude_sync(plan.iteration)
        self._report_completed_syncs(plan.iteration)
        if plan.iteration == self.schedule.warmup_iters:
            self._begin_local_steps()
        super().after_step(plan)

    def _consensus_views(self):
        views = []
        for unit in self.sync.units:
            full = torch.empty(unit.padded_numel, dtype=torch.float32, device=unit.device)
            dist.all_gather_into_tensor(full, unit.anchor.to(unit.device), group=self.groups.shard)
            views.append((unit, full))
        return views

    def exposed_sync_seconds(self) -> float:
        return self.sync.exposed_seconds + self.blocked_sync_seconds

    def _report_completed_syncs(self, iteration: int) -> None:
        for records in self.sync.pop_completed():
            self._report_sync(iteration, records)

    def _report_sync(self, iteration: int, records: List[ModuleSyncRecord]) -> None:
        """The sync's log line, and its numbers as one tracker event: pseudo-gradient norms, outliers (module x
        replica pairs), each replica's mean weight, exposed time and bytes sent on the sync group (all from the
        sync's start, so with a delayed outer step they cover the iterations it was in flight)."""
        bytes_before, exposed_before = self._sync_starts.pop(records[0].sync_iteration, (0, 0.0))  # (0, 0): resumed
        values = {**self.meeting, "sync/exposed ms": 1000 * (self.exposed_sync_seconds() - exposed_before),
                  "sync/bytes": float(self.counter.snapshot().get("sync", 0) - bytes_before)}
        print_rank_last(sync_summary(iteration, records, len(self.sync.units), self.meeting)
                        + f" exposed ms: {values['sync/exposed ms']:.4g} | bytes: {values['sync/bytes']:.4g} |")
        norms = [r.averaged_norm for r in records if not r.reset_to_anchor]
        if norms:
            values["sync/pseudo-grad norm mean"] = sum(norms) / len(norms)
            values["sync/pseudo-grad norm max"] = max(norms)
        if records:
            values["sync/outliers"] = float(sum(sum(r.outliers) for r in records))
            for replica in range(len(records[0].weights)):
                values[f"sync/weight replica {replica}"] = sum(r.weights[replica] for r in records) / len(records)
        self._events.append((iteration, values))

    def _outer_vectors(self):
        return {"anchors": [u.anchor for u in self.sync.units], "momenta": [u.momentum for u in self.sync.units]}

    def _outer_state(self) -> dict:
        """Besides anchors and momenta, each module's anomaly detector (per replica in a checkpoint; a replica
        that heals takes its peer's)."""
        return {**super()._outer_state(), "detectors": [d.state_dict() for d in self.sync.detectors]}

    def _load_outer_state(self, state: dict) -> None:
        super()._load_outer_state(state)
        for detector, detector_state in zip(self.sync.detectors, state["detectors"]):
            detector.load_state_dict(detector_state)

    def layout_state_dict(self) -> dict:
        # The sync's first: it completes exchanges in flight, which sets their error-feedback residuals.
        return {"layerwise_sync": self.sync.state_dict(), **super().layout_state_dict()}

    def load_layout_state_dict(self, state: dict) -> None:
        super().load_layout_state_dict(state)
        self.sync.load_state_dict(state["layerwise_sync"])

    def sharded_state_dict(self, entries: dict, saved_replicas: int, loading: bool) -> dict:
        """Anchors and momenta in model space; each module's anomaly detector as an object of its replica (a tied
        output layer's copy under the embedding's name, written by the first stage)."""
        state = super().sharded_state_dict(entries, saved_replicas, loading)
        units = self.sync.units
        for name, vectors in self._outer_vectors().items():
            state[name] = [model_space_tensors(name, unit, None if loading else vector, entries, self.groups.shard)
                           for unit, vector in zip(units, vectors)]
        replica = self._saved_replica(saved_replicas)[0]
        shard_rank = self._rank_among_copies(saved_replicas, self.groups.shard)
        tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        state["detectors"] = [
            replica_object(replica, f"detector.{TIED_TO if unit.name in self.tied_units else unit.name}",
                           detector.state_dict(), (int(unit.name in self.tied_units), tensor_rank, shard_rank))
            for unit, detector in zip(units, self.sync.detectors)]
        return state

    @torch.no_grad()
    def load_sharded_state_dict(self, state: dict) -> None:
        super().load_sharded_state_dict(state)
        for name, vectors in self._outer_vectors().items():
            for unit, vector, loaded in zip(self.sync.units, vectors, state[name]):
                vector.copy_(from_model_space(unit, loaded, unit.owned))
        for detector, detector_state in zip(self.sync.detectors, state["detectors"]):
            detector.load_state_dict(detector_state)

    def outer_steps_in_flight(self) -> int:
        return len(self.sync.delayed)

    def outer_state_numel(self) -> int:
        return sum(unit.outer_state_numel() for unit in self.sync.units)
