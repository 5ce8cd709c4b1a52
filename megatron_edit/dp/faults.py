"""Straggler and fault injection, for tests and demonstrations only (never for real training).

    --simulate-straggler REPLICA:FACTOR    that replica's iterations take FACTOR times as long (it sleeps)
    --inject-fault REPLICA:ITER:KIND       scale: its pseudo-gradients x100 at every sync from ITER on
                                           nan:   a NaN pseudo-gradient at the first sync at or after ITER
                                           bad-data: it trains on random tokens from ITER on
                                           nan-loss: its loss is NaN at iteration ITER (any mode)
                                           hang:  it blocks (sleeps) at the start of iteration ITER, for good
REPLICA is the replica's position in the sync group, from 0 (under --dp-mode ddp: the data-parallel rank).
Pseudo-gradient faults apply to the modes that have pseudo-gradients (edit, aedit, diloco).
    --simulated-step-seconds S             nobody sleeps: the mode's clock (A-EDiT's trigger) reads a simulated
                                           time that each iteration advances by S (FACTOR x S on a straggler), so
                                           a run syncs at the same iterations however loaded the machine is

Nothing here is on the path of a run without these flags: the injector is one of the trainer's step hooks
(training.Trainer.hooks), and `attach` adds it to a local-SGD mode's pseudo-gradient hooks and sets the mode's clock.
"""
import dataclasses
import time
from typing import Iterator, List, Optional

import torch

from megatron_edit.errors import UsageError

FAULT_KINDS = ("scale", "nan", "bad-data", "nan-loss", "hang")


@dataclasses.dataclass(frozen=True)
class Fault:
    replica: int
    iteration: int
    kind: str


def parse_straggler(spec: Optional[str]):
    if spec is None:
        return None
    try:
        replica, factor = spec.split(":")
        parsed = int(replica), float(factor)
    except ValueError:
        raise UsageError(f"--simulate-straggler {spec}: expected REPLICA:FACTOR, e.g. 1:3")
    if parsed[1] < 1:
        raise UsageError(f"--simulate-straggler {spec}: FACTOR must be >= 1")
    return parsed


def parse_fault(spec: str) -> Fault:
    try:
        replica, iteration, kind = spec.split(":")
        fault = Fault(int(replica), int(iteration), kind)
    except ValueError:
        raise UsageError(f"--inject-fault {spec}: expected REPLICA:ITER:KIND, e.g. 1:50:scale")
    if kind not in FAULT_KINDS:
        raise UsageError(f"--inject-fault {spec}: KIND must be one of {', '.join(FAULT_KINDS)}")
    return fault


class FaultInjector:
    """What this replica is told to suffer, as the trainer's step hooks."""

    def __init__(self, replica: int, straggler, faults: List[Fault], random_tokens: "RandomTokens",
                 simulated_step_seconds: Optional[float] = None):
        self.replica, self.random_tokens = replica, random_tokens
        self.slowdown = straggler[1] if straggler and straggler[0] == replica else 1.0
        self.faults = [f for f in faults if f.replica == replica]
        self.simulated_step_seconds = simulated_step_seconds
        self.simulated_now = 0.0
        self._nan_spent_at = {}  # NaN fault -> the sync iteration it hit (every module of that one sync)
        self._iteration_started = 0.0

    @classmethod
    def from_args(cls, args, replica: int) -> "FaultInjector":
        """Once the vocabulary is padded (args.padded_vocab_size), like every other part built from the flags."""
        return cls(replica, parse_straggler(args.simulate_straggler), [parse_fault(s) for s in args.inject_fault],
                   RandomTokens(args.num_microbatches, args.padded_vocab_size, args.seed), args.simulated_step_seconds)

    @staticmethod
    def wanted(args) -> bool:
        return bool(args.simulate_straggler or args.inject_fault or args.simulated_step_seconds)

    def attach(self, mode) -> None:
        """Into the mode (the trainer takes the injector among its hooks)."""
        if hasattr(mode, "pseudo_gradient_hooks"):
            mode.pseudo_gradient_hooks.append(self.corrupt_pseudo_grad)
        if self.simulated_step_seconds is not None:
            mode.clock = self.clock

    def clock(self) -> float:
        return self.simulated_now

    def before_step(self, plan) -> None:
        self._iteration_started = time.perf_counter()
        if any(f.kind == "hang" and f.iteration == plan.iteration for f in self.faults):
            while True:  # a replica stuck in Python: only a watchdog can end it
                time.sleep(3600)

    def after_step(self, plan) -> None:
        """A straggler's iteration lasts FACTOR times as long: it sleeps, or its simulated clock runs faster."""
        if self.simulated_step_seconds is not None:
            self.simulated_now += self.slowdown * self.simulated_step_seconds
        elif self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - self._iteration_started))

    def corrupt_pseudo_grad(self, pseudo_grad: torch.Tensor, iteration: int) -> None:
        """At the sync of `iteration`: x100 from a scale fault's iteration on; a NaN in every module of the first
        sync at or after a NaN fault's iteration."""
        for fault in self.faults:
            if fault.kind == "scale" and iteration >= fault.iteration:
                pseudo_grad.mul_(100.0)
            elif fault.kind == "nan" and iteration >= fault.iteration \
                    and self._nan_spent_at.setdefault(fault, iteration) == iteration:
                pseudo_grad[0] = float("nan")

    def train_batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The training stream this replica consumes: with a bad-data fault, random tokens from its iteration on;
        with a nan-loss fault, a NaN loss at its iteration."""
        starts = [f.iteration for f in self.faults if f.kind == "bad-data"]
        batches = self.random_tokens.replace(batches, min(starts)) if starts else batches
        nan_at = {f.iteration for f in self.faults if f.kind == "nan-loss"}
        return _nan_loss(batches, nan_at, self.random_tokens.micro_batches_per_iteration) if nan_at else batches


def _nan_loss(batches: Iterator[dict], iterations: set, micro_batches_per_iteration: int) -> Iterator[dict]:
    """The same stream, with a NaN loss mask (so a NaN loss) in the micro-batches of `iterations`."""
    for index, batch in enumerate(batches):
        if index // micro_batches_per_iteration + 1 in iterations:
            batch = dict(batch, loss_mask=torch.full_like(batch["loss_mask"], float("nan"), dtype=torch.float32))
        yield batch


@dataclasses.dataclass(frozen=True)
class RandomTokens:
    """How a bad-data fault replaces a replica's batches."""
    micro_batches_per_iteration: int
    vocab_size: int
    seed: int

    def replace(self, batches: Iterator[dict], from_iteration: int) -> Iterator[dict]:
        """The same stream, with tokens and labels replaced by random ids from `from_iteration` on."""
        generator = torch.Generator().manual_seed(self.seed)
        for index, batch in enumerate(batches):
            if index // self.micro_batches_per_iteration + 1 >= from_iteration:
                batch = dict(batch)
                for key in ("tokens", "labels"):
                    batch[key] = torch.randint(0, self.vocab_size, batch[key].shape,
                                               generator=generator).to(batch[key].device)
            yield batch
