"""Bad configurations stop before any work, with one line that says what is wrong."""
import base64
import json
import socket
import subprocess
import sys

import psutil
import pytest

from launcher import REPO
from megatron_edit import arguments, platform

BASE = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--mock-data", "--vocab-size", "511",
        "--device", "cpu"]


def error_of(extra_argv, world_size, base=BASE):
    with pytest.raises(SystemExit) as excinfo:
        arguments.parse_args(base + extra_argv, world_size=world_size)
    message = str(excinfo.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_heads_not_divisible_by_tensor_parallel_size():
    assert "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3" in \
        error_of(["--tensor-model-parallel-size", "3"], world_size=3)


def test_world_size_not_divisible_by_tp_times_pp():
    assert "world size 6 is not divisible by tensor x pipeline parallel size 2x2=4" in \
        error_of(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], world_size=6)


def test_global_batch_not_divisible_by_micro_batch_times_dp():
    assert "--global-batch-size 6 is not divisible by micro batch x data parallel (2x2=4)" in \
        error_of(["--global-batch-size", "6"], world_size=2)


@pytest.mark.parametrize("flag", arguments.POSITIVE_SIZES)
@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_size_below_one_is_one_line(flag, value):
    extra = [flag, value] + (["--group-query-attention"] if flag == "--num-query-groups" else [])
    assert error_of(extra, world_size=1) == f"error: {flag} must be a positive integer, got {value}"


def test_a_launch_of_no_processes_is_one_line():
    assert error_of([], world_size=0) == "error: the launch has 0 processes; start at least one"


def test_more_pipeline_stages_than_layers():
    assert "--pipeline-model-parallel-size 8 is larger than --num-layers 4" in \
        error_of(["--pipeline-model-parallel-size", "8"], world_size=8)


def test_bf16_on_a_device_without_bfloat16(monkeypatch):
    monkeypatch.setattr(platform, "bf16_supported", lambda device_type: False)
    assert "--bf16 was requested but this cpu cannot compute in bfloat16" in error_of(["--bf16"], world_size=1)


def test_megatron_lm_runtime_flags_reach_their_settings():
    """What the model, data, checkpoint and GC flags of Megatron-LM's scripts set; their runs are in test_summary."""
    from megatron_edit.arguments import DIST_CKPT_STRICTNESS
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from megatron_edit.model import transformer_config_from_args

    assert set(DIST_CKPT_STRICTNESS) <= {handling.value for handling in StrictHandling}
    args = arguments.parse_args(BASE + ["--deterministic-mode", "--no-mmap-bin-files", "--manual-gc",
                                        "--manual-gc-interval", "5", "--no-manual-gc-eval", "--no-masked-softmax-fusion",
                                        "--no-rope-fusion", "--dist-ckpt-strictness", "raise_all"], world_size=1)
    assert (args.mmap_bin_files, args.manual_gc, args.manual_gc_interval, args.manual_gc_eval,
            args.dist_ckpt_strictness) == (False, True, 5, False, "raise_all")
    assert transformer_config_from_args(args).deterministic_mode
    # The fused kernels exist with Transformer Engine only; each --no-*-fusion keeps its own off there.
    args.transformer_impl = "transformer_engine"
    config = transformer_config_from_args(args)
    assert (config.masked_softmax_fusion, config.apply_rope_fusion, config.bias_activation_fusion,
            config.bias_dropout_fusion) == (False, False, True, True)
    assert error_of(["--manual-gc-interval", "-1"], world_size=1) == "error: --manual-gc-interval must be >= 0, got -1"


def test_ckpt_step_without_load():
    assert error_of(["--ckpt-step", "6"], world_size=1) == \
        "error: --ckpt-step 6 picks a checkpoint under --load: give --load DIR"


def test_unknown_dp_mode():
    assert "--dp-mode 'nope' is unknown" in error_of(["--dp-mode", "nope"], world_size=1)


