"""Flags of Megatron-LM's launch scripts that this trainer has nothing to do for, or does not do yet.

A Megatron-LM script brought here with `--dp-mode edit` added should not fail on a flag it has never had to think
about, and no flag may be accepted and then quietly ignored. So each flag below is either accepted with one warning
line that says why nothing changes (the value is what this trainer does anyway, or Megatron-LM itself treats the flag
as a no-op), or refused in one line that says why and what to do instead. Flags this trainer implements live in
arguments.py with the others.
"""
import argparse
import dataclasses
import os
import sys
from typing import Callable, List, Optional

from megatron_edit.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    options: dict  # add_argument's keywords; the default is always None (not given)
    # (args, value) -> None when the value changes nothing here (accepted with `noop`), else the refusal's reason
    refusal: Callable[[argparse.Namespace, object], Optional[str]]
    noop: str = ""


SWITCH = {"action": "store_const", "const": True}


def always(reason: str) -> Callable:
    return lambda args, value: reason


def never(args, value) -> None:
    return None


def unless(holds: Callable[[argparse.Namespace, object], bool], reason: str) -> Callable:
    return lambda args, value: None if holds(args, value) else reason


MOE = "mixture-of-experts layers are not supported here yet (EDiT's sync group does not place expert-parallel " \
      "parameters): train a dense model"
FP8 = "FP8 training is not wired here (it needs Transformer Engine on a GPU): train with --bf16"
PROFILE = "no profiler is built in: run pretrain_gpt.py under nsys or torch.profiler"

