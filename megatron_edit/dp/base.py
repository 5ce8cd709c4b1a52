"""The narrow interface between the train loop and a data-parallel mode."""
import abc
from typing import Dict, List

import torch


class DataParallelMode(abc.ABC):
    """Hooks the train loop calls, in this order: wrap_model, build_optimizer, then every
    iteration after_optimizer_step; metrics() is read at every log line."""

    name: str = ""

    @abc.abstractmethod
    def wrap_model(self, model_chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        """Wrap the model chunks of this rank in whatever reduces their gradients."""

    @abc.abstractmethod
    def build_optimizer(self, model_chunks: List[torch.nn.Module], optimizer_config):
        """The inner optimizer over the wrapped chunks."""

    def after_optimizer_step(self, iteration: int) -> None:
        """Called once the inner optimizer has stepped for `iteration` (1-based)."""

    def metrics(self) -> Dict[str, float]:
        """Numbers for the log line and trackers (e.g. bytes communicated)."""
        return {}
