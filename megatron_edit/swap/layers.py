"""`--swap-layers`: the transformer layers' weights live in host memory and come to the device one layer at a time.

Each swapped parameter has a *home*: a host tensor (pinned on a GPU machine) that the optimizer updates, and that
`param.data` is whenever its layer is not computing. A layer is *resident* while a device copy of its weights
exists, and *bound* (`param.data` is that copy) while it computes: from its forward pre-hook to its forward's end,
and again from the end of the next layer's backward (when its own backward is next) until its last gradient has
accumulated. At most `resident` layers are resident at once, the computing one included; after binding a layer
the next `prefetch` layers (in forward or backward order) are fetched on a side stream, evicting the resident
layer needed again farthest in the future. A copy whose parameter was written since it was fetched (an EDiT sync
writing the layer just before its forward: its version counter moved) is fetched again; an optimizer step finds
every layer home and none on the device.

Autograd would keep every device copy alive until the backward: the saved-tensor hooks (`saving_tensors`) store a
swapped weight (or a view of one) as (layer, parameter, view) instead, and re-bind the layer to unpack it.
Gradients: the swapped parameters stay out of megatron-core DDP's buckets (`detached_from_ddp`); each gradient is
added to the parameter's `main_grad`, a host fp32 tensor that megatron-core's optimizer reads as it reads DDP's,
as soon as it has accumulated, and freed on the device. The fp32 main parameters and Adam state the optimizer keeps
for them are made from the homes, so they live on the host and the optimizer steps them there.
"""
import contextlib
import math
import time
from typing import Callable, Dict, List, Optional

import torch

from megatron_edit.errors import require
from megatron_edit.swap.planner import LayerCosts, SwapPlan, plan


