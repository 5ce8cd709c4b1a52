"""The narrow interface between the train loop (and the argument checks) and a data-parallel mode."""
import abc
import contextlib
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from megatron_edit.errors import TrainingError


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What the train loop does next (DataParallelMode.plan): train `iteration`, or stop training, after the
    replicas' final sync when `final_sync`."""
    iteration: int
    train: bool = True
    final_sync: bool = False
    warmup: bool = False                  # this step averages gradients over every replica
    sync_fragments: Tuple[int, ...] = ()  # the fragments that synchronize in this step's forward (EDiT)
    sync_after: bool = False              # the whole model synchronizes after this step (Post-Local-SGD, DiLoCo)


@dataclasses.dataclass(frozen=True)
class RankRoles:
    """Where this rank stands in a mode's groups (DataParallelMode.roles): what the train loop reads its data, steps,
    and reduces its losses with."""
    replica: int          # its replica: its place among the replicas that train apart (ddp: its data-parallel rank)
    step_group: object    # the ranks that take one optimizer step together and so agree on whether it is finite
    loss_group: object    # the ranks whose losses make up a logged or validation loss
    train_data: Tuple[int, int]       # (rank, size) over which each global training batch is split
    validation_data: Tuple[int, int]  # (rank, size) over which one validation batch is split
    synchronous_warmup_iters: int = 0  # the iterations (from the first) in which replicas average gradients every
    # step before they train apart (0: none, or every iteration is synchronous), for the training summary


def data_parallel_roles() -> RankRoles:
    """Plain data parallelism's: one step and one loss over every rank, data split over the data-parallel ranks."""
    data = (parallel_state.get_data_parallel_rank(with_context_parallel=True),
            parallel_state.get_data_parallel_world_size(with_context_parallel=True))
    return RankRoles(replica=data[0], step_group=torch.distributed.group.WORLD,
                     loss_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
                     train_data=data, validation_data=data)


