"""Replicas as independent jobs (`--replica-coordinator torchft`): the sync group is whichever replicas are alive.

Each replica is its own launch (torchrun, Slurm job, cluster) with `--replica-id`; inside it megatron-core's groups
are as always. At every sync, torchft's Manager asks the lighthouse (`TORCHFT_LIGHTHOUSE`) for a quorum of the
replicas present, reconfigures a gloo (or NCCL) process group over them (rank k of every replica exchanges with
rank k of the others), and after the exchange every replica commits only if the collectives succeeded everywhere. A
replica that died drops out of the next quorum; a replica that starts (or restarts) behind the others heals in its
first quorum: it receives a live peer's state (`heal_state`, over heal_transport.py) before it exchanges anything.
Replicas prove the sync secret (sync_secret.py) to the lighthouse's gate before they meet (lighthouse.py), and to each
other before heal state is served or taken; every socket here listens on --sync-interface (network.py).

A replica that hangs would keep heartbeating to the lighthouse and delay every quorum; `StepWatchdog` ends it when
no iteration completes within `--replica-step-timeout-secs` (quorum waits excluded).
"""
import contextlib
import math
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

from megatron_edit import network, sync_secret
from megatron_edit.dp import comm_stats
from megatron_edit.dp.local_sgd.heal_transport import AuthenticatedHealTransport
from megatron_edit.errors import TrainingError, require
from megatron_edit.lighthouse import GateForwarder


def serve_manager_on(interface: network.ListenInterface) -> None:
    """torchft's Manager starts its server (the replica's quorum and commit votes, the address healing replicas ask
    for the heal state's) on `[::]:port`, every interface; this makes it listen on `interface` only. The Manager
    looks the name up in its module when it builds the server (tests/test_replica_jobs.py lists the sockets a run
    listens on, and fails if torchft stops doing so)."""
    from torchft import manager
    from torchft._torchft import ManagerServer

    def on_interface(*, bind: str, **kwargs):
        return ManagerServer(bind=interface.host_port(int(bind.rsplit(":", 1)[1])), **kwargs)

    manager.ManagerServer = on_interface


class TorchftReplicas:
    """This rank's view of the replica quorum: `quorum()` before a sync, `all_reduce` during it, `commit()` after."""

    def __init__(self, args, device: torch.device, heal_state: Callable[[], dict], load_heal_state: Callable):
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's manager logs every quorum at INFO; RUST_LOG=info shows it
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        timeout = timedelta(seconds=args.torchft_timeout_secs)
        group = ProcessGroupNCCL(timeout=timeout) if device.type == "cuda" else ProcessGroupGloo(timeout=timeout)
        self.replica_id, self.quorum_timeout = args.replica_index, args.torchft_quorum_timeout_secs
        self.secret = sync_secret.read_secret(sync_secret.secret_file(args.sync_secret_file))
        interface = network.interface_in_use()
        serve_manager_on(interface)
        # Rank 0 heartbeats to the lighthouse, through its gate (lighthouse.py); the other ranks talk to rank 0.
        lighthouse = GateForwarder(os.environ["TORCHFT_LIGHTHOUSE"], self.secret).url if dist.get_rank() == 0 else None
        self.manager = Manager(
            pg=group, state_dict=heal_state, load_state_dict=load_heal_state, lighthouse_addr=lighthouse,
            hostname=interface.host,
            checkpoint_transport=AuthenticatedHealTransport(self.secret, interface, timeout),
            min_replica_size=args.torchft_min_replicas, use_async_quorum=False, init_sync=False,
            timeout=timeout, quorum_timeout=timedelta(seconds=self.quorum_timeout),
            # A lighthouse that restarts is asked again, each try taking up to the timeout, for as long as a
            # replica waits for the others anyway.
            quorum_retries=math.ceil(self.quorum_timeout / args.torchft_timeout_secs),
            rank=dist.get_rank(), world_size=dist.get_world_size(), replica_id=f"replica_{args.replica_index}")
        self.watchdog = StepWatchdog(args.replica_step_timeout_secs, args.replica_index)

    def quorum(self) -> int:
        """Wait for the replicas present to meet (healing this one first if it is behind); returns how many met.
        No quorum within --torchft-quorum-timeout-secs (the lighthouse gone, or too few replicas) ends the run in
        one line."""
        with self.watchdog.paused():
            try:
                self.manager.start_quorum()
            except (TimeoutError, RuntimeError) as exc:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise TrainingError(
                    f"replica {self.replica_id} met no quorum within {self.quorum_timeout:g} s "
                    f"(--torchft-quorum-timeout-secs): the lighthouse at {os.environ.get('TORCHFT_LIGHTHOUSE')} did "
                    f"not answer, or fewer than --torchft-min-replicas replicas came ({reason}); restart the "
                    "lighthouse, then this replica with --load") from None
        return self.manager.num_participants()

    def all_reduce(self, tensor: torch.Tensor):
        """Sum over the quorum, in place; the returned work's wait() completes it (after a peer's failure the
        tensor is left as it was and commit() says False)."""
        comm_stats.COUNTER.add("sync", tensor.numel() * tensor.element_size()
                               * comm_stats.wire_fraction("all_reduce", self.manager.num_participants()))
        return self.manager.allreduce(tensor, reduce_op=dist.ReduceOp.SUM)

    def commit(self) -> bool:
        """Whether every replica of the quorum completed this sync's collectives (then, and only then, apply it)."""
        with self.watchdog.paused():
            return self.manager.should_commit()


class TorchftTransport:
    """SyncExchange's transport over the quorum: sums only (bf16/int8 need all-to-all and all-gather, which
    torchft's Manager does not carry), of a size known only once the quorum met."""

    def __init__(self, replicas: TorchftReplicas):
        self.replicas = replicas

    @property
    def size(self) -> int:
        return self.replicas.manager.num_participants()

    def all_reduce(self, tensor: torch.Tensor):
        return self.replicas.all_reduce(tensor)


