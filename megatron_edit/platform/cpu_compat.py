"""Lets megatron-core 0.16, written for CUDA, run on CPU processes with gloo.

megatron-core assumes a GPU in four ways; each is answered here and nowhere else:
  1. `torch.cuda.current_device()` used as a device argument        -> the CPU device;
  2. literal `device="cuda"` in tensor factories, `Tensor.cuda()`   -> a TorchFunctionMode that sends them to CPU;
  3. CUDA RNG state (torch.cuda.* and megatron's tracker helpers)    -> the CPU default generator;
  4. type-string checks such as `grad.type() == 'torch.cuda.FloatTensor'` -> `Tensor.type()` answers in CUDA spelling.
It is switched on once per process by `platform.setup_device` when no GPU is used, never on a GPU run.
"""
import logging

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_state = {"enabled": False, "mode": None}


def cpu_compat_enabled() -> bool:
    return _state["enabled"]


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests made inside megatron-core to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": _CPU}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_original_tensor_type = torch.Tensor.type


def _tensor_type_in_cuda_spelling(self, dtype=None, non_blocking=False, **kwargs):
    """`Tensor.type()` with no argument names CPU tensors as CUDA ones (megatron asserts on that string)."""
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if self.device.type == "cpu" and not name.startswith("torch.cuda."):
            name = "torch.cuda." + name[len("torch."):]
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _cpu_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *_args, **_kwargs):
    torch.set_rng_state(new_state)


def _manual_seed_cpu(seed):
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, which is this function.
    torch.default_generator.manual_seed(int(seed))


def _not_the_shared_generator_warning(record: logging.LogRecord) -> bool:
    # megatron warns when work inside its CUDA RNG fork moves the CPU generator; here the two are one generator.
    return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable_cpu_compat() -> None:
    """Install the compatibility layer in this process (idempotent)."""
    if _state["enabled"]:
        return
    import megatron.core.tensor_parallel.random as megatron_random

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.manual_seed = _manual_seed_cpu
    torch.cuda.manual_seed_all = lambda seed: None  # torch.manual_seed already seeded the CPU
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    megatron_random._get_cuda_rng_state = _cpu_rng_state
    megatron_random._set_cuda_rng_state = _set_cpu_rng_state
    torch.Tensor.type = _tensor_type_in_cuda_spelling
    logging.getLogger(megatron_random.__name__).addFilter(_not_the_shared_generator_warning)
    mode = CudaToCpuMode()
    mode.__enter__()
    _state.update(enabled=True, mode=mode)
