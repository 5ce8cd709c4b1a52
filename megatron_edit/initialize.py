"""Process start-up: who am I (torchrun, Slurm or a lone process), which device, which groups, which seeds."""
import dataclasses
import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_edit import network, platform
from megatron_edit.errors import UsageError


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # processes on this node


def launch_env() -> LaunchEnv:
    """Ranks from torchrun's variables, else from `srun`'s, else a single process."""
    env = os.environ
    if "RANK" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", world)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = int(env["SLURM_NTASKS"])
        per_node = env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0]  # e.g. "4(x2)"
        return LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), int(per_node))
    return LaunchEnv(0, 1, 0, 1)


def _free_port(address: str) -> int:
    with network.bound_socket(address, 0) as s:
        return s.getsockname()[1]


def _rendezvous_store(env: LaunchEnv) -> dist.Store:
    """The key-value store processes meet in, namespaced by torchrun's restart count: after a rank dies and
    torchrun restarts the workers, gloo must not find the dead attempt's addresses under the same keys."""
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=env.rank == 0 and not agent_hosts_store)
    return dist.PrefixStore(f"megatron_edit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def initialize_megatron(args) -> torch.device:
    """Start torch.distributed and megatron-core's parallel state, bind the device, seed every RNG."""
    env = launch_env()
    device_type = args.device_type
    if args.deterministic_mode:  # before any kernel runs: cuBLAS reads its workspace setting once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = platform.setup_device(device_type, env.local_rank)
    interface = network.listen_interface(args.sync_interface)
    network.use_interface(interface)
    network.bind_stores(interface)
    if env.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", interface.address)
        os.environ.setdefault("MASTER_PORT", str(_free_port(interface.address)))
    elif "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UsageError("MASTER_ADDR and MASTER_PORT must be set for a multi-process launch "
                         "(torchrun sets them; under srun export them from the batch script)")
    dist.init_process_group(
        backend=platform.distributed_backend(device_type),
        store=_rendezvous_store(env),
        rank=env.rank,
        world_size=env.world_size,
        device_id=device if device_type == "cuda" else None,
        timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        # Replicas as megatron-core's distributed-optimizer instances: this builds the shard x sync groups.
        num_distributed_optimizer_instances=args.num_model_replicas,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
    )
    set_random_seed(args.seed)
    return device


def set_random_seed(seed: int) -> None:
    """Megatron-LM's convention: pipeline stages differ by 100, tensor-parallel RNG streams via the tracker.

    Weights do not depend on these seeds (see model.initialize_weights); dropout does.
    """
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
