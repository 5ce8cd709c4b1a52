"""The narrow interface between the train loop and a data-parallel mode."""
import abc
from typing import Dict, List, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads


class DataParallelMode(abc.ABC):
    """Hooks the train loop calls: wrap_model, build_optimizer and wrap_train_batches once; then every iteration
    begin_iteration, finalize_model_grads (inside the schedule, after backward) and after_optimizer_step;
    metrics() at every log line and pop_events() after every iteration."""

    name: str = ""

    @classmethod
    @abc.abstractmethod
    def from_args(cls, args, ddp_config, transformer_config) -> "DataParallelMode":
        """Build the mode from the parsed flags (after torch.distributed and parallel_state are up)."""

    @abc.abstractmethod
    def wrap_model(self, model_chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        """Wrap the model chunks of this rank in whatever reduces their gradients."""

    @abc.abstractmethod
    def build_optimizer(self, model_chunks: List[torch.nn.Module], optimizer_config):
        """The inner optimizer over the wrapped chunks."""

    def wrap_train_batches(self, batches, args):
        """The training micro-batch stream this rank consumes (a mode may alter it, e.g. to inject faults)."""
        return batches

    def begin_iteration(self, iteration: int, finished: bool) -> bool:
        """Called before `iteration` (1-based), with finished=True once --train-iters have run.
        Returns whether to run it; a mode may end training later than --train-iters says (A-EDiT's final sync)."""
        return not finished

    def finalize_model_grads(self, model, num_tokens=None, **kwargs) -> None:
        """Make gradients ready for the optimizer (megatron-core's schedules call it after backward)."""
        finalize_model_grads(model, num_tokens)

    def after_optimizer_step(self, iteration: int) -> None:
        """Called once the inner optimizer has stepped for `iteration`."""

    def loss_group(self):
        """The ranks whose losses are averaged into the logged loss: those that train one model together."""
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    def state_dict(self) -> dict:
        """What a checkpoint must hold for this mode to continue exactly."""
        return {}

    def load_state_dict(self, state: dict, same_replica: bool) -> None:
        """Restore `state_dict()`; same_replica is False when the number of replicas changed (elastic resume)."""

    def metrics(self) -> Dict[str, float]:
        """Extra numbers for the log line and the tracker (e.g. bytes communicated)."""
        return {}

    def pop_events(self) -> List[Tuple[int, Dict[str, float]]]:
        """Numbers that belong to one event rather than a log interval (e.g. one sync), as (iteration, values),
        each returned once, for the tracker."""
        return []