def test_penalty_and_pseudo_gradient_faults_need_a_mode_that_has_them():
    assert "the pseudo-gradient penalty is EDiT's; use --dp-mode edit or aedit" in \
        error_of(["--dp-mode", "diloco", "--edit-anomaly-elimination"], world_size=2)
    assert "--inject-fault scale does not apply to --dp-mode post-local-sgd" in \
        error_of(["--dp-mode", "post-local-sgd", "--inject-fault", "0:5:scale"], world_size=2)
    assert "fault injection names replica 4, but there are 4 (0..3)" in \
        error_of(["--global-batch-size", "8", "--simulate-straggler", "4:2"], world_size=4)


def test_sync_fragments_are_edits_and_fit_in_the_sync_interval():
    local = ["--model-shard-group-size", "1", "--local-sgd-sync-interval", "4"]
    for mode in ("aedit", "diloco", "post-local-sgd"):
        assert f"--sync-fragments: {mode} synchronizes the whole model at once" in \
            error_of(["--dp-mode", mode, "--sync-fragments", "2"] + local, world_size=2)
    assert "--sync-fragments 5 must be in [1, H=4]" in \
        error_of(["--dp-mode", "edit", "--sync-fragments", "5"] + local, world_size=2)
    assert arguments.parse_args(BASE + ["--dp-mode", "edit", "--sync-fragments", "4"] + local,
                                world_size=2).sync_fragments == 4


def test_use_checkpoint_args_needs_a_checkpoint(tmp_path):
    assert "--use-checkpoint-args reads the model's shape from a checkpoint: give --load DIR" in \
        error_of(["--use-checkpoint-args"], world_size=1)
    assert f"no complete checkpoint under --load {tmp_path}" in \
        error_of(["--use-checkpoint-args", "--load", str(tmp_path)], world_size=1)


def test_aedit_refuses_exit_interval_and_checks_its_own_flags():
    aedit = ["--dp-mode", "aedit", "--model-shard-group-size", "1"]
    assert "--exit-interval does not apply to --dp-mode aedit" in \
        error_of(aedit + ["--exit-interval", "5"], world_size=2)
    assert "--aedit-step-weight must be in [0, 1]" in error_of(aedit + ["--aedit-step-weight", "2"], world_size=2)
    parsed = arguments.parse_args(BASE + aedit + ["--save", "/tmp/x"], world_size=2)
    assert parsed.num_model_replicas == 2 and parsed.ckpt_format == "torch"  # a file per rank: replicas differ
    assert arguments.parse_args(BASE + ["--save", "/tmp/x"], world_size=2).ckpt_format == "torch_dist"


def test_learning_rate_warmup_longer_than_decay():
    assert "the LR warm-up (--lr-warmup-iters) must end before the decay does" in \
        error_of(["--lr-warmup-iters", "5"], world_size=1)


def test_iteration_and_sample_schedules_do_not_mix():
    at = BASE.index("--train-iters")
    samples = BASE[:at] + BASE[at + 2:] + ["--train-samples", "40"]
    assert "give the training length as one of --train-iters or --train-samples" in \
        error_of(["--train-samples", "40"], world_size=1)
    assert "--lr-decay-iters/--lr-warmup-iters go with --train-iters" in \
        error_of(["--lr-warmup-iters", "2"], world_size=1, base=samples)
    assert "--lr-decay-samples/--lr-warmup-samples go with --train-samples" in \
        error_of(["--lr-warmup-samples", "2"], world_size=1)
    assert "give one of --lr-warmup-fraction and --lr-warmup-samples" in \
        error_of(["--lr-warmup-samples", "2", "--lr-warmup-fraction", "0.1"], world_size=1, base=samples)
    assert "--train-samples 1 is less than one global batch (2)" in \
        error_of([], world_size=1, base=[arg if arg != "40" else "1" for arg in samples])