class DataParallelMode(abc.ABC):
    """The train loop calls, in this order:

        model = mode.wrap_model(chunks, unbucketed_params)   once: DDP over the mode's groups
        optimizer = mode.build_optimizer(model, config)       once: the inner optimizer
        plan = mode.plan(iteration, finished)                 before each iteration: a StepPlan
        mode.before_step(plan); ...; mode.after_step(plan)    around each step that trains
        mode.finish(plan)                                     once, with the plan that stops: the final sync

    megatron-core's schedule calls finalize_model_grads after backward. `roles()` says which ranks share a loss or a
    step and where data comes from; the rest are questions the loop asks (when to checkpoint, what to evaluate,
    metrics) and the checkpoint's state.
    What a mode's flags may be and how it is built from them is its spec's (dp/__init__.py)."""

    @abc.abstractmethod
    def wrap_model(self, model_chunks: List[torch.nn.Module],
                   unbucketed_params: List[torch.nn.Parameter] = ()) -> List[torch.nn.Module]:
        """Wrap the model chunks of this rank in whatever reduces their gradients. `unbucketed_params` (--swap-layers'
        host-held layers) stay out of DDP's buckets: their gradients accumulate in `param.main_grad` on the host."""

    @abc.abstractmethod
    def build_optimizer(self, model_chunks: List[torch.nn.Module], optimizer_config):
        """The inner optimizer over the wrapped chunks."""

    clock: Callable[[], float] = staticmethod(time.monotonic)  # what wall-clock decisions read (A-EDiT's trigger)


    def roles(self) -> RankRoles:
        """This rank's groups and data slots (ask once the model and optimizer are built)."""
        return data_parallel_roles()

    def plan(self, iteration: int, finished: bool) -> StepPlan:
        """What to do at `iteration` (1-based); finished=True once --train-iters have run. A mode may stop before
        that (A-EDiT: another replica finished) and may end with a final sync."""
        return StepPlan(iteration, train=not finished)

    def before_step(self, plan: StepPlan) -> None:
        """Before the forward passes of a step the plan trains."""

    def finish(self, plan: StepPlan) -> None:
        """Training stops with `plan`: run its final sync, after iteration plan.iteration - 1."""

    def finalize_model_grads(self, model, num_tokens=None, **kwargs) -> None:
        """Make gradients ready for the optimizer (megatron-core's schedules call it after backward)."""
        finalize_model_grads(model, num_tokens)

    def after_step(self, plan: StepPlan) -> None:
        """Once the inner optimizer has stepped for plan.iteration (or skipped it, see on_non_finite_step)."""


    non_finite_remedy = "lower --lr or check the data, and resume from the last checkpoint"

    def on_non_finite_step(self, iteration: int, what: str, rank: int) -> None:
        """Step `iteration` of this rank's step group (roles()) has a non-finite `what` (loss or gradient), first seen on
        global `rank` (--check-for-nan-in-loss-and-grad). Raising stops training; returning skips the step."""
        raise TrainingError(f"{self.non_finite_message(iteration, what, rank)}; the step was not taken: "
                            f"{self.non_finite_remedy}")

    def non_finite_message(self, iteration: int, what: str, rank: int) -> str:
        return f"non-finite {what} at iteration {iteration} on rank {rank}"




    def join(self) -> Optional[int]:
        """Called once before training (after any checkpoint load). A mode whose replicas come and go meets the
        others here; it returns the iteration to continue after when it took over a live replica's state."""
        return None


    def consensus(self):
        """A context in which the model holds what the replicas agree on, for evaluation (and restored after)."""
        return contextlib.nullcontext()

    def checkpoint_due(self, iteration: int, requested: bool) -> Optional[int]:
        """After `iteration`; `requested`: the save interval or --exit-interval asks for a checkpoint here.
        Returns the iteration to file a checkpoint under now (every rank saves together), or None."""
        return iteration if requested else None

    def final_checkpoint(self, iteration: int, last_saved: Optional[int]) -> Optional[int]:
        """The iteration to file the end-of-training checkpoint under, or None when the last save holds it."""
        return None if last_saved == iteration else iteration

    def state_dict(self) -> dict:
        """What a checkpoint must hold for this mode to continue exactly."""
        return {}

    def load_state_dict(self, state: dict, same_replica: bool) -> None:
        """Restore `state_dict()`; same_replica is False when the number of replicas changed (elastic resume)."""

    # torch_dist checkpoints (dist_checkpoint.py): one state dict for all ranks, which reshards at load.
    def checkpoint_model_state(self, model_state: dict, saved_replicas: int) -> dict:
        """A model chunk's sharded state dict as this rank saves it (or, loading, reads it from a checkpoint of
        `saved_replicas` replicas): the data-parallel ranks hold one model here."""
        return model_state

    def sharded_state_dict(self, entries: dict, saved_replicas: int, loading: bool) -> dict:
        """The part of the mode's state that reshards (sharded tensors and objects); `entries`: id(parameter) ->
        the parameter's entry in the model's sharded state dict."""
        return {}

    def load_sharded_state_dict(self, state: dict) -> None:
        """Restore `sharded_state_dict()` as loaded."""

    def layout_state_dict(self) -> dict:
        """The rest of the state: it loads only on the layout (TP, PP, DP, shard group) it was saved on."""
        return self.state_dict()

    def load_layout_state_dict(self, state: dict) -> None:
        self.load_state_dict(state, same_replica=True)

    def begin_from_loaded_weights(self) -> None:
        """The weights came from a checkpoint without this mode's state (--finetune, another --dp-mode,
        Megatron-LM): whatever the mode keeps beside the model starts from them."""

    def outer_steps_in_flight(self) -> int:
        """Outer steps issued and not yet applied on this rank (a checkpoint holding any resumes on its layout)."""
        return 0

    def metrics(self) -> Dict[str, float]:
        """Extra numbers for the log line and the tracker (e.g. bytes communicated)."""
        return {}

    def pop_events(self) -> List[Tuple[int, Dict[str, float]]]:
        """Numbers that belong to one event rather than a log interval (e.g. one sync), as (iteration, values),
        each returned once, for the tracker."""
        return []
