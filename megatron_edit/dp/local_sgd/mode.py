"""What every local-SGD mode (EDiT, A-EDiT, DiLoCo, Post-Local-SGD) does the same way.

M replicas, each sharded over a shard group of ranks (DDP and the optimizer see only that group), linked by
the sync group (groups.py). Warm-up (iterations <= W) is synchronous data parallelism over all replicas:
DDP reduces gradients in the shard group and `finalize_model_grads` then averages this rank's gradient shard
over the sync group (megatron-core's distributed-optimizer-instance scheme). After warm-up gradients stay
inside the replica; how and when replicas meet is the subclass's business, except that training always ends
with a sync (`_final_sync`), so every replica finishes on the same model.
"""
import abc
import collections
import contextlib
import datetime
from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads

from megatron_edit.dp import comm_stats
from megatron_edit.dp.base import StepPlan
from megatron_edit.dp.ddp import SynchronousDataParallel
from megatron_edit.dp.local_sgd.config import SIXTEEN_STEP_FP32_RECIPE, LocalSGDConfig
from megatron_edit.dp.local_sgd.exchange import ProcessGroupTransport, SyncExchange
from megatron_edit.dp.local_sgd import torchft_replicas
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.inner_lr import LocalStepLR
from megatron_edit.dp.local_sgd.schedule import SyncSchedule
from megatron_edit.dp.local_sgd.members import ProcessGroupMembers
from megatron_edit.dp.local_sgd.sharded_state import replica_entries, replica_object
from megatron_edit.errors import require
from megatron_edit.platform import mcore_internals

# Synchronous iterations first, as a fraction of training: at a quarter, EDiT at H=16 came within 0.5% of DDP's
# validation loss on the benchmark corpus, against 6% with 5% (docs/baselines.md: "Choosing H, the outer optimizer
# and warm-up").
DEFAULT_WARMUP_FRACTION = 0.25
# What the warm-up's gradient average sends unless told, with error feedback: int2 gradients kept that quality at
# 1/16 of the bytes (docs/low_communication.md).
DEFAULT_WARMUP_CODEC = "int2"


def _gradient_segments(buffer, bucket, start: int, numel: int) -> List[Tuple[slice, List[slice]]]:
    """[start, start + numel) of a gradient bucket cut into the vectors a codec exchanges: a word embedding tied to
    the output layer on another pipeline stage alone (its copies sit among other parameters on the two stages, and
    must be quantized alike), the rest between. Each with its tensor-replicated ranges: gradients of parameters
    every tensor rank holds whole (megatron-core leaves them unmarked by `tensor_model_parallel`), which a codec
    quantizes in blocks of their own so their copies stay the same on every tensor rank."""
    spans = []  # (begin, end, tied, tensor-replicated) of each parameter inside the range, by position
    for param, first, last in mcore_internals.params_in_bucket(buffer, bucket):
        begin, end = max(first, start), min(last, start + numel)
        if begin < end:
            spans.append((begin, end, getattr(param, "shared_embedding", False),
                          not getattr(param, "tensor_model_parallel", False)))
    spans.sort()
    cuts = sorted({start, start + numel} | {edge for begin, end, tied, _ in spans if tied for edge in (begin, end)})
    segments = []
    for low, high in zip(cuts, cuts[1:]):
        replicated = [slice(max(b, low) - low, min(e, high) - low) for b, e, _, rep in spans
                      if rep and max(b, low) < min(e, high)]
        segments.append((slice(low - start, high - start), replicated))
    return segments


