"""The sync group's exchange: every replica's (weighted) pseudo-gradient summed, through a codec over a transport.

Every pseudo-gradient mode (EDiT, A-EDiT, DiLoCo) sums through `SyncExchange.start(key, values).wait()`, so what
goes on the wire (`--sync-dtype`) and who carries it (the transport: a torch.distributed process group today) are
chosen in one place.

- fp32: one all-reduce of the values, exactly what the modes did before there was a choice.
- bf16 and int8: a sum of low-precision values is not low precision (and int8 sums overflow; per-block scales
  differ between ranks), so the exchange is a reduce-scatter done by hand: each rank quantizes its vector, sends
  chunk j to rank j (all-to-all), rank j dequantizes the M chunks it received and sums them in fp32, quantizes that
  sum again, and an all-gather gives everyone every summed chunk. On the wire: per rank 2 (M-1)/M of the vector
  in the codec's width, as a ring all-reduce of fp32 moves 2 (M-1)/M of it in fp32, so 1/2 (bf16) and about
  1/4 (int8, plus one fp32 scale per block of `INT8_BLOCK` values).
- int4 and int2: the int8 scheme with 15 and 3 levels per block, two and four values to a byte: about 1/8 and 1/16
  of fp32's bytes.
- topk: a sparse exchange (SparseLoCo, DeMo): each rank all-gathers its largest --sync-topk-fraction of values
  (bf16) with their int32 indices, and every rank adds the M sparse vectors. Per rank (M-1) x k x 6 bytes, against
  the fp32 all-reduce's 2 (M-1)/M x 4 n: 1.5 x the fraction at M=2, 3 x at M=4 (all-gathers grow with M). Only with
  error feedback (the rest of each vector waits for the next exchange), as in those papers.
- Tensor parallelism: a module's vector on one tensor rank mixes its own slices with elements every tensor rank
  holds alike (layer norms, some biases). Those `replicated` ranges are quantized in blocks of their own, so every
  tensor rank computes the same blocks, scales and sums for them, and their copies stay bit-identical.
- Error feedback (`--sync-error-feedback`): what quantization dropped is carried into the next exchange of the
  same key: each rank's residual of its own vector, and each chunk owner's residual of re-quantizing the sum. Over
  many exchanges the sums delivered then add up to the sums sent, up to the last residuals.
"""
import math
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import torch
import torch.distributed as dist

INT8_BLOCK = 256  # values sharing one fp32 scale (int8, int4, int2)
TOPK_FRACTION = 0.01  # top-k's share of a vector's values sent per exchange (--sync-topk-fraction)


class ProcessGroupTransport:
    """torch.distributed collectives over one process group (all-gathers over `gather_group`, another communicator of
    the same ranks, when given); None is a lone replica (nothing to exchange)."""

    def __init__(self, group: Optional[dist.ProcessGroup], gather_group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.gather_group = group if gather_group is None else gather_group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)

    def all_reduce(self, tensor: torch.Tensor):
        return dist.all_reduce(tensor, group=self.group, async_op=True)

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor):
        return dist.all_to_all_single(output, input, group=self.group, async_op=True)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor):
        return dist.all_gather_into_tensor(output, input, group=self.gather_group, async_op=True)


class Bf16Quantizer:
    block = 1

    @staticmethod
    def encode(values: torch.Tensor) -> List[torch.Tensor]:
        return [values.to(torch.bfloat16)]

    @staticmethod
    def decode(payload: List[torch.Tensor]) -> torch.Tensor:
        return payload[0].float()


class IntQuantizer:
    """Symmetric integers per block of INT8_BLOCK values: 2^(bits-1) - 1 levels each side of zero (127 for int8, 7 for
    int4, 1 for int2), each block scaled by its largest magnitude / levels; below 8 bits, 8 / bits values to a byte."""
    block = INT8_BLOCK

    def __init__(self, bits: int):
        self.bits, self.levels, self.per_byte = bits, 2 ** (bits - 1) - 1, 8 // bits

    def encode(self, values: torch.Tensor) -> List[torch.Tensor]:
        blocks = values.view(-1, INT8_BLOCK)
        scales = blocks.abs().amax(dim=1) / self.levels
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        rounded = torch.round(blocks / safe[:, None]).clamp_(-self.levels, self.levels)
        if self.bits == 8:
            return [rounded.to(torch.int8).view(-1), scales]
        codes = (rounded + self.levels).to(torch.uint8).view(-1, self.per_byte)  # in [0, 2 levels]
        packed = sum(codes[:, j] << (self.bits * j) for j in range(self.per_byte))
        return [packed.to(torch.uint8), scales]

    def decode(self, payload: List[torch.Tensor]) -> torch.Tensor:
        packed, scales = payload
        if self.bits == 8:
            levels = packed.float()
        else:
            mask = 2 ** self.bits - 1
            codes = torch.stack([(packed >> (self.bits * j)) & mask for j in range(self.per_byte)], dim=1)
            levels = codes.float() - self.levels
        return (levels.view(-1, INT8_BLOCK) * scales[:, None]).view(-1)


