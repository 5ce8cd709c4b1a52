"""megatron-core's first import, without torch's compiler where there is no GPU to compile for.

megatron-core wraps its fused kernels in `torch.compile` as their modules import (megatron.core.jit's `jit_fuser`),
and that alone loads torch's inductor: about a fifth of a process's start-up, paid by every rank of every launch. On
a machine without CUDA those kernels run eagerly or not at all, so here `torch.compile` is the identity while
megatron-core's modules import; `jit_fuser` keeps the identity for the rest of the process, as megatron-core's own
`disable_jit_fuser` would leave it. On a CUDA machine nothing changes.
"""
import sys

import torch


def _eager(model=None, **options):
    """torch.compile's signature, compiling nothing: `@torch.compile` and `@torch.compile(...)` alike."""
    return (lambda function: function) if model is None else model


def import_megatron_core() -> None:
    """Imports megatron-core (its package, which pulls in the fused kernels), eagerly on a machine without CUDA."""
    if torch.cuda.is_available() or "megatron.core" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = _eager
    try:
        import megatron.core  # noqa: F401  (its __init__ imports the fused kernels)
    finally:
        torch.compile = compile_
