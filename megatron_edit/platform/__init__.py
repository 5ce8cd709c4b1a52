"""Device abstraction: CUDA/NCCL when a GPU is used, CPU/gloo (with a compatibility layer) otherwise.

Everything that differs between the two lives here, so the rest of the code asks
`platform` for the device, the backend, memory and synchronization instead of calling torch.cuda.
"""
import torch

from megatron_edit.errors import UsageError

from megatron_edit.platform.cpu_compat import cpu_compat_enabled, enable_cpu_compat


def resolve_device_type(requested: str) -> str:
    """Turn `--device auto|cuda|cpu` into 'cuda' or 'cpu', with a one-line error for an impossible request."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is visible; use --device cpu or auto")
    return requested


def setup_device(device_type: str, local_rank: int) -> torch.device:
    """Bind this process to its device (more processes than devices share them, in turn); on CPU switch on
    megatron-core's compatibility layer."""
    if device_type == "cuda":
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    enable_cpu_compat()
    return torch.device("cpu")


def distributed_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def synchronize() -> None:
    """Wait for queued device work, so wall-clock timings measure it."""
    if torch.cuda.is_available() and not cpu_compat_enabled():
        torch.cuda.synchronize()


def empty_cache() -> None:
    """Give the device's cached free memory back (Megatron-LM's --empty-unused-memory-level); a CPU keeps none."""
    if torch.cuda.is_available() and not cpu_compat_enabled():
        torch.cuda.empty_cache()


def max_memory_allocated_bytes() -> int:
    """Peak device memory of this process: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if torch.cuda.is_available() and not cpu_compat_enabled():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bf16_supported(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


__all__ = [
    "bf16_supported",
    "cpu_compat_enabled",
    "distributed_backend",
    "empty_cache",
    "enable_cpu_compat",
    "max_memory_allocated_bytes",
    "resolve_device_type",
    "setup_device",
    "synchronize",
]
