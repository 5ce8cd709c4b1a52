"""The train loop: megatron-core's schedules, the inner optimizer step, the data-parallel mode's hooks,
evaluation and Megatron-LM's log lines. `pretrain` is the driver `pretrain_gpt.py` calls."""
import collections
import functools
import gc
import math
import signal
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_edit import platform
from megatron_edit.arguments import parse_args
from megatron_edit.checkpointing import load_checkpoint, save_checkpoint
from megatron_edit.data.batches import micro_batches
from megatron_edit.data.tokenizers import build_tokenizer
from megatron_edit.dp import StepPlan, build_dp_mode, comm_stats
from megatron_edit.dp.faults import FaultInjector
from megatron_edit.flops import flops_per_iteration
from megatron_edit.initialize import destroy, initialize_megatron, launch_env
from megatron_edit.logging import Trackers, iteration_line, perplexity, print_rank_last, validation_line
from megatron_edit.lr_schedule import build_scheduler
from megatron_edit.model import (initialize_weights, params_dtype, params_norm, transformer_config_from_args,
                                 unwrap_model)
from megatron_edit.optimizers import inner_optimizers
from megatron_edit.platform import mcore_internals
from megatron_edit.swap.layers import LayerSwapper


def ddp_config_from_args(args) -> DistributedDataParallelConfig:
    return DistributedDataParallelConfig(
        # Megatron-LM accumulates and reduces bf16 gradients in fp32.
        grad_reduce_in_fp32=args.bf16,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )


def optimizer_config_from_args(args) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=params_dtype(args),
        loss_scale=args.loss_scale,
        clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )


def build_model(model_provider: Callable, args, config, device: torch.device) -> List[torch.nn.Module]:
    """This rank's model chunks on `device`, initialized layout-free, cast for fp16/bf16 like Megatron-LM."""
    from megatron.core.transformer.module import Float16Module

    model = model_provider(
        args,
        config,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    initialize_weights(model, config, args.seed)
    model.to(device)
    if parallel_state.get_data_parallel_rank() == 0:  # Megatron-LM's line, one per (tensor, pipeline) rank
        total = sum(p.numel() for p in model.parameters())
        embedding = sum(p.numel() for name, p in model.named_parameters()
                        if name.startswith(("embedding.", "output_layer.")))
        print(f" > number of parameters on (tensor, pipeline) model parallel rank "
              f"({parallel_state.get_tensor_model_parallel_rank()}, {parallel_state.get_pipeline_model_parallel_rank()})"
              f": {total} (non-embedding: {total - embedding})", flush=True)
    if args.bf16 or args.fp16:
        model = Float16Module(config, model)
    return [model]


def _sum_loss_reports(losses_reduced) -> torch.Tensor:
    """[sum of token losses, number of tokens] over this step's micro-batches (zeros off the last stage)."""
    total = torch.zeros(2, dtype=torch.float64)
    for report in losses_reduced:
        total += report["lm loss"].detach().to("cpu", torch.float64)
    return total


class ReducedLoss:
    """Token-weighted mean loss over `group`, reduced by a collective that runs in the background until `value()`;
    meaningful on the last pipeline stage."""

    def __init__(self, total: torch.Tensor, group, device: torch.device):
        self.total = total.to(device, copy=True)  # on the device: NCCL reduces nothing else
        self.work = dist.all_reduce(self.total, group=group, async_op=True) \
            if parallel_state.is_pipeline_last_stage() else None

    def ready(self) -> bool:
        return self.work is None or self.work.is_completed()

    def value(self) -> float:
        if self.work is not None:
            self.work.wait()
        return (self.total[0] / self.total[1].clamp(min=1)).item()


class OrderedReports:
    """Log lines and tracker entries in iteration order, each emitted once its numbers are in. A logged training
    loss is reduced over every replica; under a local-SGD mode on a slow link that collective would wait behind a
    sync's exchange in flight, so it runs behind the next iterations and its line comes when it is done."""

    def __init__(self):
        self.queue = collections.deque()

    def add(self, emit: Callable[[], None], ready: Callable[[], bool] = lambda: True) -> None:
        self.queue.append((ready, emit))
        self.flush()

    def flush(self, wait: bool = False) -> None:
        while self.queue and (wait or self.queue[0][0]()):
            self.queue.popleft()[1]()


class StepResult(NamedTuple):
    loss_sums: torch.Tensor       # this rank's [loss sum, tokens] (see Trainer.mean_loss)
    grad_norm: Optional[float]    # None when the step was skipped
    num_zeros: Optional[float]    # zeros in the gradient, with --log-num-zeros-in-grad


class Trainer:
    """Holds what one run trains. The iteration protocol lives here: `plans()` asks the data-parallel mode
    whether and how each iteration runs, `train_step` runs one, `evaluate` evaluates what the replicas agree on.
    `hooks`: objects with train_batches(stream), before_step(plan) and after_step(plan) (dp/faults.py's injector,
    only when a fault flag asks for it)."""

    def __init__(self, args, model, optimizer, scheduler, dp_mode, forward_step_func, train_ds, valid_ds, device,
                 swapper=None, hooks=()):
        self.args, self.model, self.optimizer, self.scheduler = args, model, optimizer, scheduler
        self.dp_mode, self.forward_step_func = dp_mode, forward_step_func
        self.roles = dp_mode.roles()  # the groups this rank steps, reduces losses and reads data with
        self.swapper = swapper  # LayerSwapper with --swap-layers
        self.train_ds, self.valid_ds, self.device = train_ds, valid_ds, device
        self.forward_backward = get_forward_backward_func()
        self.start_iteration, self.evaluations = 0, 0
        self.hooks = list(hooks)
        self.seek(0)

    def seek(self, iteration: int) -> None:
        """Continue after `iteration` (a resumed run): data streams from where that run had read to."""
        args = self.args
        self.start_iteration = iteration
        dp_rank, dp_size = self.roles.train_data
        batches = dict(micro_batch_size=args.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, device=self.device,
                       vocab_size=args.padded_vocab_size)
        train = micro_batches(self.train_ds, iteration * args.global_batch_size, **batches)
        for hook in self.hooks:
            train = hook.train_batches(train)
        self.train_iter = train
        valid_rank, valid_size = self.roles.validation_data
        self.valid_microbatches = args.global_batch_size // (args.micro_batch_size * valid_size)
        valid_start = self.evaluations * args.eval_iters * args.global_batch_size
        self.valid_iter = micro_batches(self.valid_ds, valid_start, cyclic=True,
                                        **dict(batches, dp_rank=valid_rank, dp_size=valid_size))

    def _run_schedule(self, data_iterator, forward_only: bool):
        args = self.args
        return self.forward_backward(
            forward_step_func=self.forward_step_func,
            data_iterator=data_iterator,
            model=self.model,
            num_microbatches=self.valid_microbatches if forward_only else args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.seq_length,
            forward_only=forward_only,
        )

    def plans(self) -> Iterator[StepPlan]:
        """The data-parallel mode's plan for each iteration after the start, while it says train; then the mode
        finishes with the plan that stops (its final sync). A loop that breaks early (--exit-interval) finishes
        nothing: the run resumes from its checkpoint."""
        iteration = self.start_iteration + 1
        while True:
            plan = self.dp_mode.plan(iteration, finished=iteration > self.args.train_iters)
            if not plan.train:
                self.dp_mode.finish(plan)
                return
            yield plan
            iteration += 1

    def train_step(self, plan: StepPlan) -> StepResult:
        """One global batch: forward/backward over all micro-batches, inner optimizer step, mode hooks."""
        iteration = plan.iteration
        self.dp_mode.before_step(plan)
        for hook in self.hooks:
            hook.before_step(plan)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        swapper, first = self.swapper, iteration == self.start_iteration + 1
        if swapper is None:
            loss_sums = _sum_loss_reports(self._run_schedule(self.train_iter, forward_only=False))
        else:
            swapper.begin_step()
            with swapper.running(measure=first):
                loss_sums = _sum_loss_reports(self._run_schedule(self.train_iter, forward_only=False))
            plan_line = swapper.before_optimizer_step(plan_now=first)
            if plan_line:
                print_rank_last(plan_line)
        if self.args.empty_unused_memory_level >= 1:
            platform.empty_cache()
        grad_norm = num_zeros = None
        if self.args.check_for_nan_in_loss_and_grad and self._skip_non_finite(iteration, loss_sums):
            loss_sums.zero_()  # a skipped step's loss counts in no logged loss
        else:
            update_successful, grad_norm, num_zeros = self.optimizer.step()
            if update_successful:
                self.scheduler.step(increment=self.args.global_batch_size)
        if self.args.empty_unused_memory_level >= 2:
            platform.empty_cache()
        for hook in self.hooks:  # first: a straggler's stretch is of its step, not of a sync the mode runs after it
            hook.after_step(plan)
        self.dp_mode.after_step(plan)
        return StepResult(loss_sums, grad_norm, num_zeros)

    def _skip_non_finite(self, iteration: int, loss_sums: torch.Tensor) -> bool:
        """Whether this step's loss or gradients are non-finite on any rank of the mode's step group (one small
        all-reduce), in which case the mode stops training or has the step skipped. fp16's dynamic loss scale
        handles overflowing gradients itself, so there only the loss is checked."""
        finite_loss = bool(torch.isfinite(loss_sums).all())
        check_grads = not (self.args.fp16 and self.args.loss_scale is None)
        finite_grads = not check_grads or all(
            bool(torch.isfinite(grads.norm())) for chunk in self.model for grads in mcore_internals.grad_buffers(chunk))
        kind = 0 if finite_loss and finite_grads else (2 if not finite_loss else 1)
        worst = torch.tensor([kind * dist.get_world_size() + dist.get_rank()], dtype=torch.float64,
                             device=self.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.roles.step_group)
        kind, rank = divmod(int(worst.item()), dist.get_world_size())
        if kind == 0:
            return False
        self.dp_mode.on_non_finite_step(iteration, "loss" if kind == 2 else "gradient", rank)
        return True

    def reduce_loss(self, loss_sums: torch.Tensor) -> ReducedLoss:
        """The mean token loss over the global batch (every replica's share, as under ddp), from train_step's sums.
        A collective over the mode's loss group: call it on every rank, at log iterations only."""
        return ReducedLoss(loss_sums, self.roles.loss_group, self.device)

    def mean_loss(self, loss_sums: torch.Tensor) -> float:
        return self.reduce_loss(loss_sums).value()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss of the model the replicas agree on, over one whole validation batch per --eval-iters
        (NaN with --eval-iters 0: nothing is evaluated)."""
        if self.args.eval_iters == 0:
            return math.nan
        collect_garbage = self.args.manual_gc and self.args.manual_gc_eval
        if collect_garbage:
            gc.collect()
        for chunk in self.model:
            chunk.eval()
        self.evaluations += 1
        total = torch.zeros(2, dtype=torch.float64)
        with self.dp_mode.consensus():
            for _ in range(self.args.eval_iters):
                total += _sum_loss_reports(self._run_schedule(self.valid_iter, forward_only=True))
        for chunk in self.model:
            chunk.train()
        if collect_garbage:
            gc.collect()
        if self.args.empty_unused_memory_level >= 2:
            platform.empty_cache()
        return ReducedLoss(total, self.roles.loss_group, self.device).value()


def _report_validation(tracker: Trackers, iteration: int, loss: float) -> None:
    if math.isnan(loss):  # --eval-iters 0
        return
    print_rank_last(validation_line(f"iteration {iteration}", loss))
    tracker.log({"validation lm loss": loss, "validation lm loss PPL": perplexity(loss)}, iteration)


def _track_events(trainer: Trainer, tracker: Trackers, reports: OrderedReports) -> None:
    for iteration, values in trainer.dp_mode.pop_events():
        reports.add(functools.partial(tracker.log, values, iteration))


def train(trainer: Trainer, tracker: Trackers) -> Dict[str, float]:
    """Iterate to --train-iters with a log line every --log-interval and validation every --eval-interval."""
    args = trainer.args
    # This launch's share: with replicas as separate launches (torchft) a global batch spans all of them.
    tokens_per_iteration = args.global_batch_size * args.seq_length // args.replica_launches
    flops = flops_per_iteration(args) / args.replica_launches
    reports = OrderedReports()
    initial_valid_loss = trainer.evaluate()
    _report_validation(tracker, trainer.start_iteration, initial_valid_loss)

    bytes_at_start = comm_stats.COUNTER.snapshot()
    platform.synchronize()
    run_start = interval_start = started = time.perf_counter()  # run_start leaves out evaluations and saves
    valid_loss, iteration, last_loss = initial_valid_loss, trainer.start_iteration, None
    logged, last_saved, evaluated, exiting = trainer.start_iteration, None, None, False

    def log_iteration(iteration: int, loss: ReducedLoss, grad_norm, num_zeros) -> None:
        """Times the interval now; the line follows when the loss is reduced."""
        nonlocal interval_start, logged, last_loss
        platform.synchronize()
        now = time.perf_counter()
        seconds = (now - interval_start) / (iteration - logged)
        learning_rate, extra = trainer.optimizer.param_groups[0]["lr"], trainer.dp_mode.metrics()
        norm = params_norm(trainer.model, trainer.device) if args.log_params_norm else None
        tokens_per_second, tflops = tokens_per_iteration / seconds, flops / seconds / args.world_size / 1e12
        eta = max(args.train_iters - iteration, 0) * (now - run_start) / (iteration - trainer.start_iteration)

        def emit() -> None:
            print_rank_last(iteration_line(
                iteration, args.train_iters, iteration * args.global_batch_size, seconds * 1000.0, learning_rate,
                args.global_batch_size, loss.value(), grad_norm or 0.0, tokens_per_second, tflops, eta, extra,
                num_zeros=num_zeros, params_norm=norm))
            optional = {name: value for name, value in (("num-zeros", num_zeros), ("params-norm", norm))
                        if value is not None}
            tracker.log({"lm loss": loss.value(), "learning-rate": learning_rate, "grad-norm": grad_norm or 0.0,
                         **optional, "tokens/s": tokens_per_second, "TFLOP/s per device": tflops, **extra}, iteration)

        reports.add(emit, loss.ready)
        last_loss = loss
        interval_start, logged = time.perf_counter(), iteration

    def save(iteration: int, label: int) -> None:
        nonlocal interval_start, run_start, last_saved
        pause = time.perf_counter()
        save_checkpoint(trainer, iteration, label)
        last_saved = iteration
        interval_start += time.perf_counter() - pause
        run_start += time.perf_counter() - pause

    warmup_end, warmup_totals = trainer.roles.synchronous_warmup_iters, None
    signals = TerminationSignal() if args.exit_signal_handler else None
    if args.manual_gc:  # a collection inside a step stalls one rank, and every other at its next collective
        gc.disable()
        gc.collect()

    def manual_gc_due(iteration: int) -> bool:
        return args.manual_gc and args.manual_gc_interval > 0 and iteration % args.manual_gc_interval == 0

    for plan in trainer.plans():
        iteration = plan.iteration
        loss_sums, grad_norm, num_zeros = trainer.train_step(plan)
        if manual_gc_due(iteration):
            gc.collect()
        if iteration == warmup_end:  # where communication went: the synchronous warm-up's bytes and time
            platform.synchronize()
            warmup_totals = (dict(comm_stats.COUNTER.snapshot() - bytes_at_start), time.perf_counter() - run_start)
        _track_events(trainer, tracker, reports)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            log_iteration(iteration, trainer.reduce_loss(loss_sums), grad_norm, num_zeros)
        reports.flush()
        if iteration % args.eval_interval == 0 and iteration != args.train_iters:  # the last: after the final sync
            evaluated = iteration
            eval_start = time.perf_counter()
            valid_loss = trainer.evaluate()
            reports.add(functools.partial(_report_validation, tracker, iteration, valid_loss))
            interval_start += time.perf_counter() - eval_start
            run_start += time.perf_counter() - eval_start
        exiting = bool(args.exit_interval) and iteration % args.exit_interval == 0
        out_of_time = args.exit_duration_in_mins is not None and iteration % args.log_interval == 0 and \
            _out_of_time(started, args.exit_duration_in_mins, trainer.device)
        signalled = signals is not None and signals.received_anywhere(trainer.device)
        exiting = exiting or out_of_time or signalled
        if args.save:  # the end of training is saved below, after the final sync
            on_interval = bool(args.save_interval) and iteration % args.save_interval == 0
            label = trainer.dp_mode.checkpoint_due(iteration, exiting or (on_interval and iteration < args.train_iters))
            if label is not None:
                save(iteration, label)
        if exiting:
            reason = "SIGTERM" if signalled else f"--exit-duration-in-mins {args.exit_duration_in_mins}" \
                if out_of_time else f"--exit-interval {args.exit_interval}"
            print_rank_last(f" exiting after iteration {iteration} ({reason})")
            break
    _track_events(trainer, tracker, reports)  # a mode's final sync happens after the last iteration
    if iteration != logged:  # the last iteration always gets a line (A-EDiT's replicas may stop anywhere)
        log_iteration(iteration, trainer.reduce_loss(loss_sums), grad_norm, num_zeros)
    reports.flush(wait=True)
    final_label = trainer.dp_mode.final_checkpoint(iteration, last_saved) if args.save else None
    if final_label is not None:
        save(iteration, final_label)
    if not (exiting and evaluated == iteration):  # the model as training left it (after a final sync, if any)
        valid_loss = trainer.evaluate()
        _report_validation(tracker, iteration, valid_loss)
    platform.synchronize()
    train_seconds = time.perf_counter() - run_start
    bytes_per_group = dict(comm_stats.COUNTER.snapshot() - bytes_at_start)
    # Replicas may run different numbers of iterations (A-EDiT): throughput counts what all of them did.
    iterations_run = torch.tensor([float(iteration - trainer.start_iteration)], dtype=torch.float64,
                                  device=trainer.device)
    dist.all_reduce(iterations_run)
    iterations_run = iterations_run.item() / dist.get_world_size()
    return {
        "start_iteration": trainer.start_iteration,
        "initial_valid_loss": initial_valid_loss,
        "final_valid_loss": valid_loss,
        "final_train_loss": float("nan") if last_loss is None else last_loss.value(),
        "iterations": iteration,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_per_iteration * iterations_run / train_seconds,
        "tflops_per_device": flops * iterations_run / train_seconds / args.world_size / 1e12,
        "bytes_per_group": bytes_per_group,
        "ddp_bytes_per_rank": ddp_bytes_per_rank(args, trainer.model, iteration - trainer.start_iteration),
        "warmup": None if warmup_totals is None else {"iterations": warmup_end, "bytes_per_group": warmup_totals[0],
                                                      "seconds": warmup_totals[1]},
        "peak_memory_bytes": platform.max_memory_allocated_bytes(),
    }


def ddp_bytes_per_rank(args, model: List[torch.nn.Module], iterations: int) -> int:
    """The bytes synchronous DDP would have sent from this rank in `iterations`, counted as comm_stats counts:
    every iteration an all-reduce of the gradient buffer (its dtype as ddp_config_from_args makes it) over all
    data-parallel ranks, or with --use-distributed-optimizer a reduce-scatter of it and an all-gather of the parameters."""
    numel = sum(p.numel() for chunk in model for p in chunk.parameters() if p.requires_grad)
    grad_dtype = torch.float32 if ddp_config_from_args(args).grad_reduce_in_fp32 else params_dtype(args)
    grad_bytes = numel * torch.finfo(grad_dtype).bits // 8
    ranks = args.data_parallel_size
    if args.use_distributed_optimizer:
        param_bytes = numel * torch.finfo(params_dtype(args)).bits // 8
        per_iteration = (grad_bytes + param_bytes) * comm_stats.wire_fraction("all_gather", ranks)
    else:
        per_iteration = grad_bytes * comm_stats.wire_fraction("all_reduce", ranks)
    return int(per_iteration * iterations)


def _across_replicas_line(args, summary: Dict[str, float]) -> str:
    """What crossed between replicas (the sync group) against what DDP would have sent for the same run."""
    from megatron_edit.dp import DP_MODES

    synced = summary["bytes_per_group"].get(DP_MODES[args.dp_mode].cross_replica_group, 0)
    ddp = summary["ddp_bytes_per_rank"]
    verb = "reduce-scattered and all-gathered" if args.use_distributed_optimizer else "all-reduced"
    ratio = f" ({ddp / synced:.{1 if ddp < 10 * synced else 0}f}x more)" if synced else ""
    line = (f"   across replicas: sync group {synced / 1e6:.2f} MB per rank; DDP would have {verb} "
            f"{ddp / 1e6:.2f} MB{ratio}")
    warmup = summary.get("warmup")
    if warmup and synced:
        warmup_bytes = warmup["bytes_per_group"].get(DP_MODES[args.dp_mode].cross_replica_group, 0)
        line += (f"\n   warm-up (iterations 1-{warmup['iterations']}): {warmup_bytes / 1e6:.2f} MB "
                 f"({100 * warmup_bytes / synced:.0f}% of those bytes), {warmup['seconds']:.1f} s "
                 f"({100 * warmup['seconds'] / summary['train_seconds']:.0f}% of the training time)")
    return line


def _validation_summary(iteration: int, loss: float) -> str:
    if math.isnan(loss):
        return f"   validation loss at iteration {iteration}: not evaluated (--eval-iters 0)"
    return f"   validation loss at iteration {iteration}: {loss:.4f}  (perplexity {perplexity(loss):.2f})"


def summary_text(args, summary: Dict[str, float]) -> str:
    before, after = summary["initial_valid_loss"], summary["final_valid_loss"]
    return "\n".join([
        "=" * 78,
        f" training summary: {summary['iterations']} iterations, global batch {args.global_batch_size} x "
        f"{args.seq_length} tokens, TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} "
        f"DP={args.data_parallel_size} ({args.dp_mode})",
        _validation_summary(summary["start_iteration"], before),
        _validation_summary(summary["iterations"], after),
        f"   throughput: {summary['tokens_per_second']:.1f} tokens/s, "
        f"{summary['tflops_per_device']:.4g} TFLOP/s per device, {summary['train_seconds']:.1f} s of training",
        f"   peak memory: {summary['peak_memory_bytes'] / 2**20:.0f} MiB; communication per rank (bytes sent): "
        + (", ".join(f"{group} {nbytes / 1e6:.2f} MB" for group, nbytes in sorted(summary["bytes_per_group"].items()))
           or "none"),
        *([_across_replicas_line(args, summary)] if args.num_model_replicas > 1 else []),
        *([f"   checkpoint: {args.save}"] if args.save else []),
        *([f"   wandb run: {summary['wandb_dir']}"] if summary.get("wandb_dir") else []),
        *([f"   tensorboard: {args.tensorboard_dir}"] if args.tensorboard_dir else []),
        "=" * 78,
    ])


class TerminationSignal:
    """--exit-signal-handler: SIGTERM only sets a flag; the train loop ends after the iteration under way, saving
    first, once any rank has received it (one small all-reduce per iteration, so every rank stops at the same one)."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._receive)

    def _receive(self, signum, frame) -> None:
        self.received = True

    def received_anywhere(self, device: torch.device) -> bool:
        return _on_any_rank(self.received, device)


def _on_any_rank(condition: bool, device: torch.device) -> bool:
    """Whether `condition` holds on any rank (one small all-reduce: every rank gets the same answer)."""
    flag = torch.tensor([float(condition)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _out_of_time(started: float, minutes: float, device: torch.device) -> bool:
    """Whether `minutes` have passed since training started on any rank (at log iterations only: every rank stops
    at the same one)."""
    return _on_any_rank(time.perf_counter() - started > 60 * minutes, device)


def build_trainer(args, device: torch.device, datasets_provider: Callable, model_provider: Callable,
                  forward_step_func: Callable) -> Trainer:
    """Model, data-parallel mode, optimizer, schedule and data streams of this rank, ready to train."""
    tokenizer = build_tokenizer(args)
    config = transformer_config_from_args(args)
    model = build_model(model_provider, args, config, device)
    comm_stats.install()  # every mode's bytes on the wire, for the log and the summary
    dp_mode = build_dp_mode(args, ddp_config_from_args(args), config)
    swapper = None
    if args.swap_layers:
        swapper = LayerSwapper(list(unwrap_model(model[0]).decoder.layers), device, args.swap_resident_layers)
    model = dp_mode.wrap_model(model, swapper.swapped_params if swapper else [])
    optimizer = dp_mode.build_optimizer(model, optimizer_config_from_args(args))
    mcore_internals.check(model, inner_optimizers(optimizer))
    if swapper:
        swapper.install_hooks()
    scheduler = build_scheduler(args, optimizer)
    config.finalize_model_grads_func = dp_mode.finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if args.overlap_grad_reduce:  # as Megatron-LM: buckets reduce as backward fills them, on the last micro-batch
        config.no_sync_func = [chunk.no_sync for chunk in model]
        config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
        if len(model) == 1:
            config.no_sync_func, config.grad_sync_func = config.no_sync_func[0], config.grad_sync_func[0]

    train_ds, valid_ds, _ = datasets_provider(args, tokenizer)
    faults = FaultInjector.from_args(args, dp_mode.roles().replica) if FaultInjector.wanted(args) else None
    if faults is not None:
        faults.attach(dp_mode)
    trainer = Trainer(args, model, optimizer, scheduler, dp_mode, forward_step_func, train_ds, valid_ds, device,
                      swapper, hooks=[faults] if faults else [])
    if args.load:
        trainer.seek(load_checkpoint(trainer))
    joined_at = dp_mode.join()
    if joined_at is not None:  # took over a live replica's state: continue where it stands
        trainer.seek(joined_at)
        scheduler.step(increment=joined_at * args.global_batch_size - scheduler.num_steps)
    return trainer


def pretrain(datasets_provider: Callable, model_provider: Callable, forward_step_func: Callable,
             extra_args_provider: Callable = None, argv=None) -> Dict[str, float]:
    """Parse and check arguments, start the process groups, build everything, train, print a summary."""
    env = launch_env()
    args = parse_args(argv, world_size=env.world_size, local_world_size=env.local_world_size,
                      extra_args_provider=extra_args_provider)
    device = initialize_megatron(args)
    try:
        trainer = build_trainer(args, device, datasets_provider, model_provider, forward_step_func)
        tracker = Trackers(args)
        summary = train(trainer, tracker)
        summary["wandb_dir"] = tracker.finish()
        print_rank_last(summary_text(args, summary))
        return summary
    finally:
        destroy()