# The dense codecs by --sync-dtype name: a new one is a class with encode/decode (and its block) and a line here.
QUANTIZERS = {"bf16": Bf16Quantizer(), "int8": IntQuantizer(8), "int4": IntQuantizer(4), "int2": IntQuantizer(2)}
SYNC_DTYPES = ("fp32", *QUANTIZERS, "topk")  # fp32: a plain all-reduce; topk: the sparse exchange


class InFlight:
    """A sum being exchanged, in stages: the collectives in flight, then the stages still to issue (a quantized sum
    has one more: the all-gather of the summed chunks), then `finish`, which returns the fp32 sum (in the tensor
    `start` was given). `advance()` moves to the next stage without waiting for it, so a caller that waits late
    can let both stages run behind compute (`ready_to_advance()` says when that costs no wait); `wait()` runs
    whatever is left."""

    def __init__(self, works: list, finish: Callable[[], torch.Tensor], stages: Sequence[Callable[[], list]] = ()):
        self._works, self._finish, self._stages, self._result = works, finish, list(stages), None

    @property
    def stages_left(self) -> bool:
        return bool(self._stages)

    def ready_to_advance(self) -> bool:
        """A stage is left to issue and the collectives before it are done."""
        return self.stages_left and all(work.is_completed() for work in self._works)

    def advance(self) -> bool:
        """Wait for the collectives in flight and issue the next stage's; False (and nothing done) if none is left."""
        if not self._stages:
            return False
        self._wait_works()
        self._works = self._stages.pop(0)()
        return True

    def _wait_works(self) -> None:
        for work in self._works:
            work.wait()
        self._works = []

    def wait(self) -> torch.Tensor:
        if self._result is None:
            while self._stages:
                self.advance()
            self._wait_works()
            self._result = self._finish()
        return self._result