@pytest.mark.parametrize("split", ["abc", "1,2", "-1,5,0", "1,2,3,4", "1e3,1,0", ""])
def test_malformed_split(split):
    assert error_of([f"--split={split}"], world_size=1) == \
        f"error: --split {split}: expected three non-negative train,valid,test weights, e.g. 969,30,1"


def test_split_without_a_share_for_a_split_the_run_reads():
    assert error_of(["--split", "0,5,5"], world_size=1) == \
        "error: --split 0,5,5 gives the train split no share; training needs one, e.g. 969,30,1"
    assert error_of(["--split", "100,0,0"], world_size=1) == \
        "error: --split 100,0,0 gives the valid split no share, but evaluation reads it; give valid a share " \
        "(e.g. 969,30,1) or pass --eval-iters 0"
    arguments.parse_args(BASE + ["--split", "100,0,0", "--eval-iters", "0"], world_size=1)  # no evaluation, no valid


def test_valid_configuration_derives_sizes():
    args = arguments.parse_args(BASE + ["--tensor-model-parallel-size", "2", "--global-batch-size", "16"],
                                world_size=8)
    assert (args.data_parallel_size, args.num_microbatches, args.tokenizer_type) == (4, 2, "NullTokenizer")
    assert [arguments.padded_vocab_size(v, args) for v in (512, 513)] == [512, 768]


def test_unknown_or_mistyped_flag_is_one_line_not_the_usage():
    assert error_of(["--no-such-flag"], world_size=1) == \
        "error: unrecognized arguments: --no-such-flag (--help lists the flags)"
    assert error_of(["--eval-iters", "x"], world_size=1) == \
        "error: argument --eval-iters: invalid int value: 'x' (--help lists the flags)"


def test_no_data_source():
    without_data = [a for a in BASE if a != "--mock-data"]
    assert "no training data: pass --data-path PREFIX" in error_of([], world_size=1, base=without_data)


