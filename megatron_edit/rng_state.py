"""Every random number generator a training rank draws from, as one picklable value (for checkpoints), under the
names Megatron-LM's checkpoints use, so RNG states move between the two."""
import random

import numpy as np
import torch
from megatron.core import tensor_parallel


def rng_state() -> dict:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state() if cuda else None,
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