class LocalSGDDataParallel(SynchronousDataParallel):
    """Synchronous data parallelism inside each replica (DDP and the optimizer on the replica's groups)."""
    name = ""
    fault_kinds = SynchronousDataParallel.fault_kinds | {"bad-data", "hang"}
    cross_replica_group = "sync"
    accepts_penalty = False  # EDiT's pseudo-gradient penalty flags
    exchanges_pseudo_gradients = True  # through self.exchange (--sync-dtype); Post-Local-SGD averages parameters
    delays_outer_step = False  # --sync-delay-steps
    syncs_in_fragments = False  # --sync-fragments
    replicas_as_jobs = True
    syncs_on_step_count = True  # A-EDiT's trigger is the clock: it takes no ramp of intervals
    # Post-Local-SGD's: H=16 as EDiT's paper, parameters averaged in fp32 (the outer step's flags do not apply)
    defaults = SIXTEEN_STEP_FP32_RECIPE

    def __init__(self, ddp_config, transformer_config, local_sgd: LocalSGDConfig, groups: LocalSGDGroups):
        super().__init__(ddp_config, transformer_config)
        self.local_sgd, self.groups = local_sgd, groups
        self.schedule = SyncSchedule.of(local_sgd)
        self.pseudo_gradient_hooks: List[Callable[[torch.Tensor, int], None]] = []  # (pseudo-gradient, sync iteration)
        self.pg_collection = groups.replica_process_groups()  # DDP and the optimizer see one replica
        self.counter = comm_stats.install()
        self.counter.name_group(groups.shard, "shard")
        self.counter.name_group(groups.sync, "sync")
        self.counter.name_group(groups.sync_exchange, "sync")
        self.counter.name_group(groups.sync_gather, "sync")
        self.counter.name_group(groups.replica, "replica")
        self.exchange = SyncExchange(ProcessGroupTransport(groups.exchange, groups.gather), local_sgd.sync_dtype,
                                     local_sgd.sync_error_feedback, local_sgd.topk_fraction)
        # A compressed warm-up always carries its error: gradients compressed step after step drift without it.
        self.warmup_exchange = SyncExchange(ProcessGroupTransport(groups.exchange, groups.gather),
                                            local_sgd.warmup_grad_dtype, True, local_sgd.topk_fraction)
        self._warmup_segments: Dict[tuple, list] = {}  # (chunk, bucket) -> what the warm-up exchanges of it
        self.members = ProcessGroupMembers(groups.sync)
        self.in_warmup = local_sgd.warmup_iters > 0
        self.local_steps_since_sync = 0  # local (post-warm-up) steps this replica took since the last sync
        self.blocked_sync_seconds = 0.0  # training time spent in blocking syncs, in all
        self._bytes_at_log, self._exposed_at_log = self.counter.snapshot(), 0.0
        self._iterations_since_log = 0
        self._events: List[tuple] = []
        self.replica_jobs = None  # TorchftReplicas when each replica is its own launch (attach_replica_jobs)
        self.iteration = 0  # the last iteration this replica completed
        self.healed = False  # this replica took a live peer's state in the quorum of the sync under way
        self.meeting: Dict[str, float] = {}  # who met at the sync under way, for its log line
        self._present_before = None
        self.layout: Tuple[int, ...] = ()  # what replica jobs must share (attach_replica_jobs)

    @classmethod
    def validate(cls, args) -> None:
        """Fills in `model_shard_group_size`, `num_model_replicas` (= sync group size), the flags of the mode's
        recipe the user left out (`defaults`) and the codecs."""
        super().validate(args)
        dp = args.data_parallel_size
        if args.model_shard_group_size is None:  # the data-parallel ranks of one node
            args.model_shard_group_size = max(1, min(dp, args.local_world_size // (
                args.tensor_model_parallel_size * args.pipeline_model_parallel_size)))
        shard = args.model_shard_group_size
        require(shard >= 1 and dp % shard == 0,
                f"--model-shard-group-size {shard} does not divide the data-parallel size {dp} "
                f"(world {args.world_size} / TP {args.tensor_model_parallel_size} / PP "
                f"{args.pipeline_model_parallel_size}); pick a divisor of {dp}")
        args.num_model_replicas = dp // shard
        jobs = args.replica_coordinator == "torchft"
        # Replica jobs meet in a quorum at every sync and exchange fp32 through torchft: syncs many steps apart.
        (SIXTEEN_STEP_FP32_RECIPE if jobs else cls.defaults).fill(args, args.num_model_replicas)
        cls._resolve_codecs(args)
        if jobs:
            torchft_replicas.validate(args)
        require(args.local_sgd_sync_interval >= 1, "--local-sgd-sync-interval must be >= 1")
        require(args.local_sgd_lr_scale > 0, f"--local-sgd-lr-scale must be positive, got {args.local_sgd_lr_scale}")
        initial = args.local_sgd_initial_sync_interval
        require(initial is None or 1 <= initial <= args.local_sgd_sync_interval,
                f"--local-sgd-initial-sync-interval {initial} must be in [1, H={args.local_sgd_sync_interval}]")
        require(initial is None or args.sync_fragments == 1,
                "--local-sgd-initial-sync-interval ramps whole-model syncs; staggered --sync-fragments start at a "
                "fixed H: drop one of the two")
        require(initial is None or cls.syncs_on_step_count,
                f"--local-sgd-initial-sync-interval: {cls.name} syncs on a clock (--aedit-sync-seconds), not on a "
                "step count; use --dp-mode edit, diloco or post-local-sgd")
        require(args.local_sgd_warmup_grad_dtype == "fp32" or args.replica_coordinator != "torchft",
                "--local-sgd-warmup-grad-dtype: replica jobs (--replica-coordinator torchft) have no warm-up")
        require(not args.overlap_param_gather,
                f"--overlap-param-gather applies to --dp-mode ddp: {cls.name}'s syncs write parameters the deferred "
                "all-gather would overwrite; drop the flag (--overlap-grad-reduce still overlaps)")
        cls._resolve_warmup(args)
        require(args.outer_lr > 0 and 0 <= args.outer_momentum < 1,
                "--outer-lr must be > 0 and --outer-momentum in [0, 1)")
        require(args.sync_dtype == "fp32" or cls.exchanges_pseudo_gradients,
                f"--sync-dtype {args.sync_dtype}: {cls.name} averages parameters, not pseudo-gradients; "
                "use --dp-mode edit, aedit or diloco")
        require(args.sync_delay_steps == 0 or cls.delays_outer_step,
                f"--sync-delay-steps: {cls.name} synchronizes the whole model at once; the delayed outer step is "
                "applied module by module, use --dp-mode edit or aedit")
        require(args.sync_fragments == 1 or cls.syncs_in_fragments,
                f"--sync-fragments: {cls.name} synchronizes the whole model at once; staggered fragments are EDiT's "
                "module-wise sync on a step count, use --dp-mode edit")
        require(1 <= args.sync_fragments <= args.local_sgd_sync_interval,
                f"--sync-fragments {args.sync_fragments} must be in [1, H={args.local_sgd_sync_interval}]: each "
                "fragment syncs at its own iteration of the H")
        require(not args.sync_error_feedback or args.sync_dtype != "fp32",
                "--sync-error-feedback carries what a codec drops: use it with --sync-dtype bf16, int8, int4, int2 "
                "or topk")
        require(args.sync_dtype != "topk" or args.sync_error_feedback,
                "--sync-dtype topk sends a few % of each pseudo-gradient: add --sync-error-feedback so the rest is "
                "carried into the next syncs, not dropped")
        require(0 < args.sync_topk_fraction <= 1, "--sync-topk-fraction must be in (0, 1]")
        penalty = [flag for flag, on in [("--edit-anomaly-elimination", args.edit_anomaly_elimination),
                                         ("--edit-weighted-average", args.edit_weighted_average),
                                         ("--edit-pseudo-grad-clip", args.edit_pseudo_grad_clip is not None)] if on]
        require(not penalty or cls.accepts_penalty,
                f"{', '.join(penalty)}: the pseudo-gradient penalty is EDiT's; use --dp-mode edit or aedit")

    @staticmethod
    def _resolve_codecs(args) -> None:
        """What the recipe leaves to the codecs: error feedback with any codec but fp32, and DEFAULT_WARMUP_CODEC
        for the warm-up's gradients (fp32 for replica jobs, which have no warm-up)."""
        jobs = args.replica_coordinator == "torchft"
        if args.sync_error_feedback is None:
            args.sync_error_feedback = args.sync_dtype != "fp32"
        if args.local_sgd_warmup_grad_dtype is None:
            args.local_sgd_warmup_grad_dtype = "fp32" if jobs else DEFAULT_WARMUP_CODEC

    @staticmethod
    def _resolve_warmup(args) -> None:
        """W from --local-sgd-warmup-iters, or --local-sgd-warmup-fraction of --train-iters, or the default fraction."""
        fraction = args.local_sgd_warmup_fraction
        require(fraction is None or args.local_sgd_warmup_iters is None,
                "give --local-sgd-warmup-iters or --local-sgd-warmup-fraction, not both")
        require(fraction is None or 0 <= fraction <= 1, "--local-sgd-warmup-fraction must be in [0, 1]")
        if args.local_sgd_warmup_iters is None:
            fraction = DEFAULT_WARMUP_FRACTION if fraction is None else fraction
            args.local_sgd_warmup_iters = int(fraction * args.train_iters)
        require(args.local_sgd_warmup_iters >= 0, "--local-sgd-warmup-iters must be >= 0")

    @classmethod
    def fault_replicas(cls, args) -> int:
        return args.num_replicas if args.replica_coordinator == "torchft" else args.num_model_replicas

    @classmethod
    def check_resume(cls, meta: dict, args):
        if meta["model_shard_group_size"] != args.model_shard_group_size:
            return [f"model_shard_group_size {meta['model_shard_group_size']} vs {args.model_shard_group_size} "
                    "(replicas may come and go, their sharding may not change)"]
        return []

    @classmethod
    def from_args(cls, args, ddp_config, transformer_config):
        groups = LocalSGDGroups.from_parallel_state(datetime.timedelta(minutes=args.distributed_timeout_minutes))
        jobs = args.replica_coordinator == "torchft"
        mode = cls(ddp_config, transformer_config, LocalSGDConfig.from_args(args), groups, **cls.mode_configs(args))
        if jobs:
            mode.attach_replica_jobs(args)
        return mode

    @classmethod
    def mode_configs(cls, args) -> dict:
        """A subclass's own configuration objects, as constructor keywords."""
        return {}

    def attach_replica_jobs(self, args) -> None:
        """This launch is replica `--replica-id`; the sync group is torchft's quorum (torchft_replicas.py)."""
        device = torch.device("cuda" if args.device_type == "cuda" else "cpu")
        self.replica_jobs = torchft_replicas.TorchftReplicas(args, device, self.heal_state, self.load_heal_state)
        self.exchange.transport = torchft_replicas.TorchftTransport(self.replica_jobs)
        self.members = torchft_replicas.TorchftMembers(self.replica_jobs, args.replica_index, args.num_replicas)
        self.data_slot = (args.replica_index, args.num_replicas)
        self.layout = torchft_replicas.layout(args)

    @property
    def has_peers(self) -> bool:
        """A single replica has no one to synchronize with: it trains exactly like plain data parallelism."""
        return self.groups.sync is not None or self.replica_jobs is not None

    def train_data_layout(self):
        """A replica launched on its own reads its slot's share of every global batch, as its ranks would in one
        launch of all the replicas."""
        if self.replica_jobs is None:
            return super().train_data_layout()
        replica, replicas = self.data_slot
        dp_rank, dp_size = super().train_data_layout()
        return replica * dp_size + dp_rank, replicas * dp_size

    def join(self):
        """A replica launched on its own meets the others before training: at a sync like theirs, in whose quorum it
        heals from a live peer if it is behind (then it continues after the peer's iteration, returned)."""
        if self.replica_jobs is None:
            return None
        self._join_sync()
        return self.iteration if self.healed else None

    def _join_sync(self) -> None:
        """Take part in the others' next sync (a mode whose syncs follow an iteration: one now)."""
        self._final_sync(self.iteration)

    def heal_state(self) -> dict:
        """What a replica joining late takes from this one, at the quorum of a sync: the outer state, which every
        replica holds alike, and where training stands (its own inner optimizer starts afresh)."""
        return {"iteration": self.iteration, "layout": self.layout, **self._outer_state()}

    @torch.no_grad()
    def load_heal_state(self, state: dict) -> None:
        torchft_replicas.require_same_layout(self.layout, state["layout"], "the replica it heals from")
        self._load_outer_state(state)
        for view, values in self._consensus_views():
            view.write_full(values)
        self.iteration, self.local_steps_since_sync, self.healed = state["iteration"], 0, True
        if dist.get_rank() == 0:
            print(f" replica {self.data_slot[0]} took a live replica's state: continuing after iteration "
                  f"{self.iteration}", flush=True)

    def _meet(self) -> int:
        """Start a sync: the replicas taking part (with torchft, once its quorum met, all running one layout)."""
        self.healed = False
        if self.replica_jobs is None:
            present = self.groups.num_replicas
        else:
            present = self.replica_jobs.quorum()
            self.members.contributing = not self.healed
            self._check_layouts()
        self.meeting = {"sync/replicas": float(present)}
        if self._present_before is not None and present != self._present_before:  # replicas left or joined
            self.meeting["sync/replicas change"] = float(present - self._present_before)
        self._present_before = present
        return present

    def _check_layouts(self) -> None:
        """Replica jobs exchange rank k's shard with rank k's: this one refuses to go on when its layout is not the
        one most replicas present run (on a tie, the lowest --replica-id's)."""
        rows, present = self.members.gather(torch.tensor(self.layout, dtype=torch.float64))
        layouts = [tuple(int(v) for v in row) for row, here in zip(rows.tolist(), present) if here]
        if layouts:
            reference = max(layouts, key=layouts.count)  # max keeps the first of equal counts
            torchft_replicas.require_same_layout(self.layout, reference, "the other replicas")

    def _contributors(self, device: torch.device) -> int:
        """How many replicas' pseudo-gradients the sync's sums hold: all of them, except that one healing in this
        sync's quorum adds none (its parameters are the anchor)."""
        if self.members.always_all_present:
            return self.members.slots
        return max(sum(self.members.gather(torch.zeros(0, device=device))[1]), 1)

    def _commit(self) -> bool:
        """Whether to apply the sync (with torchft: every replica of the quorum completed its collectives)."""
        return self.replica_jobs is None or self.replica_jobs.commit()

    def synchronous_warmup_iters(self) -> int:
        return self.schedule.warmup_iters if self.has_peers else 0

    def replica(self) -> int:
        return self.data_slot[0] if self.replica_jobs is not None else self.groups.replica_index

    def plan(self, iteration: int, finished: bool) -> StepPlan:
        warmup = self.schedule.is_warmup(iteration)
        if warmup or not self.has_peers:
            return StepPlan(iteration, train=not finished, warmup=warmup)
        return self._local_plan(iteration, finished)

    def _local_plan(self, iteration: int, finished: bool) -> StepPlan:
        """plan once replicas train apart. Here: a sync at the end of every H-th local step; when training is over,
        a final sync if any replica stepped since the last one (a checkpoint taken after the final sync resumes
        without another)."""
        if finished:
            return StepPlan(iteration, train=False, final_sync=self.local_steps_since_sync > 0)
        return StepPlan(iteration, sync_after=self.schedule.syncs_after(iteration))

    def build_optimizer(self, model_chunks, optimizer_config):
        optimizer = super().build_optimizer(model_chunks, optimizer_config)
        self.local_step_lr = LocalStepLR(optimizer.param_groups, self.local_sgd.local_lr_scale)
        return optimizer

    def before_step(self, plan: StepPlan) -> None:
        self.in_warmup = plan.warmup
        self.local_step_lr.apply(local=not plan.warmup and self.has_peers)

    def finish(self, plan: StepPlan) -> None:
        if plan.final_sync:
            self._final_sync(plan.iteration - 1)

    @abc.abstractmethod
    def _begin_local_steps(self) -> None:
        """The replicas are about to part (end of warm-up) or start over together: keep what they agree on now."""

    def begin_from_loaded_weights(self) -> None:
        self.local_steps_since_sync = 0
        self._begin_local_steps()

    @abc.abstractmethod
    def _final_sync(self, iteration: int) -> None:
        """Bring every replica onto one model after the last iteration, `iteration`."""

    @abc.abstractmethod
    def _outer_vectors(self) -> Dict[str, List[torch.Tensor]]:
        """What the mode keeps beside the model, by name: flat vectors (one per view or module shard), the same in
        every replica."""

    def _outer_state(self) -> dict:
        """What every replica holds alike: the outer vectors (and what a subclass adds)."""
        return {name: [v.cpu().clone() for v in vectors] for name, vectors in self._outer_vectors().items()}

    def _load_outer_state(self, state: dict) -> None:
        for name, vectors in self._outer_vectors().items():
            for vector, saved in zip(vectors, state[name]):
                vector.copy_(saved)

    @abc.abstractmethod
    def _consensus_views(self) -> List[tuple]:
        """(FlatParams view, its agreed flat fp32 values on this rank) for every view, once local steps began."""

    @contextlib.contextmanager
    def consensus(self):
        """Between syncs the replicas differ; what they agree on is the last sync's result (the anchor). During
        warm-up, and with a single replica, the model itself is that."""
        if self.in_warmup or not self.has_peers or self.local_steps_since_sync == 0:
            yield
            return
        views = self._consensus_views()
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

    def finalize_model_grads(self, model, num_tokens=None, **_):
        finalize_model_grads(model, num_tokens, pg_collection=self.pg_collection)
        if self.in_warmup and self.has_peers:
            self._average_gradients_over_replicas(model)

    @torch.no_grad()
    def _average_gradients_over_replicas(self, model) -> None:
        """Warm-up: each rank averages, over the sync group, the gradient shard its optimizer reads (and the host-held
        gradients of the parameters outside DDP's buckets), through the warm-up's exchange (an fp32 all-reduce, or a
        codec with error feedback: --local-sgd-warmup-grad-dtype)."""
        shard_rank, shard_size = dist.get_rank(self.groups.shard), self.groups.shard_size
        in_flight = []
        for c, chunk in enumerate(model):
            for k, (buffer, bucket) in enumerate(mcore_internals.gradient_buckets(chunk)):
                grads, start = mcore_internals.bucket_grads(bucket), 0
                if self.ddp_config.use_distributed_optimizer:
                    size = grads.numel() // shard_size
                    start = shard_rank * size
                    grads = grads[start:start + size]
                if (c, k) not in self._warmup_segments:  # a bucket's parameters and shard never change
                    self._warmup_segments[c, k] = _gradient_segments(buffer, bucket, start, grads.numel())
                for segment, replicated in self._warmup_segments[c, k]:
                    part = grads[segment]
                    values = part if part.dtype == torch.float32 else part.float()
                    key = ("grads", c, k, segment.start)
                    in_flight.append((part, self.warmup_exchange.start(key, values, replicated)))
        for index, param in enumerate(self.unbucketed_params):  # a replica is one rank here (--swap-layers)
            values = param.main_grad.to(param.compute_device).view(-1)
            in_flight.append((param.main_grad.view(-1), self.warmup_exchange.start(("host grads", index), values, [])))
        for part, exchange in in_flight:
            part.copy_(exchange.wait().div_(self.groups.num_replicas))

    def step_group(self):
        return self.groups.whole_replica  # replicas step apart: no collective across them

    def non_finite_message(self, iteration: int, what: str, rank: int) -> str:
        return f"{super().non_finite_message(iteration, what, rank)} (replica {self.groups.replica_index})"

    def after_step(self, plan: StepPlan) -> None:
        self.iteration = plan.iteration
        if self.replica_jobs is not None:
            self.replica_jobs.watchdog.beat()
        if not self.in_warmup:
            self.local_steps_since_sync += 1
        self._iterations_since_log += 1

    def _progress(self) -> dict:
        return {"local_steps_since_sync": self.local_steps_since_sync, "in_warmup": self.in_warmup}

    def _load_progress(self, progress: dict) -> None:
        self.local_steps_since_sync, self.in_warmup = progress["local_steps_since_sync"], progress["in_warmup"]

    def state_dict(self) -> dict:
        return {**self._progress(), **self.layout_state_dict(), **self._outer_state()}

    @torch.no_grad()
    def load_state_dict(self, state: dict, same_replica: bool) -> None:
        """Step counters are per replica and come from the replica this one continues; so do error-feedback
        residuals, which are dropped when the replica count (and with it the exchange's chunking) changed. The
        outer state is the same in every replica: it carries over whatever the replica count."""
        self._load_progress(state)
        self.load_layout_state_dict(state)
        self._load_outer_state(state)

    def layout_state_dict(self) -> dict:
        return {"exchange": {"replicas": self.groups.num_replicas, **self.exchange.state_dict(),
                             "warmup": self.warmup_exchange.state_dict()}}

    def load_layout_state_dict(self, state: dict) -> None:
        saved = state["exchange"]
        if saved["replicas"] == self.groups.num_replicas:
            self.exchange.load_state_dict(saved)
            if "warmup" in saved:  # checkpoints written before the warm-up had a codec hold no residuals for it
                self.warmup_exchange.load_state_dict(saved["warmup"])

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
        """The step counters, one object per replica."""
        return {"progress": replica_object(self._saved_replica(saved_replicas)[0], "local_sgd", self._progress(),
                                           self._rank_among_copies(saved_replicas, self.groups.whole_replica))}

    def load_sharded_state_dict(self, state: dict) -> None:
        self._load_progress(state["progress"])

    def pop_events(self):
        events, self._events = self._events, []
        return events

    def exposed_sync_seconds(self) -> float:
        """Training time spent waiting on syncs so far, in all (a mode that overlaps syncs says how much it waited)."""
        return self.blocked_sync_seconds

    def metrics(self) -> Dict[str, float]:
        """Per iteration since the last log line: bytes on each group and exposed sync time."""
        now = self.counter.snapshot()
        steps = max(self._iterations_since_log, 1)
        sent = collections.Counter(now)
        sent.subtract(self._bytes_at_log)
        exposed = self.exposed_sync_seconds()
        values = {
            "shard bytes/iter": sent["shard"] / steps,
            "sync bytes/iter": sent["sync"] / steps,
            "exposed sync ms/iter": 1000 * (exposed - self._exposed_at_log) / steps,
        }
        self._bytes_at_log, self._exposed_at_log, self._iterations_since_log = now, exposed, 0
        return values
