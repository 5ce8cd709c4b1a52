"""Where this replica stands between syncs: what the engine's parts (schedule, synchronizer, meeting) all read."""
import dataclasses


@dataclasses.dataclass
class ReplicaProgress:
    iteration: int = 0                # the last iteration this replica completed
    local_steps_since_sync: int = 0   # local (post-warm-up) steps this replica took since every module last met
    in_warmup: bool = False           # the step under way averages gradients over every replica

    def state_dict(self) -> dict:
        """The step counters a checkpoint holds per replica (the iteration is the checkpoint's own)."""
        return {"local_steps_since_sync": self.local_steps_since_sync, "in_warmup": self.in_warmup}

    def load_state_dict(self, state: dict) -> None:
        self.local_steps_since_sync, self.in_warmup = state["local_steps_since_sync"], state["in_warmup"]
