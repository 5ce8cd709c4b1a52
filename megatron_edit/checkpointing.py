"""Save and load everything that changes the future of a run, atomically, in Megatron's directory layout.

    <save>/latest_checkpointed_iteration.txt      the tracker: iteration of the newest complete checkpoint
    --ckpt-format torch:
    <save>/iter_0000010/metadata.json             model shape, layout, mode, file sizes and SHA-256s (written last)
    <save>/iter_0000010/mp_rank_00_000_dp_000/model_optim_rng.pt    one file per rank
    --ckpt-format torch_dist (dist_checkpoint.py: megatron-core's format, which reshards):
    <save>/iter_0000010/megatron_edit.json        the same record (metadata.json is dist_checkpointing's own)
    <save>/iter_0000010/common.pt, __0_0.distcp, ...
    A torch_dist checkpoint without our record is Megatron-LM's: it loads too (weights, optimizer, iteration).

Each rank's file holds its model, the inner optimizer (the values of the parameters it steps and its state),
the LR scheduler, its iteration and data positions, every RNG state, and the data-parallel mode's state
(EDiT: anchor and momentum shards, anomaly detectors, step counters, sync clock). A checkpoint is written
under iter_X.tmp and renamed, and the tracker moves, only once every rank's file is in place; loading skips
a newest checkpoint that is incomplete, unreadable or changed since it was written (a file's size or SHA-256, the
ranks hashing the files in turn), with a warning, in favour of the previous one.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_edit import dist_checkpoint
from megatron_edit.errors import UsageError
from megatron_edit.lr_schedule import load_scheduler_state
from megatron_edit.optimizers import inner_optimizers
from megatron_edit.rng_state import rng_state, set_rng_state
from megatron_edit.safe_load import load_without_code

TRACKER = "latest_checkpointed_iteration.txt"
RECORD = {"torch": "metadata.json", "torch_dist": "megatron_edit.json"}  # per format: our record, written last
# The model's shape as the command line gives it (what --use-checkpoint-args takes from a checkpoint).
MODEL_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
              "max_position_embeddings", "swiglu", "normalization", "position_embedding_type",
              "untie_embeddings_and_output_weights", "disable_bias_linear")
# What must match for a checkpoint to load; data parallelism may differ where the mode allows it.
SHAPE_KEYS = MODEL_KEYS + ("padded_vocab_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                           "bf16", "fp16", "use_distributed_optimizer", "dp_mode")
# What torch_dist lets differ besides the data-parallel mode (whose state then starts from the loaded weights); the
# distributed optimizer's groups do not load into a plain optimizer, nor back.
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size")
OPTIMIZER_KEYS = ("use_distributed_optimizer",)  # what may differ when the optimizer is not loaded


def _iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rank_file(directory: str, tp: int, pp: int, dp: int) -> str:
    return os.path.join(directory, f"mp_rank_{tp:02d}_{pp:03d}_dp_{dp:03d}", "model_optim_rng.pt")


def _this_rank_file(directory: str, dp_rank: Optional[int] = None) -> str:
    return _rank_file(directory, parallel_state.get_tensor_model_parallel_rank(),
                      parallel_state.get_pipeline_model_parallel_rank(),
                      parallel_state.get_data_parallel_rank() if dp_rank is None else dp_rank)


def _optimizer_state(optimizer) -> list:
    """Per inner optimizer: the values of the tensors torch steps (fp32 main parameters or the parameters
    themselves, full or this rank's shard) and torch's state for them."""
    states = []
    for inner in inner_optimizers(optimizer):
        params = [p for group in inner.optimizer.param_groups for p in group["params"]]
        states.append({"params": [p.detach().cpu().clone() for p in params],
                       "torch": inner.optimizer.state_dict(),
                       "grad_scaler": inner.grad_scaler.state_dict() if getattr(inner, "grad_scaler", None) else None})
    return states


@torch.no_grad()
def _load_optimizer_state(optimizer, states: list) -> None:
    for inner, state in zip(inner_optimizers(optimizer), states):
        params = [p for group in inner.optimizer.param_groups for p in group["params"]]
        for param, value in zip(params, state["params"]):
            param.copy_(value)
        inner.optimizer.load_state_dict(state["torch"])
        if state["grad_scaler"] is not None:
            inner.grad_scaler.load_state_dict(state["grad_scaler"])


def _metadata(args, iteration: int) -> dict:
    meta = {key: getattr(args, key) for key in SHAPE_KEYS}
    meta.update(iteration=iteration, format=args.ckpt_format, optimizer=not args.no_save_optim,
                rng=not args.no_save_rng, data_parallel_size=args.data_parallel_size,
                model_shard_group_size=getattr(args, "model_shard_group_size", None) or args.data_parallel_size)
    return meta


@contextlib.contextmanager
def _parameters_gathered(trainer):
    """With --overlap-param-gather the optimizer's updated parameters reach every rank only in the next forward;
    a checkpoint needs them now (Megatron-LM likewise turns the forward pre-hooks off around a save)."""
    if not trainer.args.overlap_param_gather:
        yield
        return
    for chunk in trainer.model:
        chunk.disable_forward_pre_hook()  # all-gathers now
    try:
        yield
    finally:
        for chunk in trainer.model:
            chunk.enable_forward_pre_hook()


def save_checkpoint(trainer, iteration: int, label: Optional[int] = None) -> None:
    """Every rank writes its file into iter_X.tmp; rank 0 completes the directory, renames it, moves the tracker.
    `iteration` is this rank's; `label`, the one the checkpoint is filed under, where replicas differ (A-EDiT)."""
    args = trainer.args
    label = iteration if label is None else label
    final = _iteration_dir(args.save, label)
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    try:
        with _parameters_gathered(trainer):
            if args.ckpt_format == "torch_dist":
                dist_checkpoint.save(trainer, label, iteration, staging)
            else:
                _save_rank_file(trainer, iteration, staging)
        error = None
    except Exception as exc:  # a full disk (ENOSPC), a quota, a file-size limit: this save is lost, not the last one
        cause = _os_error(exc)
        if cause is None:
            raise
        error = f"rank {dist.get_rank()}: {cause.strerror or cause}"
    _refuse_failed_save(args, label, staging, error)
    files = _contents(staging)
    if dist.get_rank() == 0:
        meta = _metadata(args, label)
        meta["files"] = files
        with open(os.path.join(staging, RECORD[args.ckpt_format]), "w") as f:
            json.dump(meta, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        with open(os.path.join(args.save, TRACKER + ".tmp"), "w") as f:
            f.write(str(label))
        os.replace(os.path.join(args.save, TRACKER + ".tmp"), os.path.join(args.save, TRACKER))
        _remove_old(args)
        print(f" saved checkpoint at iteration {label:7d} to {args.save}", flush=True)
    dist.barrier()


def _os_error(exc: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind `exc`: torch's writers re-raise a failed write as a RuntimeError."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _refuse_failed_save(args, label: int, staging: str, error: Optional[str]) -> None:
    """Every rank learns whether any rank could not write its part; if one could not, the partial staging folder
    goes and every rank stops with one line, the last complete checkpoint untouched (the tracker still names it)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if not failed:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    previous = max(_complete_iterations(args.save), default=None)
    kept = "no earlier checkpoint is there" if previous is None else f"iteration {previous} is intact"
    more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
    raise UsageError(f"the checkpoint of iteration {label} could not be written ({failed[0]}{more}); its partial "
                     f"folder is removed and in {args.save} {kept}: free space, then resume with --load")


def _save_rank_file(trainer, iteration: int, staging: str) -> None:
    path = _this_rank_file(staging)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {
        "iteration": iteration,
        "evaluations": trainer.evaluations,
        "model": [chunk.state_dict() for chunk in trainer.model],
        "optimizer": None if trainer.args.no_save_optim else _optimizer_state(trainer.optimizer),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": None if trainer.args.no_save_rng else rng_state(),
        "dp_mode": trainer.dp_mode.state_dict(),
    }
    with open(path + ".tmp", "wb") as f:  # a Python file: a failed write keeps its OSError (errno) as the context
        torch.save(state, f)
    os.replace(path + ".tmp", path)


def _remove_old(args) -> None:
    if args.keep_last_checkpoints is None:
        return
    iterations = sorted(_complete_iterations(args.save))
    for old in iterations[:-args.keep_last_checkpoints]:
        shutil.rmtree(_iteration_dir(args.save, old), ignore_errors=True)


def _record_path(directory: str) -> Optional[str]:
    """Our record of the checkpoint in `directory` (in either format), or None if it was never completed. (A
    metadata.json beside a common.pt is dist_checkpointing's, not the torch format's record.)"""
    for name in (RECORD["torch_dist"], RECORD["torch"]):
        if os.path.exists(os.path.join(directory, name)) and not (
                name == RECORD["torch"] and os.path.exists(os.path.join(directory, "common.pt"))):
            return os.path.join(directory, name)
    return None


def _is_foreign(directory: str) -> bool:
    """A torch_dist checkpoint without our record: written by Megatron-LM (dist_checkpointing's metadata.json,
    the common state, torch DCP's .metadata, all written once the tensors are)."""
    return _record_path(directory) is None and all(
        os.path.exists(os.path.join(directory, name)) for name in ("metadata.json", "common.pt", ".metadata"))


def _foreign_record(directory: str) -> dict:
    """Our record of a Megatron-LM checkpoint, from the arguments it pickled (Megatron-LM's names)."""
    args = load_without_code(os.path.join(directory, "common.pt"))["args"]
    meta = {key: getattr(args, key, None) for key in SHAPE_KEYS}
    if not getattr(args, "group_query_attention", False):
        meta["num_query_groups"] = args.num_attention_heads
    if hasattr(args, "add_bias_linear"):
        meta["disable_bias_linear"] = not args.add_bias_linear
    meta.update(dp_mode=getattr(args, "dp_mode", "ddp"), iteration=args.iteration, format="torch_dist",
                optimizer=not getattr(args, "no_save_optim", False), rng=not getattr(args, "no_save_rng", False),
                data_parallel_size=args.data_parallel_size, model_shard_group_size=None, files={}, foreign=True)
    return meta


def _is_iteration_dir_name(name: str) -> bool:
    """`iter_0000100`, one checkpoint's directory (not a staging `.tmp`)."""
    return name.startswith("iter_") and name[5:].isdigit()


def _complete_iterations(root: str) -> list:
    found = []
    for name in os.listdir(root):
        if _is_iteration_dir_name(name):
            directory = os.path.join(root, name)
            if _record_path(directory) or _is_foreign(directory):
                found.append(int(name[5:]))
    return found


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _my_share(names: list) -> list:
    """The names this rank reads when the ranks share reading a checkpoint's files (all of them outside a group)."""
    if not dist.is_initialized():
        return names
    return names[dist.get_rank()::dist.get_world_size()]


def _contents(staging: str) -> dict:
    """{file: [size, SHA-256]} of a written checkpoint (every rank hashes its share of the files)."""
    names = sorted(os.path.relpath(os.path.join(d, name), staging) for d, _, files in os.walk(staging)
                   for name in files)
    mine = {name: [os.path.getsize(os.path.join(staging, name)), _sha256(os.path.join(staging, name))]
            for name in _my_share(names)}
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    return {name: entry for share in shares for name, entry in sorted(share.items())}


def _incomplete(directory: str, meta: dict) -> Optional[str]:
    """Why the checkpoint in `directory` cannot be used (a file missing or not the size it was written), or None."""
    for name, written in sorted(meta["files"].items()):
        path = os.path.join(directory, name)
        expected = written[0] if isinstance(written, list) else written  # records before checksums: the size
        if not os.path.exists(path):
            return f"{path} is missing"
        if os.path.getsize(path) != expected:
            return f"{path} has {os.path.getsize(path)} bytes, {expected} were written"
    return None


def _changed(directory: str, meta: dict) -> Optional[str]:
    """Which file of the checkpoint in `directory` no longer holds what was written (its SHA-256), or None. Every
    rank hashes its share of the files and all learn the answer (a collective, in a process group)."""
    recorded = sorted((name, written[1]) for name, written in meta["files"].items() if isinstance(written, list))
    problems = [f"{os.path.join(directory, name)} changed since it was written (its SHA-256 differs)"
                for name, digest in _my_share(recorded) if _sha256(os.path.join(directory, name)) != digest]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, problems)
        problems = [problem for rank in everyone for problem in rank]
    return problems[0] if problems else None


def _check_compatible(meta: dict, args, parts: "LoadParts") -> None:
    from megatron_edit.dp import DP_MODES

    resharding = meta.get("format", "torch") == "torch_dist"
    free = (LAYOUT_KEYS + ("dp_mode",) if resharding else ()) + (() if parts.optimizer else OPTIMIZER_KEYS)
    mismatches = [f"{key} {meta[key]} (checkpoint) vs {getattr(args, key)} (this run)" for key in SHAPE_KEYS
                  if meta.get(key) != getattr(args, key) and key not in free]
    if not resharding:
        mismatches += DP_MODES[args.dp_mode].check_resume(meta, args)
    if mismatches:
        raise UsageError(f"checkpoint {meta['iteration']} does not fit this run: " + "; ".join(mismatches))


def _source_dp_rank(meta: dict, args) -> int:
    """Which saved data-parallel rank this rank continues: the same shard position in replica m mod M_saved."""
    dp_rank = parallel_state.get_data_parallel_rank()
    shard = meta["model_shard_group_size"]
    saved_replicas = meta["data_parallel_size"] // shard
    return (dp_rank // shard) % saved_replicas * shard + dp_rank % shard


def find_checkpoint(root: str, save: Optional[str] = None, step: Optional[int] = None,
                    verify: bool = True) -> Optional[tuple]:
    """(directory, metadata) of the newest usable checkpoint under `root` (of iteration `step` if given: Megatron-LM's
    --ckpt-step), or None if there is none. `save`: this run's --save, where nothing saved yet is no error.
    verify: check every file's SHA-256 too (reading the checkpoint once; in a process group every rank calls it)."""
    if not os.path.isdir(root):
        if root == save:  # the usual `--save D --load D`: nothing saved yet
            return None
        raise UsageError(f"--load {root} does not exist")
    candidates = sorted(_complete_iterations(root), reverse=True)
    tracked = None
    if os.path.exists(os.path.join(root, TRACKER)):
        with open(os.path.join(root, TRACKER)) as f:
            text = f.read().strip()
        tracked = int(text) if text.isdigit() else None
        if tracked is None:
            _warn(f"{os.path.join(root, TRACKER)} holds no iteration number ({text[:40]!r}); looking for the newest "
                  "complete checkpoint")
        elif tracked not in candidates:
            _warn(f"the tracker names iteration {tracked}, which is not a complete checkpoint; looking for an older one")
    if step is not None:
        if step not in candidates:
            raise UsageError(f"--ckpt-step {step}: {root} holds no complete checkpoint of iteration {step} (it holds "
                             f"{', '.join(map(str, sorted(candidates))) or 'none'})")
        candidates = [step]
    for iteration in candidates:
        directory = _iteration_dir(root, iteration)
        try:
            if _is_foreign(directory):
                meta = _foreign_record(directory)
            else:
                with open(_record_path(directory)) as f:
                    meta = json.load(f)
        except (OSError, json.JSONDecodeError, EOFError, RuntimeError, AttributeError) as exc:
            _warn(f"skipping {directory}: unreadable metadata ({exc})")
            continue
        problem = _incomplete(directory, meta) or (_changed(directory, meta) if verify else None)
        if problem:
            _warn(f"skipping {directory}: {problem}")
            continue
        return directory, meta
    return None


def _warn(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:  # tools read checkpoints outside a process group
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class LoadParts:
    """What --load restores besides the weights, from Megatron-LM's flags."""
    optimizer: bool  # the inner optimizer and the LR schedule
    rng: bool
    progress: bool   # iteration, evaluations, the data-parallel mode's state; --finetune starts over at 0

    @classmethod
    def from_args(cls, args) -> "LoadParts":
        return cls(optimizer=not (args.finetune or args.no_load_optim), rng=not (args.finetune or args.no_load_rng),
                   progress=not args.finetune)

    def check_saved(self, meta: dict) -> None:
        """One line if the checkpoint lacks a part this run asked for (saved with --no-save-optim / -rng)."""
        for part, flag in (("optimizer", "optim"), ("rng", "rng")):
            if getattr(self, part) and not meta.get(part, True):
                raise UsageError(f"checkpoint {meta['iteration']} was saved with --no-save-{flag}: load it with "
                                 f"--no-load-{flag} or --finetune")


def load_checkpoint(trainer) -> int:
    """Restore this rank from the newest usable checkpoint under --load; returns the iteration to continue from
    (0 if there is none, or with --finetune)."""
    args = trainer.args
    found = find_checkpoint(args.load, args.save, args.ckpt_step)
    if found is None:
        name = os.path.basename(os.path.normpath(args.load))
        hint = (f"it is one checkpoint's directory: give its parent, --load {os.path.dirname(os.path.normpath(args.load))}"
                if _is_iteration_dir_name(name) else "no complete iter_* directory is in it")
        if args.load != args.save:  # a checkpoint to start from was asked for, not the restart-safe --save D --load D
            raise UsageError(f"--load {args.load} holds no checkpoint to load ({hint}); to start from scratch, "
                             "drop --load or give --load and --save the same directory")
        _warn(f"no checkpoint under {args.load} ({hint}); starting from scratch")
        return 0
    directory, meta = found
    parts = LoadParts.from_args(args)
    _check_compatible(meta, args, parts)
    parts.check_saved(meta)
    if meta.get("format", "torch") == "torch_dist":
        iteration, mode_restored = dist_checkpoint.load(trainer, directory, parts)
    else:
        iteration, mode_restored = _load_rank_file(trainer, directory, meta, parts)
    if not parts.optimizer:
        trainer.optimizer.reload_model_params()  # fp32 main parameters (bf16, distributed optimizer) from the weights
    if not mode_restored:
        trainer.dp_mode.begin_from_loaded_weights()
    if dist.get_rank() == 0:
        start = "" if parts.progress else f" (--finetune: weights of iteration {meta['iteration']})"
        print(f" loaded checkpoint from {directory} at iteration {iteration}{start}", flush=True)
    return iteration


def _load_rank_file(trainer, directory: str, meta: dict, parts: LoadParts) -> Tuple[int, bool]:
    args = trainer.args
    path = _this_rank_file(directory, _source_dp_rank(meta, args))
    try:
        state = load_without_code(path)
    except UsageError:
        raise
    except Exception as exc:  # torch raises assorted errors on a truncated file
        raise UsageError(f"{path} cannot be read ({exc}); delete {directory} to fall back to an older one")
    for chunk, chunk_state in zip(trainer.model, state["model"]):
        chunk.load_state_dict(chunk_state)
    if parts.optimizer:
        _load_optimizer_state(trainer.optimizer, state["optimizer"])
        load_scheduler_state(trainer.scheduler, state["scheduler"], state["iteration"])
    if parts.rng:
        set_rng_state(state["rng"])
    if not parts.progress:
        return 0, False
    trainer.dp_mode.load_state_dict(state["dp_mode"], same_replica=meta["data_parallel_size"] == args.data_parallel_size)
    trainer.evaluations = state["evaluations"]
    return state["iteration"], True
