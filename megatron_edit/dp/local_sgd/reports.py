"""What a local-SGD run reports beyond its loss: bytes on each group and the time training waited on syncs, per
iteration of each log interval (the log line), and one event per sync (the tracker)."""
import collections
from typing import Callable, Dict, List, Tuple

from megatron_edit.dp import comm_stats
from megatron_edit.dp.local_sgd.groups import LocalSGDGroups


class SyncReports:
    def __init__(self, groups: LocalSGDGroups):
        self.counter = comm_stats.install()
        self.counter.name_group(groups.shard, "shard")
        for group in (groups.sync, groups.sync_exchange, groups.sync_gather):
            self.counter.name_group(group, "sync")
        self.counter.name_group(groups.replica, "replica")
        self.blocked_seconds = 0.0  # training time spent in blocking syncs (meetings, commits, whole-model syncs)
        self.overlapped_exposed: Callable[[], float] = lambda: 0.0  # what an overlapping sync still made training wait
        self._events: List[Tuple[int, Dict[str, float]]] = []
        self._bytes_at_log, self._exposed_at_log = self.counter.snapshot(), 0.0
        self._iterations_since_log = 0

    def sync_bytes(self) -> int:
        """Bytes sent on the sync group so far."""
        return self.counter.snapshot().get("sync", 0)

    def exposed_seconds(self) -> float:
        """Training time spent waiting on syncs so far, in all."""
        return self.blocked_seconds + self.overlapped_exposed()

    def iteration_done(self) -> None:
        self._iterations_since_log += 1

    def add_event(self, iteration: int, values: Dict[str, float]) -> None:
        self._events.append((iteration, values))

    def pop_events(self) -> List[Tuple[int, Dict[str, float]]]:
        events, self._events = self._events, []
        return events

    def metrics(self) -> Dict[str, float]:
        """Per iteration since the last log line: bytes on each group and exposed sync time."""
        now = self.counter.snapshot()
        steps = max(self._iterations_since_log, 1)
        sent = collections.Counter(now)
        sent.subtract(self._bytes_at_log)
        exposed = self.exposed_seconds()
        values = {
            "shard bytes/iter": sent["shard"] / steps,
            "sync bytes/iter": sent["sync"] / steps,
            "exposed sync ms/iter": 1000 * (exposed - self._exposed_at_log) / steps,
        }
        self._bytes_at_log, self._exposed_at_log, self._iterations_since_log = now, exposed, 0
        return values