class TorchftMembers:
    """members.py's gather over the quorum, slots by --replica-id: torchft carries sums only, so each replica
    writes its row into its own slot of a zero table (plus a contributes flag) and the table is summed. A slot whose
    replica is absent stays zero, as does the flag of one that heals in this quorum (its parameters are the
    consensus, so it has nothing to add)."""
    always_all_present = False

    def __init__(self, replicas: TorchftReplicas, slot: int, slots: int):
        self.replicas, self.slot, self.slots = replicas, slot, slots
        self.contributing = True  # set by the mode once the quorum met

    def gather(self, mine: torch.Tensor) -> Tuple[torch.Tensor, List[bool]]:
        table = torch.zeros(self.slots, mine.numel() + 1, dtype=torch.float64, device=mine.device)
        table[self.slot, :-1] = mine
        table[self.slot, -1] = float(self.contributing)
        self.replicas.all_reduce(table).wait()
        return table[:, :-1].to(mine.dtype), [flag > 0.5 for flag in table[:, -1].tolist()]


class StepWatchdog:
    """Ends this process, with one line, when no iteration completes within `seconds`, so that a hung replica
    cannot stall the quorum of the others. `beat()` at every iteration (the first arms it); waits for the quorum do
    not count."""

    def __init__(self, seconds: float, replica_id: int):
        self.seconds, self.replica_id = seconds, replica_id
        self.last, self.pauses = None, 0
        threading.Thread(target=self._watch, name="replica-step-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        self.pauses += 1
        try:
            yield
        finally:
            self.pauses -= 1
            self.beat()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            if self.last is not None and not self.pauses and time.monotonic() - self.last > self.seconds:
                print(f"error: replica {self.replica_id} completed no iteration in {self.seconds:g} s "
                      "(--replica-step-timeout-secs); exiting so that the other replicas go on", file=sys.stderr,
                      flush=True)
                os._exit(1)


LAYOUT = ("TP", "PP", "data-parallel ranks", "layers", "hidden size", "FFN hidden size", "attention heads")


def layout(args) -> tuple:
    """What every replica job must run alike: its parallel sizes (rank k of each exchanges shard k with the others'
    rank k) and the model's shape, in LAYOUT's order."""
    return (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size,
            args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads)


def require_same_layout(mine: tuple, theirs: tuple, whom: str) -> None:
    differences = ", ".join(f"{name} {a} vs {b}" for name, a, b in zip(LAYOUT, mine, theirs) if a != b)
    require(not differences, f"this replica's layout differs from {whom}'s ({differences}): every replica of a "
            "--replica-coordinator torchft run needs the same parallel sizes and model; relaunch it with theirs")


def validate(args) -> None:
    """The flags of a replica launched on its own (one UsageError line each); fills in the shard group (the
    launch's data-parallel ranks) and warm-up (none: it would average gradients over the replicas every step)."""
    import importlib.util

    require(importlib.util.find_spec("torchft") is not None,
            "--replica-coordinator torchft needs the torchft package: pip install torchft")
    require(os.environ.get("TORCHFT_LIGHTHOUSE"),
            "--replica-coordinator torchft: set TORCHFT_LIGHTHOUSE=http://HOST:PORT to a running lighthouse "
            "(start one with: python -m megatron_edit.lighthouse --bind ADDRESS:29510 --min_replicas 1, on an "
            "address every replica reaches; see docs/running_across_clusters.md)")
    require(args.replica_index is not None and 0 <= args.replica_index < args.num_replicas,
            f"--replica-coordinator torchft needs --replica-id in [0, {args.num_replicas}) (--num-replicas "
            f"{args.num_replicas})")
    dp = args.data_parallel_size
    require(args.model_shard_group_size in (None, dp),
            f"--model-shard-group-size {args.model_shard_group_size}: with --replica-coordinator torchft a launch is "
            f"one replica, sharded over all its {dp} data-parallel ranks; drop the flag")
    args.model_shard_group_size = dp
    require(not args.local_sgd_warmup_iters and not args.local_sgd_warmup_fraction,
            "--replica-coordinator torchft: warm-up averages gradients over the replicas at every step, which "
            "separate jobs do not do; start from a warmed-up checkpoint (--load) with --local-sgd-warmup-iters 0")
    args.local_sgd_warmup_iters = 0
    require(args.sync_dtype == "fp32",
            "--replica-coordinator torchft exchanges in fp32 (torchft's quorum carries all-reduces only); "
            "drop --sync-dtype")
    require(args.sync_delay_steps == 0 and args.sync_fragments == 1,
            "--replica-coordinator torchft: a sync commits (or is undone) within its iteration, so it cannot be "
            "delayed or split; drop --sync-delay-steps and --sync-fragments")
    secret_file = sync_secret.secret_file(args.sync_secret_file)
    if secret_file:
        sync_secret.check_secret_file(secret_file)
    else:
        interface = network.listen_interface(args.sync_interface)
        require(interface.is_loopback,
                f"--replica-coordinator torchft listening on {interface.name} ({interface.address}): replicas that "
                f"other machines reach must prove a shared secret; give every replica --sync-secret-file FILE (or "
                f"{sync_secret.SECRET_FILE_VARIABLE}; head -c 32 /dev/urandom > FILE; chmod 600 FILE)")
    require(args.torchft_min_replicas >= 1 and args.torchft_timeout_secs > 0 and args.torchft_quorum_timeout_secs > 0
            and args.replica_step_timeout_secs > 0,
            "--torchft-min-replicas must be >= 1 and the torchft timeouts > 0")