@pytest.mark.slow
def test_pretrain_gpt_prints_one_line_and_no_traceback():
    result = subprocess.run([sys.executable, "pretrain_gpt.py", *BASE, "--tensor-model-parallel-size", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: world size 1 is not divisible by tensor x pipeline parallel size 2x1=2; "
        "launch a multiple of 2 processes or change the parallel sizes"]


def test_recomputation_flags_are_megatron_lms():
    assert "--recompute-granularity full needs --recompute-method uniform or block" in \
        error_of(["--recompute-granularity", "full"], world_size=1)
    assert "--recompute-method applies to --recompute-granularity full" in \
        error_of(["--recompute-method", "block"], world_size=1)
    assert arguments.parse_args(BASE + ["--recompute-activations"], world_size=1).recompute_granularity == "selective"
    assert not arguments.parse_args(BASE + ["--sequence-parallel"], world_size=1).sequence_parallel  # TP=1


def test_overlapped_parameter_gather_needs_the_distributed_optimizer_and_ddp():
    assert "--overlap-param-gather overlaps the distributed optimizer's all-gather: it needs " \
           "--use-distributed-optimizer and --overlap-grad-reduce" in \
        error_of(["--overlap-param-gather", "--use-distributed-optimizer"], world_size=2)
    assert "--overlap-param-gather applies to --dp-mode ddp: edit's syncs write parameters" in \
        error_of(["--overlap-param-gather", "--use-distributed-optimizer", "--overlap-grad-reduce", "--dp-mode", "edit",
                  "--model-shard-group-size", "1"], world_size=2)


def test_replica_jobs_flags(monkeypatch, tmp_path):
    torchft = ["--replica-coordinator", "torchft"]
    diloco = ["--dp-mode", "diloco", "--local-sgd-warmup-iters", "0"]
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:29510")
    assert "--replica-coordinator torchft needs --num-replicas N" in error_of(torchft, world_size=1)
    assert "--dp-mode ddp reduces gradients every step, which separate jobs do not do; use --dp-mode edit" in \
        error_of(torchft + ["--num-replicas", "2"], world_size=1)
    assert "--replica-coordinator torchft needs --replica-id in [0, 2)" in \
        error_of(torchft + diloco + ["--num-replicas", "2", "--replica-id", "2"], world_size=1)
    assert "warm-up averages gradients over the replicas at every step" in \
        error_of(torchft + ["--dp-mode", "diloco", "--num-replicas", "2", "--replica-id", "0",
                            "--local-sgd-warmup-iters", "3"], world_size=1)
    assert "a sync commits (or is undone) within its iteration, so it cannot be delayed or split" in \
        error_of(torchft + ["--dp-mode", "edit", "--local-sgd-warmup-iters", "0", "--num-replicas", "2",
                            "--replica-id", "0", "--sync-delay-steps", "1"], world_size=1)
    parsed = arguments.parse_args(BASE + torchft + diloco + ["--num-replicas", "3", "--replica-id", "1"], world_size=2)
    assert parsed.model_shard_group_size == 2 and parsed.global_batch_size == 2 * 2 * 3  # spans all replicas
    secret = tmp_path / "secret"
    secret.write_bytes(b"s" * 32)
    secret.chmod(0o644)
    assert f"--sync-secret-file {secret}: readable by others than its owner (mode -rw-r--r--); chmod 600" in \
        error_of(torchft + diloco + ["--num-replicas", "2", "--replica-id", "0", "--sync-secret-file", str(secret)],
                 world_size=1)
    beyond_loopback = next((name for name, addresses in psutil.net_if_addrs().items() if name != "lo" and any(
        a.family == socket.AF_INET for a in addresses)), None)
    if beyond_loopback:
        assert f"--replica-coordinator torchft listening on {beyond_loopback} (" in error_of(
            torchft + diloco + ["--num-replicas", "2", "--replica-id", "0", "--sync-interface", beyond_loopback],
            world_size=1)
        monkeypatch.setenv("MEGATRON_EDIT_SYNC_SECRET_FILE", str(secret))
        secret.chmod(0o600)
        arguments.parse_args(BASE + torchft + diloco + ["--num-replicas", "2", "--replica-id", "0",
                                                        "--sync-interface", beyond_loopback], world_size=1)
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE")
    assert "set TORCHFT_LIGHTHOUSE=http://HOST:PORT to a running lighthouse" in \
        error_of(torchft + diloco + ["--num-replicas", "2", "--replica-id", "0"], world_size=1)


def test_layer_swapping_refuses_what_it_cannot_hold_in_one_line():
    swap = ["--swap-layers"]
    assert "--swap-resident-layers 0: the computing layer must be on the device" in \
        error_of(swap + ["--swap-resident-layers", "0"], world_size=1)
    assert "--swap-layers keeps a whole replica on one device: use --tensor-model-parallel-size 1" in \
        error_of(swap + ["--tensor-model-parallel-size", "2"], world_size=2)
    assert "so a replica is one rank: run --dp-mode ddp on one rank" in error_of(swap, world_size=2)
    assert "so a replica is one rank" in \
        error_of(swap + ["--dp-mode", "edit", "--model-shard-group-size", "2"], world_size=4)
    arguments.parse_args(BASE + swap + ["--dp-mode", "edit", "--model-shard-group-size", "1"], world_size=2)  # warm-up
    assert "drop --use-distributed-optimizer" in error_of(swap + ["--use-distributed-optimizer"], world_size=1)
    parsed = arguments.parse_args(BASE + swap + ["--dp-mode", "aedit", "--model-shard-group-size", "1",
                                                 "--local-sgd-warmup-iters", "0", "--bf16"], world_size=2)
    assert parsed.swap_layers and parsed.swap_resident_layers == 2


def test_codecs_default_to_the_modes_syncs_and_int2_warmup_with_error_feedback(monkeypatch):
    local = ["--model-shard-group-size", "1"]
    for mode, sync in (("edit", "int2"), ("aedit", "int4"), ("diloco", "int4")):
        parsed = arguments.parse_args(BASE + ["--dp-mode", mode] + local, world_size=2)
        assert (parsed.sync_dtype, parsed.sync_error_feedback, parsed.local_sgd_warmup_grad_dtype) == \
            (sync, True, "int2"), mode
    averaged = arguments.parse_args(BASE + ["--dp-mode", "post-local-sgd"] + local, world_size=2)
    assert (averaged.sync_dtype, averaged.sync_error_feedback, averaged.local_sgd_warmup_grad_dtype) == \
        ("fp32", False, "int2")  # it averages parameters; its warm-up averages gradients as the others' do
    plain = arguments.parse_args(BASE + ["--dp-mode", "edit", "--sync-dtype", "int8", "--no-sync-error-feedback"]
                                 + local, world_size=2)
    assert (plain.sync_dtype, plain.sync_error_feedback) == ("int8", False)
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:29510")
    jobs = arguments.parse_args(BASE + ["--dp-mode", "edit", "--replica-coordinator", "torchft", "--num-replicas", "2",
                                        "--replica-id", "0", "--local-sgd-warmup-iters", "0"], world_size=1)
    assert (jobs.sync_dtype, jobs.sync_error_feedback, jobs.local_sgd_warmup_grad_dtype) == ("fp32", False, "fp32")


def test_each_mode_defaults_to_its_recipe_and_flags_override_it(monkeypatch):
    """EDiT: every other step, plain averaging, local steps at M x the LR (M replicas, at most 4); DiLoCo, A-EDiT
    (syncs a clock spaces) and replica jobs (a quorum per sync): H=16 and the outer Nesterov step; Post-Local-SGD:
    H=16, parameters averaged; a flag given wins."""
    def recipe(mode, world_size, *flags):
        parsed = arguments.parse_args(BASE + ["--dp-mode", mode, "--model-shard-group-size", "1", *flags],
                                      world_size=world_size)
        return (parsed.local_sgd_sync_interval, parsed.outer_lr, parsed.outer_momentum, parsed.outer_nesterov,
                parsed.local_sgd_lr_scale)

    assert recipe("edit", 2) == (2, 1.0, 0.0, False, 2.0)
    assert recipe("aedit", 4) == (16, 0.7, 0.8, True, 1.0)
    assert recipe("edit", 4)[4] == 4.0 and recipe("edit", 8)[4] == 4.0  # at most 4
    assert recipe("edit", 1)[4] == 1.0  # one replica: plain data parallelism, nothing to lengthen
    assert recipe("diloco", 4) == (16, 0.7, 0.8, True, 1.0)
    assert recipe("post-local-sgd", 4) == (16, 0.7, 0.8, True, 1.0)
    assert recipe("edit", 4, "--local-sgd-sync-interval", "8", "--outer-lr", "0.7", "--outer-momentum", "0.8",
                  "--outer-nesterov", "--local-sgd-lr-scale", "1.5") == (8, 0.7, 0.8, True, 1.5)
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://127.0.0.1:29510")
    jobs = arguments.parse_args(BASE + ["--dp-mode", "edit", "--replica-coordinator", "torchft", "--num-replicas", "4",
                                        "--replica-id", "0", "--local-sgd-warmup-iters", "0"], world_size=1)
    assert (jobs.local_sgd_sync_interval, jobs.outer_nesterov, jobs.local_sgd_lr_scale, jobs.sync_dtype) == \
        (16, True, 1.0, "fp32")
    ddp = arguments.parse_args(BASE, world_size=2)
    assert ddp.local_sgd_sync_interval is None and ddp.local_sgd_lr_scale is None  # no local steps, no recipe


def test_sync_interval_ramp_and_codec_refusals():
    local = ["--model-shard-group-size", "1", "--local-sgd-sync-interval", "8"]
    assert "--local-sgd-initial-sync-interval 9 must be in [1, H=8]" in \
        error_of(["--dp-mode", "edit", "--local-sgd-initial-sync-interval", "9"] + local, world_size=2)
    assert "--local-sgd-initial-sync-interval: aedit syncs on a clock" in \
        error_of(["--dp-mode", "aedit", "--local-sgd-initial-sync-interval", "2"] + local, world_size=2)
    assert "staggered --sync-fragments start at a fixed H" in \
        error_of(["--dp-mode", "edit", "--local-sgd-initial-sync-interval", "2", "--sync-fragments", "2"] + local,
                 world_size=2)
    assert "--sync-delay-steps 2 must be in [0, 2) (the shortest sync interval" in \
        error_of(["--dp-mode", "edit", "--local-sgd-initial-sync-interval", "2", "--sync-delay-steps", "2"] + local,
                 world_size=2)
    assert "--sync-dtype topk sends a few % of each pseudo-gradient: add --sync-error-feedback" in \
        error_of(["--dp-mode", "edit", "--sync-dtype", "topk", "--no-sync-error-feedback"] + local, world_size=2)
    assert "--sync-dtype int4: post-local-sgd averages parameters" in \
        error_of(["--dp-mode", "post-local-sgd", "--sync-dtype", "int4"] + local, world_size=2)
    ramp = arguments.parse_args(BASE + ["--dp-mode", "diloco", "--local-sgd-initial-sync-interval", "2"] + local,
                                world_size=2)
    assert ramp.local_sgd_initial_sync_interval == 2


@pytest.mark.parametrize("case", ["empty-model", "text-as-model", "directory", "broken-tokenizer-json",
                                  "vocab-directory"])
def test_a_tokenizer_file_that_is_not_one_is_refused_in_one_line(tmp_path, case):
    (tmp_path / "empty.model").write_bytes(b"")
    (tmp_path / "notes.model").write_text("hello\n")
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("")
    flags, named = {
        "empty-model": (["SentencePieceTokenizer", "--tokenizer-model", f"{tmp_path}/empty.model"], "empty.model"),
        "text-as-model": (["SentencePieceTokenizer", "--tokenizer-model", f"{tmp_path}/notes.model"], "notes.model"),
        "directory": (["SentencePieceTokenizer", "--tokenizer-model", str(tmp_path)], str(tmp_path)),
        "broken-tokenizer-json": (["HuggingFaceTokenizer", "--tokenizer-model", f"{tmp_path}/tokenizer.json"],
                                  "tokenizer.json"),
        "vocab-directory": (["GPT2BPETokenizer", "--vocab-file", str(tmp_path), "--merge-file",
                             f"{tmp_path}/merges.txt"], "merges.txt"),
    }[case]
    message = error_of(["--tokenizer-type", *flags], world_size=1)
    assert f"--tokenizer-type {flags[0]} cannot read " in message and named in message


def write_tiktoken_ranks(path, merged_tokens):
    """A TikTokenizer vocabulary as Megatron-LM reads it: the 256 bytes, then `merged_tokens`, one rank each."""
    tokens = [bytes([b]) for b in range(256)] + merged_tokens
    path.write_text(json.dumps([{"rank": i, "token_bytes": base64.b64encode(t).decode(), "token_str": t.decode(errors="replace")}
                                for i, t in enumerate(tokens)]))


def test_tiktokenizer_reads_megatron_lms_rank_file_under_its_special_tokens(tmp_path):
    from megatron_edit.data.tokenizers import build_tokenizer

    write_tiktoken_ranks(tmp_path / "ranks.json", [b"th", b"he", b"the"])
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", str(tmp_path / "ranks.json"),
             "--tiktoken-num-special-tokens", "10", "--vocab-size", "269"]
    tokenizer = build_tokenizer(arguments.parse_args(BASE + flags + ["--tiktoken-pattern", "v2"], world_size=1))
    assert tokenizer.vocab_size == 269 and tokenizer.eod == 2  # <unk> <s> </s>, then 7 <SPECIAL_i>
    assert tokenizer.tokenize("the the") == [10 + 258, 10 + ord(" "), 10 + 258]  # merged, above the special ids
    assert tokenizer.tokenize("</s>") == [10 + b for b in b"</s>"]  # a special token's spelling is ordinary text
    assert tokenizer.detokenize(tokenizer.tokenize("ünïcode, the end</s>")) == "ünïcode, the end</s>"
    assert "needs --tiktoken-pattern (v1 or v2)" in error_of(flags, world_size=1)
    too_few = error_of(flags[:-1] + ["1000", "--tiktoken-pattern", "v1"], world_size=1)
    assert "cannot read" in too_few and "holds 259 ranks, fewer than the 990" in too_few
    write_tiktoken_ranks(tmp_path / "ranks.json", [b"th", b"he", b"th"])
    assert "entry 258 (b'th') is not a new token" in error_of(flags + ["--tiktoken-pattern", "v1"], world_size=1)
    assert "--tiktoken-special-tokens <s> </s>: give each once, <unk>, <s> and </s> among them" in error_of(
        flags + ["--tiktoken-pattern", "v1", "--tiktoken-special-tokens", "<s>", "</s>"], world_size=1)


