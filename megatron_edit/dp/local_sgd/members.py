"""Who takes part in a sync, and the small gather through which every replica learns what each other one says
(the penalty's norms, A-EDiT's flags, how many pseudo-gradients a sum holds).

Replicas sit in *slots*: their place in the sync group, or their --replica-id when each is its own launch
(torchft_replicas.TorchftMembers, where a slot may be empty at any sync). `gather` returns one row per slot and
whether that slot contributes to the sync under way.
"""
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist


class ProcessGroupMembers:
    """The replicas of one launch: every slot always present, the rows all-gathered over the sync group (a
    communicator of its own, so these small collectives never queue behind a bulk exchange)."""
    always_all_present = True
    contributing = True

    def __init__(self, group: Optional[dist.ProcessGroup]):
        self.group = group
        self.slots = 1 if group is None else group.size()
        self.slot = 0 if group is None else dist.get_rank(group)

    def gather(self, mine: torch.Tensor) -> Tuple[torch.Tensor, List[bool]]:
        rows = torch.empty(self.slots, mine.numel(), dtype=mine.dtype, device=mine.device)
        if self.group is None:
            rows[0].copy_(mine)
        else:
            dist.all_gather_into_tensor(rows.view(-1), mine, group=self.group)
        return rows, [True] * self.slots
