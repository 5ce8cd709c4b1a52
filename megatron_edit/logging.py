"""Console lines in Megatron-LM's format (users' log parsers depend on it) and wandb, both from one rank."""
import dataclasses
import datetime
import math
import os
import re
from typing import Dict, List

import torch.distributed as dist


def is_last_rank() -> bool:
    """Megatron-LM prints training lines from the last rank: it holds the loss under pipeline parallelism."""
    return dist.get_rank() == dist.get_world_size() - 1


def print_rank_last(message: str) -> None:
    if is_last_rank():
        print(message, flush=True)


def iteration_line(iteration, train_iters, consumed_samples, elapsed_ms, learning_rate, global_batch_size,
                   lm_loss, grad_norm, tokens_per_second, tflops_per_device, eta_seconds, extra=None, num_zeros=None,
                   params_norm=None) -> str:
    fields = [
        f" iteration {iteration:8d}/{train_iters:8d}",
        f" consumed samples: {consumed_samples:12d}",
        f" elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f" learning rate: {learning_rate:.6E}",
        f" global batch size: {global_batch_size:5d}",
        f" lm loss: {lm_loss:.6E}",
        f" grad norm: {grad_norm:.3f}",
    ]
    if num_zeros is not None:  # --log-num-zeros-in-grad
        fields.append(f" num zeros: {num_zeros}")
    if params_norm is not None:  # --log-params-norm
        fields.append(f" params norm: {params_norm:.3f}")
    fields += [
        f" tokens/s: {tokens_per_second:.1f}",
        f" TFLOP/s: {tflops_per_device:.3f}",
        f" ETA: {datetime.timedelta(seconds=round(eta_seconds))}",
    ]
    fields += [f" {key}: {value:.4g}" for key, value in (extra or {}).items()]
    return " |".join(fields) + " |"


def perplexity(loss: float) -> float:
    return math.exp(min(20.0, loss))


def validation_line(label: str, lm_loss: float) -> str:
    text = f" validation loss at {label} | lm loss value: {lm_loss:.6E} | lm loss PPL: {perplexity(lm_loss):.6E} | "
    rule = "-" * len(text)
    return f"{rule}\n{text}\n{rule}"


class WandbTracker:
    """wandb run of the last rank when --wandb-project is set (in WANDB_MODE if set, else online with a
    WANDB_API_KEY and offline without), else nothing."""

    def __init__(self, args):
        self.run = None
        if not args.wandb_project or not is_last_rank():
            return
        import wandb

        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, type(None)))}
        self.run = wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=args.wandb_save_dir,
                              config=config, mode=os.environ.get("WANDB_MODE") or (
                                  "online" if os.environ.get("WANDB_API_KEY") else "offline"))

    def log(self, metrics: dict, iteration: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=iteration)

    def finish(self) -> str:
        """Where the run's files are, for the summary; empty without a run."""
        if self.run is None:
            return ""
        directory = self.run.dir
        self.run.finish()
        return os.path.dirname(directory)


class TensorBoardTracker:
    """Megatron-LM's --tensorboard-dir: the last rank writes the same series as wandb's as TensorBoard scalars."""

    def __init__(self, args):
        self.writer = None
        if not args.tensorboard_dir or not is_last_rank():
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=args.tensorboard_queue_size)

    def log(self, metrics: dict, iteration: int) -> None:
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(name, value, iteration)

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Trackers:
    """Every tracker the flags ask for (wandb, TensorBoard), logged to alike."""

    def __init__(self, args):
        self.wandb, self.tensorboard = WandbTracker(args), TensorBoardTracker(args)

    def log(self, metrics: dict, iteration: int) -> None:
        self.wandb.log(metrics, iteration)
        self.tensorboard.log(metrics, iteration)

    def finish(self) -> str:
        """The wandb run's directory, for the summary (empty without one)."""
        self.tensorboard.finish()
        return self.wandb.finish()


_ITERATION = re.compile(r" iteration\s+(\d+)/\s*\d+ \| consumed samples:\s+(\d+) \| elapsed time per iteration \(ms\): "
                        r"([0-9.]+) \| learning rate: ([0-9.E+-]+) \|.*? lm loss: ([0-9.E+-]+) \|")
_VALIDATION = re.compile(r" validation loss at iteration (\d+) \| lm loss value: ([0-9.E+-]+)")
_THROUGHPUT = re.compile(r"   throughput: ([0-9.]+) tokens/s, ([0-9.e+-]+) TFLOP/s per device, ([0-9.]+) s of training")
_MEMORY = re.compile(r"   peak memory: ([0-9.]+) MiB; communication per rank \(bytes sent\): (.*)")


def parse_iteration_lines(text: str) -> List[dict]:
    """iteration, consumed_samples, ms_per_iteration, learning_rate and lm_loss of every iteration line in a log,
    in order."""
    return [{"iteration": int(i), "consumed_samples": int(c), "ms_per_iteration": float(ms),
             "learning_rate": float(lr), "lm_loss": float(loss)} for i, c, ms, lr, loss in _ITERATION.findall(text)]


def parse_validation_lines(text: str) -> Dict[int, float]:
    """iteration -> validation loss, from a log."""
    return {int(i): float(loss) for i, loss in _VALIDATION.findall(text)}


@dataclasses.dataclass
class TrainingLog:
    """What tools read back from a run's console output (the lines above are the format)."""
    iterations: List[dict]            # parse_iteration_lines' fields per log line
    validation: Dict[int, float]      # iteration -> validation loss
    tokens_per_second: float
    tflops_per_device: float
    train_seconds: float
    peak_memory_mib: float
    bytes_per_group: Dict[str, float]
    text: str = dataclasses.field(repr=False, default="")  # the whole log, for anything else a tool looks for

    @classmethod
    def parse(cls, text: str) -> "TrainingLog":
        iterations, validation = parse_iteration_lines(text), parse_validation_lines(text)
        throughput, memory = _THROUGHPUT.search(text), _MEMORY.search(text)
        if not (iterations and throughput and memory):
            raise ValueError("not a complete training log (no iteration lines or no summary)")
        groups = {}
        for part in memory.group(2).split(", "):
            if part != "none":
                name, megabytes, _ = part.rsplit(" ", 2)
                groups[name] = float(megabytes) * 1e6
        return cls(iterations, validation, float(throughput.group(1)), float(throughput.group(2)),
                   float(throughput.group(3)), float(memory.group(1)), groups, text)