def test_megatron_lm_flags_that_change_nothing_warn_once_and_the_rest_are_refused_in_one_line(capsys, monkeypatch):
    """A Megatron-LM script's flags: accepted with one warning each when nothing changes here (rank 0 only), else
    refused with the reason; every flag of the table is one or the other."""
    from megatron_edit.megatron_lm_flags import FLAGS

    script = ["--use-mcore-models", "--log-throughput", "--no-gradient-accumulation-fusion", "--num-workers", "2",
              "--position-embedding-type", "rope", "--no-position-embedding", "--kv-channels", "16",
              "--context-parallel-size", "1", "--distributed-backend", "gloo", "--async-save",
              "--log-validation-ppl-to-tensorboard", "--timing-log-level", "2", "--attention-softmax-in-fp32"]
    arguments.parse_args(BASE + script, world_size=1)
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 12 and "warning: --kv-channels changes nothing here: it equals --hidden-size / " \
        "--num-attention-heads, the size used here" in warned
    monkeypatch.setenv("RANK", "1")
    arguments.parse_args(BASE + script, world_size=1)
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("RANK")
    arguments.main(["--world-size", "1", "--", *BASE, *script])  # the launch script's preflight: rank 0 will warn
    assert "warning" not in capsys.readouterr().err
    assert error_of(["--kv-channels", "32"], world_size=1) == "error: --kv-channels: --kv-channels other than --hidden-size / " \
        "--num-attention-heads is not supported here: drop the flag"
    assert "context parallelism is not implemented here" in error_of(["--context-parallel-size", "2"], world_size=1)
    assert "use --position-embedding-type rope" in error_of(["--no-position-embedding"], world_size=1)
    assert "nccl on GPUs, gloo on CPU" in error_of(["--distributed-backend", "nccl"], world_size=1)
    refused = {"--num-experts": ["4"], "--moe-router-topk": ["2"], "--fp8-format": ["hybrid"],
               "--rampup-batch-size": ["4", "4", "100"], "--decoupled-lr": ["1e-4"], "--grad-reduce-in-bf16": [],
               "--calculate-per-token-loss": [], "--apply-layernorm-1p": [],
               "--profile": [], "--expert-model-parallel-size": ["2"], "--rotary-percent": ["0.5"]}
    for flag, values in refused.items():
        assert error_of([flag, *values], world_size=1).startswith(f"error: {flag}: "), flag
    assert {flag.name for flag in FLAGS if not flag.noop} <= set(refused) | {
        "--moe-grouped-gemm", "--moe-aux-loss-coeff", "--moe-router-load-balancing-type", "--moe-token-dispatcher-type",
        "--fp8-amax-history-len", "--fp8-amax-compute-algo", "--decoupled-min-lr",
        "--profile-step-start", "--profile-step-end", "--profile-ranks", "--use-pytorch-profiler"}
