"""megatron-core's first import, without torch's compiler where there is no GPU to compile for.

megatron-core wraps its fused kernels in `torch.compile` as their modules import (megatron.core.jit's `jit_fuser`),
and that alone loads torch's inductor: about a fifth of a process's start-up, paid by every rank of every launch. On
a machine without CUDA those kernels run eagerly or not at all, so here `torch.compile` is the identity while the
`megatron.core` package imports, whenever that first happens (a tool that never imports it pays nothing);
`jit_fuser` keeps the identity for the rest of the process, as megatron-core's own `disable_jit_fuser` would leave
it. On a CUDA machine nothing changes.
"""
import importlib.abc
import importlib.util
import sys

import torch


def _eager(model=None, **options):
    """torch.compile's signature, compiling nothing: `@torch.compile` and `@torch.compile(...)` alike."""
    return (lambda function: function) if model is None else model


class _EagerMegatronCore(importlib.abc.MetaPathFinder):
    """Finds `megatron.core` as Python would, and runs its package's code with torch.compile as the identity."""

    def find_spec(self, name, path, target=None):
        if name != "megatron.core":
            return None
        sys.meta_path.remove(self)  # once; and the lookup below must not come back here
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_eagerly(module):
            compile_ = torch.compile
            torch.compile = _eager
            try:
                exec_module(module)  # its __init__ imports the fused kernels
            finally:
                torch.compile = compile_

        spec.loader.exec_module = exec_eagerly
        return spec


def import_megatron_core_eagerly() -> None:
    """On a machine without CUDA, megatron-core's first import (if any) happens with torch.compile as the identity."""
    if not torch.cuda.is_available() and "megatron.core" not in sys.modules:
        sys.meta_path.insert(0, _EagerMegatronCore())
