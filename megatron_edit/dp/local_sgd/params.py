"""One module's shard of EDiT's outer state, and the way to read and write the module's parameters exactly.

Each synchronized module (a transformer layer, the embedding, the final norm, the output layer) is
flattened and split evenly across the shard group; this rank owns slice [start, end) and keeps the
anchor and momentum only for it: 2 x numel / shard_size fp32 values, optionally in pinned CPU memory.

Parameters are read and written in fp32 through the optimizer's main parameters when it has them
(Megatron's bf16/fp16 optimizers), so a sync never rounds the anchor to the model's dtype.
"""
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megatron_edit.optimizers import inner_optimizers
from megatron_edit.platform import mcore_internals


class MainParams:
    """fp32 "main" values of model parameters: the full main copy (Float16Optimizer), this rank's fragment of it
    (DistributedOptimizer with bf16/fp16), or the model parameter itself (fp32 training)."""

    def __init__(self, optimizer):
        self.full: Dict[torch.nn.Parameter, torch.Tensor] = {}
        self.fragments: Dict[torch.nn.Parameter, Tuple[torch.Tensor, int, int]] = {}
        for inner in inner_optimizers(optimizer):
            if hasattr(inner, "shard_fp32_from_float16_groups"):  # DistributedOptimizer
                for model_group, main_group in zip(inner.model_float16_groups, inner.shard_fp32_from_float16_groups):
                    for param, main in zip(model_group, main_group):
                        self.fragments[param] = (main, *mcore_internals.main_param_range(inner, param))
            elif hasattr(inner, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
                for model_group, main_group in zip(inner.float16_groups, inner.fp32_from_float16_groups):
                    for param, main in zip(model_group, main_group):
                        self.full[param] = main

    @property
    def fragmented(self) -> bool:
        return bool(self.fragments)


class FlatParams:
    """Parameters seen as one flat fp32 vector, read and written exactly (through the fp32 main parameters)."""

    def __init__(self, params: List[torch.nn.Parameter], main_params: MainParams, padded_numel: int = 0):
        self.params, self.main_params = params, main_params
        self.numel = sum(p.numel() for p in params)
        self.padded_numel = max(padded_numel, self.numel)
        self.device = getattr(params[0], "compute_device", params[0].device)  # a swapped layer's data is on the host
        self.tensor_replicated = _replicated_ranges(params, slice(0, self.padded_numel))  # of the flat vector

    @torch.no_grad()
    def read_full(self, shard_group) -> torch.Tensor:
        """The parameters, flat, in fp32 (zero-padded to padded_numel). shard_group holds the distributed
        optimizer's fragments (the ranks that train one replica together)."""
        flat = torch.zeros(self.padded_numel, dtype=torch.float32, device=self.device)
        offset = 0
        for param in self.params:
            n = param.numel()
            if self.main_params.fragmented:
                main, begin, end = self.main_params.fragments.get(param, (None, 0, 0))
                if main is not None:
                    flat[offset + begin:offset + end] = main.view(-1)
            else:
                flat[offset:offset + n] = self.main_params.full.get(param, param).detach().view(-1)
            offset += n
        if self.main_params.fragmented:  # each element's fp32 value lives on exactly one rank of the shard group
            dist.all_reduce(flat, group=shard_group)
        return flat

    @torch.no_grad()
    def write_model_params(self, flat: torch.Tensor) -> None:
        """Set the model parameters (in their dtype) from a flat fp32 vector, leaving the optimizer's values alone.
        Through `detach()`, so the write counts in the parameter's version (a swapped layer's copy is then stale)."""
        offset = 0
        for param in self.params:
            param.detach().copy_(flat[offset:offset + param.numel()].view_as(param))
            offset += param.numel()

    @torch.no_grad()
    def write_full(self, flat: torch.Tensor) -> None:
        """Set model parameters (in their dtype) and any fp32 main parameters from a flat fp32 vector."""
        self.write_model_params(flat)
        offset = 0
        for param in self.params:
            values = flat[offset:offset + param.numel()]
            if param in self.main_params.full:
                self.main_params.full[param].copy_(values.view_as(param))
            elif param in self.main_params.fragments:
                main, begin, end = self.main_params.fragments[param]
                main.view(-1).copy_(values[begin:end])
            offset += param.numel()


class ModuleShard(FlatParams):
    """A module's flat parameters, this rank's slice of them, and the outer state (anchor, momentum) of that slice.
    With shard_size 1 the slice is the whole module: an unsharded outer copy, as DiLoCo keeps."""

    def __init__(self, name: str, params: List[torch.nn.Parameter], shard_rank: int, shard_size: int,
                 main_params: MainParams, offload: bool):
        self.shard_numel = -(-sum(p.numel() for p in params) // shard_size)
        super().__init__(params, main_params, self.shard_numel * shard_size)
        self.name = name
        start = shard_rank * self.shard_numel
        self.owned = slice(start, start + self.shard_numel)  # of the padded flat vector
        self.tensor_replicated = _replicated_ranges(params, self.owned)  # of the owned slice
        state_device = torch.device("cpu") if offload else self.device
        pin = offload and torch.cuda.is_available() and self.device.type == "cuda"
        self.anchor = torch.zeros(self.shard_numel, dtype=torch.float32, device=state_device, pin_memory=pin)
        self.momentum = torch.zeros_like(self.anchor)

    def outer_state_numel(self) -> int:
        return self.anchor.numel() + self.momentum.numel()

    def squared_norm_parts(self, owned_values: torch.Tensor) -> torch.Tensor:
        """[sum of squares over tensor-parallel slices, over tensor-replicated elements] of this rank's slice of a
        module-wide vector: summed over the tensor group, the first adds up and the second counts each copy."""
        squares = owned_values.double().pow(2)
        replicated = sum((squares[r].sum() for r in self.tensor_replicated), torch.zeros((), dtype=torch.float64,
                                                                                            device=squares.device))
        return torch.stack([squares.sum() - replicated, replicated])


def _replicated_ranges(params: List[torch.nn.Parameter], owned: slice) -> List[slice]:
    """Where, inside the owned slice, elements of parameters every tensor-parallel rank holds whole lie
    (layer norms, biases of row-parallel layers): megatron-core marks the split ones `tensor_model_parallel`."""
    ranges, offset = [], 0
    for param in params:
        begin, end = max(offset, owned.start), min(offset + param.numel(), owned.stop)
        if begin < end and not getattr(param, "tensor_model_parallel", False):
            ranges.append(slice(begin - owned.start, end - owned.start))
        offset += param.numel()
    return ranges