FLAGS = [
    # Megatron-LM treats these as no-ops, or what they ask for is what happens here anyway.
    Flag("--use-mcore-models", SWITCH, never, "megatron-core's GPTModel is the only model here (Megatron-LM "
         "deprecated the flag)"),
    Flag("--log-throughput", SWITCH, never, "every log line has tokens/s and TFLOP/s"),
    Flag("--log-validation-ppl-to-tensorboard", SWITCH, never,
         "the validation perplexity goes to TensorBoard (--tensorboard-dir) and wandb always"),
    Flag("--log-timers-to-tensorboard", SWITCH, never,
         "no timers are kept beyond the log line's time per iteration and throughput"),
    Flag("--log-memory-to-tensorboard", SWITCH, never, "memory is reported once, as the training summary's peak"),
    Flag("--timing-log-level", {"type": int}, never, "only the log line's timings are kept"),
    Flag("--no-gradient-accumulation-fusion", SWITCH, never,
         "gradients accumulate unfused here (the fused kernel needs APEX or Transformer Engine GEMMs)"),
    Flag("--num-workers", {"type": int}, never, "samples are read in the training process, with no DataLoader "
         "workers"),
    Flag("--no-create-attention-mask-in-dataloader", SWITCH, never,
         "no attention mask is built with the data (the attention kernel is causal)"),
    Flag("--cross-entropy-loss-fusion", SWITCH, never, "the loss is computed unfused here"),
    Flag("--attention-softmax-in-fp32", SWITCH, never,
         "the attention softmax runs in fp32 here always (megatron-core's default)"),
    Flag("--async-save", SWITCH, never, "checkpoints are written synchronously (the same files, later)"),
    Flag("--use-persistent-ckpt-worker", SWITCH, never, "checkpoints are written synchronously"),
    # Accepted at the value this trainer has, refused at any other.
    Flag("--context-parallel-size", {"type": int}, unless(
        lambda args, value: value == 1, "context parallelism is not implemented here: use --context-parallel-size 1 "
        "(tensor and pipeline parallelism split long sequences' memory instead)"), "1 is what runs here"),
    Flag("--expert-model-parallel-size", {"type": int}, unless(lambda args, value: value == 1, MOE),
         "1: there are no experts"),
    Flag("--kv-channels", {"type": int}, unless(
        lambda args, value: value * args.num_attention_heads == args.hidden_size,
        "--kv-channels other than --hidden-size / --num-attention-heads is not supported here: drop the flag"),
         "it equals --hidden-size / --num-attention-heads, the size used here"),
    Flag("--rotary-percent", {"type": float}, unless(
        lambda args, value: value == 1.0, "partial rotary embeddings are not supported here: use --rotary-percent 1"),
         "1.0: rotary embeddings cover whole heads here"),
    Flag("--no-position-embedding", SWITCH, unless(
        lambda args, value: args.position_embedding_type == "rope",
        "a model without any position embedding is not supported here: use --position-embedding-type rope (which "
        "has no learned position embedding)"), "with rope there is no learned position embedding"),
    Flag("--distributed-backend", {"choices": ["nccl", "gloo"]}, unless(
        lambda args, value: value == ("nccl" if args.device_type == "cuda" else "gloo"),
        "this run's process groups use the backend of its device: nccl on GPUs, gloo on CPU; drop the flag"),
         "it is the backend of this run's device"),
    # Not implemented: refused, so that a script does not train something other than it asks for.
    Flag("--num-experts", {"type": int}, always(MOE)),
    Flag("--moe-router-topk", {"type": int}, always(MOE)),
    Flag("--moe-grouped-gemm", SWITCH, always(MOE)),
    Flag("--moe-aux-loss-coeff", {"type": float}, always(MOE)),
    Flag("--moe-router-load-balancing-type", {"type": str}, always(MOE)),
    Flag("--moe-token-dispatcher-type", {"type": str}, always(MOE)),
    Flag("--fp8-format", {"type": str}, always(FP8)),
    Flag("--fp8-amax-history-len", {"type": int}, always(FP8)),
    Flag("--fp8-amax-compute-algo", {"type": str}, always(FP8)),
    Flag("--rampup-batch-size", {"nargs": 3}, always(
        "a batch-size ramp-up is not implemented here: give the final --global-batch-size")),
    Flag("--decoupled-lr", {"type": float}, always(
        "a separate LR for the embedding and output layer is not implemented here: drop the flag")),
    Flag("--decoupled-min-lr", {"type": float}, always(
        "a separate LR for the embedding and output layer is not implemented here: drop the flag")),
    Flag("--grad-reduce-in-bf16", SWITCH, always("gradients are reduced in fp32 here: drop the flag")),
    Flag("--calculate-per-token-loss", SWITCH, always(
        "the loss is averaged per micro-batch, as Megatron-LM's default: drop the flag")),
    Flag("--apply-layernorm-1p", SWITCH, always(
        "zero-centered layer-norm weights are not supported here: drop the flag")),
    Flag("--profile", SWITCH, always(PROFILE)),
    Flag("--profile-step-start", {"type": int}, always(PROFILE)),
    Flag("--profile-step-end", {"type": int}, always(PROFILE)),
    Flag("--profile-ranks", {"type": int, "nargs": "+"}, always(PROFILE)),
    Flag("--use-pytorch-profiler", SWITCH, always(PROFILE)),
]


def add_megatron_lm_flags(parser: argparse.ArgumentParser, flags: List[Flag] = FLAGS) -> None:
    """`flags` (pretrain_gpt.py's by default; a tool passes its own table) in a group of their own."""
    group = parser.add_argument_group("Megatron-LM flags with nothing to do here (a warning), or not supported here "
                                      "(refused with the reason): see megatron_edit/megatron_lm_flags.py")
    for flag in flags:
        group.add_argument(flag.name, default=None, help=flag.noop or "not supported here", **flag.options)


def check_megatron_lm_flags(args: argparse.Namespace, warn: bool = True, flags: List[Flag] = FLAGS) -> None:
    """Refuses the first flag given that this trainer cannot honour; with `warn`, warns once (on rank 0) for each
    accepted one."""
    for flag in flags:
        value = getattr(args, flag.name.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        reason = flag.refusal(args, value)
        if reason is not None:
            raise UsageError(f"{flag.name}: {reason}")
        if warn and os.environ.get("RANK", "0") == "0":
            print(f"warning: {flag.name} changes nothing here: {flag.noop}", file=sys.stderr, flush=True)