class _BlockLayout:
    """Where a vector's elements go in the quantized payload: when it mixes replicated ranges with slices, the
    replicated elements first, padded to whole blocks, then the slices, so that no block holds both kinds."""

    def __init__(self, numel: int, replicated: Sequence[slice], block: int, device: torch.device):
        mask = torch.zeros(numel, dtype=torch.bool)
        for part in replicated:
            mask[part] = True
        count = int(mask.sum())
        self.mixed = 0 < count < numel
        self.numel = numel
        if self.mixed:
            self.replicated = mask.nonzero().squeeze(1).to(device)
            self.sliced = (~mask).nonzero().squeeze(1).to(device)
            self.offset = -(-count // block) * block
            self.numel = self.offset + self.sliced.numel()

    def pack(self, values: torch.Tensor, out: torch.Tensor) -> None:
        if not self.mixed:
            out[:values.numel()] = values
            return
        out[:self.replicated.numel()] = values[self.replicated]
        out[self.offset:self.numel] = values[self.sliced]

    def unpack(self, packed: torch.Tensor, values: torch.Tensor) -> None:
        if not self.mixed:
            values.copy_(packed[:values.numel()])
            return
        values[self.replicated] = packed[:self.replicated.numel()]
        values[self.sliced] = packed[self.offset:self.numel]


class SyncExchange:
    """Sums a vector over the replicas in the codec `dtype`; `key` names the vector (a module, a model chunk) whose
    error-feedback residuals carry from one exchange to the next."""

    def __init__(self, transport: ProcessGroupTransport, dtype: str = "fp32", error_feedback: bool = False,
                 topk_fraction: float = TOPK_FRACTION):
        assert dtype in SYNC_DTYPES, dtype
        self.transport, self.dtype, self.topk_fraction = transport, dtype, topk_fraction
        self.error_feedback = error_feedback and dtype != "fp32"
        self.residuals: Dict[Hashable, torch.Tensor] = {}  # this rank's quantization residual, per key
        self.sum_residuals: Dict[Hashable, torch.Tensor] = {}  # of re-quantizing the summed chunk this rank owns
        self._layouts: Dict[Hashable, _BlockLayout] = {}

    def start(self, key: Hashable, values: torch.Tensor, replicated: Sequence[slice] = ()) -> InFlight:
        """Issue the exchange of an fp32 vector (summed into it, in place, by the time wait() returns). `replicated`:
        the ranges of `values` that every tensor-parallel rank holds alike (all of it when there is no tensor
        parallelism); the rest are this rank's slices."""
        if self.transport.size == 1:
            return InFlight([], lambda: values)
        if self.dtype == "fp32":
            return InFlight([self.transport.all_reduce(values)], lambda: values)
        if self.dtype == "topk":
            return self._start_sparse(key, values, replicated)
        return self._start_quantized(key, values, QUANTIZERS[self.dtype], replicated)

    def _layout(self, key: Hashable, values: torch.Tensor, replicated: Sequence[slice], block: int) -> "_BlockLayout":
        if key not in self._layouts:  # a key's vector keeps its size and ranges: its layout is made once
            self._layouts[key] = _BlockLayout(values.numel(), replicated, block, values.device)
        return self._layouts[key]

    def _start_sparse(self, key: Hashable, values: torch.Tensor, replicated: Sequence[slice]) -> InFlight:
        """Top-k: each rank sends its largest `topk_fraction` of values (as bf16, with int32 indices; chosen apart in
        the tensor-replicated ranges, so every tensor rank picks the same ones there) to every other (all-gather),
        and every rank adds up the M sparse vectors in rank order. With error feedback what was not sent (and the
        bf16 rounding of what was) joins the key's next exchange."""
        replicas = self.transport.size
        layout = self._layout(key, values, replicated, block=1)
        if self.error_feedback and key in self.residuals:
            values.add_(self.residuals[key].to(values.device))
        chosen = []
        for part in ([layout.replicated, layout.sliced] if layout.mixed else [None]):
            magnitudes = values.abs() if part is None else values[part].abs()
            top = magnitudes.topk(max(1, math.ceil(self.topk_fraction * magnitudes.numel())), sorted=False).indices
            chosen.append(top if part is None else part[top])
        indices = torch.cat(chosen)
        sent = values[indices].to(torch.bfloat16)
        if self.error_feedback:
            residual = values.clone()
            residual[indices] -= sent.float()
            self.residuals[key] = residual
        count = indices.numel()  # the same on every rank: the vectors of one key have one size and ranges
        gathered_values = torch.empty(replicas * count, dtype=torch.bfloat16, device=values.device)
        gathered_indices = torch.empty(replicas * count, dtype=torch.int32, device=values.device)
        works = [self.transport.all_gather(gathered_values, sent),
                 self.transport.all_gather(gathered_indices, indices.to(torch.int32))]

        def finish() -> torch.Tensor:
            values.zero_()
            for rank in range(replicas):  # no index repeats within a rank's part: each add is exact and ordered
                part = slice(rank * count, (rank + 1) * count)
                values.index_add_(0, gathered_indices[part].long(), gathered_values[part].float())
            return values

        return InFlight(works, finish)

    def _carry(self, store: Dict[Hashable, torch.Tensor], key: Hashable, values: torch.Tensor,
               sent: torch.Tensor) -> None:
        if self.error_feedback:
            store[key] = values - sent

    def _start_quantized(self, key: Hashable, values: torch.Tensor, quantizer, replicated: Sequence[slice]) -> InFlight:
        replicas = self.transport.size
        layout = self._layout(key, values, replicated, quantizer.block)
        chunk = -(-layout.numel // (replicas * quantizer.block)) * quantizer.block
        padded = torch.zeros(replicas * chunk, dtype=torch.float32, device=values.device)
        layout.pack(values, padded)
        if self.error_feedback and key in self.residuals:
            padded.add_(self.residuals[key].to(padded.device))
        payload = quantizer.encode(padded)
        self._carry(self.residuals, key, padded, quantizer.decode(payload))
        received = [torch.empty_like(p) for p in payload]
        works = [self.transport.all_to_all(out, p) for out, p in zip(received, payload)]
        gathered: List[torch.Tensor] = []

        def sum_owned_chunk_and_gather() -> list:
            pieces = [r.view(replicas, -1) for r in received]  # row i: what rank i sent of this rank's chunk
            summed = sum(quantizer.decode([p[i] for p in pieces]) for i in range(replicas))
            if self.error_feedback and key in self.sum_residuals:
                summed.add_(self.sum_residuals[key].to(summed.device))
            summed_payload = quantizer.encode(summed)
            self._carry(self.sum_residuals, key, summed, quantizer.decode(summed_payload))
            gathered.extend(torch.empty(replicas * p.numel(), dtype=p.dtype, device=p.device) for p in summed_payload)
            return [self.transport.all_gather(out, p) for out, p in zip(gathered, summed_payload)]

        def finish() -> torch.Tensor:
            whole = torch.cat([quantizer.decode([g.view(replicas, -1)[i] for g in gathered]) for i in range(replicas)])
            layout.unpack(whole, values)
            return values

        return InFlight(works, finish, [sum_owned_chunk_and_gather])

    def forget(self, key: Hashable) -> None:
        """Drop `key`'s residuals: its last exchange carried a non-finite value, which they would hand on."""
        self.residuals.pop(key, None)
        self.sum_residuals.pop(key, None)

    def state_dict(self) -> dict:
        return {"residuals": {k: v.cpu().clone() for k, v in self.residuals.items()},
                "sum_residuals": {k: v.cpu().clone() for k, v in self.sum_residuals.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Residuals move to the values' device at their next use."""
        self.residuals = dict(state["residuals"])
        self.sum_residuals = dict(state["sum_residuals"])
