"""Who meets at each sync: the replicas of one launch (all of them, always), or, when each replica is its own job,
torchft's quorum of those alive (torchft_replicas.py), in which a replica that is behind heals from a live peer.

`meet()` opens a sync, `contributors()` counts the pseudo-gradients its sums hold, `commit()` says whether to apply
it. Nothing here knows what a sync exchanges.
"""
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_edit.dp.local_sgd import torchft_replicas
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups
from megatron_edit.dp.local_sgd.members import ProcessGroupMembers
from megatron_edit.dp.local_sgd.progress import ReplicaProgress


class ReplicaMeeting:
    def __init__(self, groups: LocalSGDGroups, progress: ReplicaProgress):
        self.groups, self.progress = groups, progress
        self.members = ProcessGroupMembers(groups.sync)
        self.jobs: Optional[torchft_replicas.TorchftReplicas] = None  # attach_jobs: each replica its own launch
        self.data_slot: Tuple[int, int] = (groups.replica_index, groups.num_replicas)
        self.layout: Tuple[int, ...] = ()  # what replica jobs must share
        self.healed = False  # this replica took a live peer's state in the quorum of the sync under way
        self.meeting: Dict[str, float] = {}  # who met at the sync under way, for its log line and tracker event
        self.wait_seconds = 0.0  # how long the last meet() held training up (torchft's quorum)
        self._present_before = None

    def attach_jobs(self, args, exchange, heal_state: Callable[[], dict], load_heal_state: Callable[[dict], None]):
        """This launch is replica `--replica-id`; the sync group is torchft's quorum, which `exchange` sums over."""
        device = torch.device("cuda" if args.device_type == "cuda" else "cpu")
        self.jobs = torchft_replicas.TorchftReplicas(args, device, heal_state, load_heal_state)
        exchange.transport = torchft_replicas.TorchftTransport(self.jobs)
        self.members = torchft_replicas.TorchftMembers(self.jobs, args.replica_index, args.num_replicas)
        self.data_slot = (args.replica_index, args.num_replicas)
        self.layout = torchft_replicas.layout(args)

    @property
    def has_peers(self) -> bool:
        """A single replica has no one to synchronize with: it trains exactly like plain data parallelism."""
        return self.groups.sync is not None or self.jobs is not None

    def meet(self) -> None:
        """Open a sync: the replicas taking part (with torchft, once its quorum met, all running one layout)."""
        start = time.perf_counter()
        self.healed = False
        if self.jobs is None:
            present = self.groups.num_replicas
        else:
            present = self.jobs.quorum()  # heals this replica (took_over) when it is behind
            self.members.contributing = not self.healed
            self._check_layouts()
        self.meeting = {"sync/replicas": float(present)}
        if self._present_before is not None and present != self._present_before:  # replicas left or joined
            self.meeting["sync/replicas change"] = float(present - self._present_before)
        self._present_before = present
        self.wait_seconds = time.perf_counter() - start

    def took_over(self, iteration: int) -> None:
        """This replica healed from a live peer standing after `iteration` (its state is loaded already)."""
        self.progress.iteration, self.progress.local_steps_since_sync, self.healed = iteration, 0, True
        if dist.get_rank() == 0:
            print(f" replica {self.data_slot[0]} took a live replica's state: continuing after iteration "
                  f"{iteration}", flush=True)

    def _check_layouts(self) -> None:
        """Replica jobs exchange rank k's shard with rank k's: this one refuses to go on when its layout is not the
        one most replicas present run (on a tie, the lowest --replica-id's)."""
        rows, present = self.members.gather(torch.tensor(self.layout, dtype=torch.float64))
        layouts = [tuple(int(v) for v in row) for row, here in zip(rows.tolist(), present) if here]
        if layouts:
            reference = max(layouts, key=layouts.count)  # max keeps the first of equal counts
            torchft_replicas.require_same_layout(self.layout, reference, "the other replicas")

    def contributors(self, device: torch.device) -> int:
        """How many replicas' pseudo-gradients the sync's sums hold: all of them, except that one healing in this
        sync's quorum adds none (its parameters are the anchor)."""
        if self.members.always_all_present:
            return self.members.slots
        return max(sum(self.members.gather(torch.zeros(0, device=device))[1]), 1)

    def commit(self) -> bool:
        """Whether to apply the sync (with torchft: every replica of the quorum completed its collectives)."""
        return self.jobs is None or self.jobs.commit()

    def beat(self) -> None:
        """An iteration completed (a replica job's watchdog ends it when none does for too long)."""
        if self.jobs is not None:
            self.jobs.watchdog.beat()