class LayerSwapper:
    """The train loop's side: `begin_step()`, the schedule inside `running()`, `before_optimizer_step()`; the
    first step of a run measures and plans."""

    def __init__(self, layers: List[torch.nn.Module], device: torch.device, max_resident: int):
        self.layers, self.device, self.max_resident = layers, device, max_resident
        self.params = [[p for p in layer.parameters()] for layer in layers]
        self.on_gpu = device.type == "cuda"
        self.homes: List[List[torch.Tensor]] = []
        for params in self.params:
            homes = [p.data.to("cpu", copy=True) for p in params]
            if self.on_gpu:
                homes = [home.pin_memory() for home in homes]
            for p, home in zip(params, homes):
                p.data = home
                p.compute_device = device  # where its layer computes (FlatParams' vectors live there)
                p.main_grad = torch.zeros(p.shape, dtype=torch.float32)
                p.register_post_accumulate_grad_hook(self._gradient_hook(len(self.homes)))
            self.homes.append(homes)
        self.layer_bytes = [sum(h.numel() * h.element_size() for h in homes) for homes in self.homes]
        self.resident, self.prefetch = max_resident, max_resident - 1  # until the first step is measured
        self.copies: Dict[int, List[torch.Tensor]] = {}  # resident layer -> device copies of its weights
        self._fetched_versions: Dict[int, List[int]] = {}
        self._ready: Dict[int, Optional[torch.cuda.Event]] = {}
        self.bound: set = set()
        self._bound_storages: Dict[int, tuple] = {}  # storage address of a bound copy -> (layer, parameter index)
        self._grads_left: Dict[int, int] = {}  # bound layer -> gradients still to accumulate in this backward
        self._stream = torch.cuda.Stream(device) if self.on_gpu else None
        self.boundary_hooks: List[Callable[[str, int], None]] = []  # (event, layer) at every layer boundary
        self._measure: Optional[dict] = None  # per-layer seconds while measure_costs() runs
        self._backward_started: Dict[int, float] = {}

    @property
    def swapped_params(self) -> List[torch.nn.Parameter]:
        return [p for params in self.params for p in params]

    def install_hooks(self) -> None:
        """After every other forward pre-hook of the layers (EDiT's sync writes a layer's home just before its
        forward; the copy bound next must be made after that)."""
        for index, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(self._forward_pre_hook(index))
            layer.register_forward_hook(self._forward_hook(index))

    @property
    def resident_bytes(self) -> int:
        return sum(self.layer_bytes[i] for i in self.copies)

    # --- residency -------------------------------------------------------------------------------------------

    def _notify(self, event: str, layer: int) -> None:
        for hook in self.boundary_hooks:
            hook(event, layer)

    def _fetch(self, layer: int, computing: int, backward: bool, keep=()) -> bool:
        """Start copying `layer`'s weights to the device, making room first; False if no slot can be freed."""
        if layer in self.copies:
            return True
        while len(self.copies) >= self.resident:
            victim = self._victim(computing, backward, keep={layer, *keep})
            if victim is None:
                return False
            self._evict(victim)
        start = time.perf_counter()
        if self.on_gpu:
            with torch.cuda.stream(self._stream):
                copies = [home.to(self.device, non_blocking=True) for home in self.homes[layer]]
                self._ready[layer] = torch.cuda.Event()
                self._ready[layer].record(self._stream)
        else:  # host and device are one memory: a copy of its own keeps the bookkeeping honest
            copies = [home.clone() for home in self.homes[layer]]
            self._ready[layer] = None
        self.copies[layer] = copies
        self._fetched_versions[layer] = [param._version for param in self.params[layer]]
        if self._measure is not None:
            if self.on_gpu:
                self._stream.synchronize()
            self._measure["transfer"].append((self.layer_bytes[layer], time.perf_counter() - start))
        self._notify("fetch", layer)
        return True

    def _victim(self, computing: int, backward: bool, keep) -> Optional[int]:
        """The resident layer needed again farthest in the future, among those not computing or wanted now. In a
        forward, a layer before the computing one is next needed in the backward (the lowest, last); in a backward,
        one after it only in the next forward."""
        free = [i for i in self.copies if i not in self.bound and i not in keep]
        if not free:
            return None
        if backward:
            done = [i for i in free if i > computing]
            return max(done) if done else min(free)
        done = [i for i in free if i < computing]
        return min(done) if done else max(free)

    def _evict(self, layer: int) -> None:
        del self.copies[layer], self._fetched_versions[layer], self._ready[layer]
        self._notify("evict", layer)

    def _bind(self, layer: int, backward: bool) -> None:
        if layer in self.bound:
            return
        stale = layer in self.copies and self._fetched_versions[layer] != [p._version for p in self.params[layer]]
        if stale:
            self._evict(layer)
        if not self._fetch(layer, layer, backward):
            raise RuntimeError(f"--swap-layers: no slot for layer {layer} (resident {sorted(self.copies)}, bound "
                               f"{sorted(self.bound)})")
        if self._ready[layer] is not None:
            torch.cuda.current_stream().wait_event(self._ready[layer])
        for index, (param, copy) in enumerate(zip(self.params[layer], self.copies[layer])):
            if self.on_gpu:
                copy.record_stream(torch.cuda.current_stream())  # not reused while the compute stream needs it
            param.data = copy
            self._bound_storages[copy.untyped_storage().data_ptr()] = (layer, index)
        self.bound.add(layer)
        self._grads_left[layer] = len(self.params[layer])  # counted down by the gradient hooks of a backward
        self._notify("bind", layer)
        self._prefetch(layer, backward)

    def _prefetch(self, computing: int, backward: bool) -> None:
        """Fetch the next `prefetch` layers in the direction of the pass, as far as slots can be freed."""
        ahead = list(range(computing - 1, max(computing - 1 - self.prefetch, -1), -1)) if backward else \
            list(range(computing + 1, min(computing + 1 + self.prefetch, len(self.layers))))
        for index, target in enumerate(ahead):
            if not self._fetch(target, computing, backward, keep=ahead[:index]):
                break

    def _unbind(self, layer: int) -> None:
        for param, home, copy in zip(self.params[layer], self.homes[layer], self.copies[layer]):
            param.data = home
            self._bound_storages.pop(copy.untyped_storage().data_ptr(), None)
        self.bound.discard(layer)
        self._grads_left.pop(layer, None)
        self._notify("unbind", layer)

    def release_all(self) -> None:
        """Every layer home and off the device: before an optimizer step, and before an iteration starts."""
        for layer in sorted(self.bound):
            self._unbind(layer)
        for layer in sorted(self.copies):
            self._evict(layer)

    # --- hooks -----------------------------------------------------------------------------------------------

    def _forward_pre_hook(self, layer: int):
        def hook(module, args):
            if layer == 0:  # a new micro-batch (or an evaluation): nothing from the last one is computing
                for bound in sorted(self.bound):
                    self._unbind(bound)
            self._bind(layer, backward=False)
            self._started = self._clock()
        return hook

    def _forward_hook(self, layer: int):
        def hook(module, args, output):
            if self._measure is not None:
                self._measure["forward"][layer] = self._clock() - self._started
            self._notify("forward_end", layer)
            if layer < len(self.layers) - 1 or not (module.training and torch.is_grad_enabled()):
                self._unbind(layer)
            else:  # the last layer's backward comes next: it stays bound
                self._prefetch(layer, backward=True)
                self._backward_started[layer] = self._clock()
        return hook

    def _gradient_hook(self, layer: int):
        def hook(param):
            param.main_grad.add_(param.grad.to(param.main_grad.device))
            param.grad = None
            self._grads_left[layer] -= 1
            if self._grads_left[layer] == 0:  # this layer's backward is over: the one below is next
                if self._measure is not None:
                    self._measure["backward"][layer] = self._clock() - self._backward_started[layer]
                self._notify("backward_end", layer)
                self._unbind(layer)
                if layer > 0:
                    self._bind(layer - 1, backward=True)
                    self._backward_started[layer - 1] = self._clock()
        return hook

    def _clock(self) -> float:
        if self._measure is not None and self.on_gpu:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextlib.contextmanager
    def saving_tensors(self):
        """Autograd saves a swapped weight, or a view of one, as a reference, not as the device copy."""
        def pack(tensor):
            key = self._reference(tensor)
            return tensor if key is None else key

        def unpack(saved):
            if not isinstance(saved, tuple):
                return saved
            layer, index, size, stride, offset = saved
            if layer not in self.bound:
                self._bind(layer, backward=True)
            return torch.as_strided(self.copies[layer][index], size, stride, offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def _reference(self, tensor: torch.Tensor) -> Optional[tuple]:
        if tensor.is_sparse or tensor.device != self.device:
            return None
        found = self._bound_storages.get(tensor.untyped_storage().data_ptr())
        if found is None:
            return None
        return (*found, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())

    # --- the train loop's side -------------------------------------------------------------------------------

    def begin_step(self) -> None:
        self.release_all()
        self.zero_grad()

    @contextlib.contextmanager
    def running(self, measure: bool):
        """Around one step's forward and backward passes; `measure` times them for the plan."""
        with self.measuring() if measure else contextlib.nullcontext(), self.saving_tensors():
            yield

    def before_optimizer_step(self, plan_now: bool) -> Optional[str]:
        """Every layer home for the optimizer; after a measured step, the plan (applied, and its line returned)."""
        line = None
        if plan_now:
            budget = math.inf  # on a CPU host and device are one memory
            if self.on_gpu:
                budget = 0.9 * torch.cuda.mem_get_info(self.device)[0] + self.resident_bytes
            costs, chosen = self.plan_from_measurements(budget, self.max_resident)
            line = f" {chosen.describe(costs)}"
        self.release_all()
        return line

    # --- gradients and the plan ------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for params in self.params:
            for param in params:
                param.main_grad.zero_()

    @contextlib.contextmanager
    def measuring(self):
        """Time each layer's forward, backward and transfers (synchronizing the device) while inside."""
        self._measure = {"forward": [0.0] * len(self.layers), "backward": [0.0] * len(self.layers),
                         "transfer": []}
        try:
            yield
        finally:
            self.measured, self._measure = self._measure, None

    def plan_from_measurements(self, device_budget_bytes: float, max_resident: int) -> (LayerCosts, SwapPlan):
        """The planner's choice from what `measuring` saw, applied: how many layers stay resident, how far
        ahead to fetch."""
        moved = sum(b for b, _ in self.measured["transfer"]) or sum(self.layer_bytes)
        seconds = sum(s for _, s in self.measured["transfer"]) or 1e-9
        bandwidth = moved / max(seconds, 1e-9)
        grad_bytes = [sum(p.numel() * p.element_size() for p in params) for params in self.params]
        costs = LayerCosts(self.layer_bytes, grad_bytes, self.measured["forward"], self.measured["backward"],
                           bandwidth, bandwidth)
        chosen = plan(costs, device_budget_bytes, max_resident)
        self.resident, self.prefetch = chosen.resident, chosen.prefetch
        return costs, chosen


@contextlib.contextmanager
def detached_from_ddp(params: List[torch.nn.Parameter]):
    """megatron-core DDP and its buckets leave out parameters that do not require grad: the swapped ones, whose
    gradients go to the host instead."""
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


def validate(args) -> None:
    """--swap-layers holds one whole replica on one device (one UsageError line per combination it refuses)."""
    require(args.swap_resident_layers >= 1,
            f"--swap-resident-layers {args.swap_resident_layers}: the computing layer must be on the device; use 1 "
            "or more (2 lets the next layer arrive while one computes)")
    require(args.tensor_model_parallel_size == 1 and args.pipeline_model_parallel_size == 1,
            "--swap-layers keeps a whole replica on one device: use --tensor-model-parallel-size 1 and "
            "--pipeline-model-parallel-size 1")
    replica_ranks = args.data_parallel_size if args.dp_mode == "ddp" else args.model_shard_group_size
    require(replica_ranks == 1,
            "--swap-layers: the swapped layers' gradients stay out of DDP's buckets, so a replica is one rank: run "
            "--dp-mode ddp on one rank, or one replica per device with a local-SGD mode and --model-shard-group-size 1")
    require(not args.use_distributed_optimizer,
            "--swap-layers keeps the swapped layers' optimizer state on the host; drop --use-distributed-optimizer "
            "(with one rank per replica there is nothing to shard)")
    require(not args.fp16, "--swap-layers: use --bf16 (or fp32); fp16's loss scaling is not supported with it")
    require(args.recompute_granularity is None,
            "--swap-layers: activation recomputation would fetch each layer once more; drop --recompute-*")
    from megatron.core import optimizer

    require(optimizer.Adam.__module__.startswith("torch."),
            f"--swap-layers steps the host-held layers with torch's AdamW, but megatron-core picked "
            f"{optimizer.Adam.__module__}.{optimizer.Adam.__name__}, which needs every parameter on the GPU; "
            "swapping with Transformer Engine or Apex installed is not supported yet")
