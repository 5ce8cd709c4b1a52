"""Layer-wise synchronization: each module syncs its shard just before its own forward, in sync iterations only.

A forward pre-hook on every synchronized module (embedding, each transformer layer, final norm,
output layer) does, for the shard this rank owns:
    d = anchor - theta            pseudo-gradient, issued as an async all-reduce over the sync group
    d = mean over replicas        (waited for here)
    anchor <- outer step(anchor, d)
    theta <- anchor               written back, then all-gathered in the shard group into the full module
Before finishing module k it issues module k+1's all-reduce, so that collective runs while module k computes.
"""
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_edit.dp.edit.config import LocalSGDConfig
from megatron_edit.dp.edit.groups import EditGroups
from megatron_edit.dp.edit.outer import outer_sgd_step
from megatron_edit.dp.edit.shards import ModuleShard


class _Pending:
    """A module's pseudo-gradient whose sync-group all-reduce is in flight."""

    def __init__(self, pseudo_grad: torch.Tensor, work):
        self.pseudo_grad, self.work = pseudo_grad, work


class LayerwiseSync:
    def __init__(self, units: List[ModuleShard], modules: List[torch.nn.Module], groups: EditGroups,
                 config: LocalSGDConfig):
        self.units, self.groups, self.config = units, groups, config
        self.armed = False
        self.pending: dict = {}
        self.synced: set = set()
        self.trace: Optional[list] = None  # (event, module name) in order, when a test or tool asks for it
        self.exposed_seconds = 0.0
        self.pseudo_grad_norms: List[float] = []
        self._handles = [module.register_forward_pre_hook(self._make_pre_hook(i)) for i, module in enumerate(modules)]
        self._modules = modules

    def enable_trace(self) -> list:
        """Record sync events and each module's forward end (the latter needs a post-hook, so only on request)."""
        self.trace = []
        for unit, module in zip(self.units, self._modules):
            module.register_forward_hook(lambda *_, name=unit.name: self._record("forward_end", name))
        return self.trace

    def _record(self, event: str, name: str) -> None:
        if self.trace is not None:
            self.trace.append((event, name))

    def arm(self) -> None:
        """The coming forward passes belong to a sync iteration."""
        self.armed, self.synced = True, set()

    def disarm(self) -> None:
        if self.armed and len(self.synced) != len(self.units):
            missing = [u.name for i, u in enumerate(self.units) if i not in self.synced]
            raise RuntimeError(f"EDiT sync iteration ended without a forward through {missing}")
        self.armed = False

    def initialize_anchors(self) -> None:
        """anchor <- current parameters (at the end of warm-up); momentum starts at zero."""
        for unit in self.units:
            unit.anchor.copy_(unit.read_full(self.groups.shard)[unit.owned])
            unit.momentum.zero_()

    def _make_pre_hook(self, index: int):
        def hook(module, args):
            if self.armed and index not in self.synced:
                start = time.perf_counter()
                self._issue(index)
                if index + 1 < len(self.units):
                    self._issue(index + 1)  # overlaps with this module's forward
                self._finish(index)
                self.exposed_seconds += time.perf_counter() - start
        return hook

    def _issue(self, index: int) -> None:
        if index in self.pending or index in self.synced:
            return
        unit = self.units[index]
        theta = unit.read_full(self.groups.shard)[unit.owned]
        pseudo_grad = unit.anchor.to(theta.device) - theta
        work = None
        if self.groups.sync is not None:
            work = dist.all_reduce(pseudo_grad, group=self.groups.sync, async_op=True)
        self.pending[index] = _Pending(pseudo_grad, work)
        self._record("issue", unit.name)

    def _finish(self, index: int) -> None:
        unit, pending = self.units[index], self.pending.pop(index)
        if pending.work is not None:
            pending.work.wait()
        pseudo_grad = pending.pseudo_grad.div_(self.groups.num_replicas)
        self._record_norm(pseudo_grad)
        pseudo_grad = pseudo_grad.to(unit.anchor.device)
        outer_sgd_step(unit.anchor, unit.momentum, pseudo_grad, self.config.outer_lr, self.config.outer_momentum,
                       self.config.outer_nesterov)
        full = torch.empty(unit.shard_numel * self.groups.shard_size, dtype=torch.float32, device=unit.device)
        dist.all_gather_into_tensor(full, unit.anchor.to(unit.device), group=self.groups.shard)
        unit.write_full(full)
        self.synced.add(index)
        self._record("synced", unit.name)

    def _record_norm(self, pseudo_grad: torch.Tensor) -> None:
        """Norm of the module's whole averaged pseudo-gradient: this shard's squares summed over the shard group."""
        squares = pseudo_grad.float().pow(2).sum().reshape(1)
        dist.all_reduce(squares, group=self.groups.shard)
        self.pseudo_grad_norms.append(squares.sqrt().item())
