"""Checkpoints: exact resume, elastic resume, a killed rank under torchrun, and bad checkpoints."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from launcher import REPO, TINY_GPT, run_training, training_command
from test_edit import edit, local_sgd, run
from test_safe_load import RunsCode

STEPS = ["--micro-batch-size", "2", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "1000",
         "--eval-iters", "1"]
PENALTY = ["--edit-anomaly-elimination", "--edit-anomaly-warmup-syncs", "1", "--edit-weighted-average",
           "--edit-pseudo-grad-clip", "0.5"]
EDIT_WITH_PENALTY = ["--dp-mode", "edit", "--model-shard-group-size", "2", *local_sgd(2, 2), *PENALTY]


# Two staggered fragments over H=4 (syncs issued at 5 and 9, and at 7 and 11), each outer step applied two iterations
# later: the save after 6 holds fragment 1's exchange in flight, and int8's error-feedback residuals.
EDIT_FRAGMENTS_DELAYED_INT8 = ["--dp-mode", "edit", "--model-shard-group-size", "2", *local_sgd(2, 4),
                               "--sync-fragments", "2", "--sync-delay-steps", "2", "--sync-dtype", "int8",
                               "--sync-error-feedback"]


TORCH_DIST = ["--ckpt-format", "torch_dist"]  # the default, named where a test is about it
TORCH = ["--ckpt-format", "torch"]
DISTRIBUTED_OPTIMIZER = ["--use-distributed-optimizer"]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,mode", [(2, TORCH), (4, EDIT_WITH_PENALTY + TORCH),
                                        (4, EDIT_FRAGMENTS_DELAYED_INT8 + TORCH), (2, TORCH_DIST),
                                        (4, EDIT_FRAGMENTS_DELAYED_INT8 + TORCH_DIST),
                                        (2, DISTRIBUTED_OPTIMIZER + ["--bf16"] + TORCH_DIST),
                                        (4, EDIT_WITH_PENALTY + DISTRIBUTED_OPTIMIZER + TORCH_DIST)],
                         ids=["ddp_torch", "edit_with_penalty_torch", "edit_fragments_delayed_int8_torch",
                              "ddp_torch_dist", "edit_fragments_delayed_int8_torch_dist",
                              "ddp_distributed_optimizer_bf16_torch_dist", "edit_with_penalty_distributed_optimizer_torch_dist"])
def test_resumed_run_reproduces_the_uninterrupted_one_bitwise(tmp_path, nproc, mode):
    """12 iterations straight vs 6, save, load, 6 more (EDiT: syncs at 5 | 7, 9, 11, penalty on; fragments: issued at
    5 | applied at 7, then 7, 9 and 11 applied at 9, 11 and in the final sync)."""
    args = TINY_GPT + STEPS + mode + ["--train-iters", "12"]
    straight = run_training(nproc, args).check().losses
    first = run_training(nproc, args + ["--save", str(tmp_path), "--exit-interval", "6"]).check()
    assert "exiting after iteration 6" in first.stdout and len(first.losses) == 6
    second = run_training(nproc, args + ["--load", str(tmp_path)]).check()
    assert "loaded checkpoint from" in second.stdout and "at iteration 6" in second.stdout
    assert first.losses + second.losses == straight


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_use_checkpoint_args_takes_the_models_shape_from_the_checkpoint(tmp_path, ckpt_format):
    """Saved with a shape of its own, resumed with TINY_GPT's flags and --use-checkpoint-args: the checkpoint's shape
    wins, and the resumed iterations are those of a straight run with that shape."""
    shape = ["--num-layers", "2", "--hidden-size", "96", "--num-attention-heads", "6", "--swiglu",
             "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2",
             "--ckpt-format", ckpt_format]
    straight = run_training(2, TINY_GPT + STEPS + shape + ["--train-iters", "8"]).check().losses
    run_training(2, TINY_GPT + STEPS + shape + ["--train-iters", "8", "--save", str(tmp_path), "--exit-interval", "6"]
                 ).check()
    resumed = run_training(2, TINY_GPT + STEPS + ["--train-iters", "8", "--load", str(tmp_path),
                                                  "--use-checkpoint-args", "--ckpt-format", ckpt_format]).check()
    assert "at iteration 6" in resumed.stdout
    assert resumed.losses == straight[6:]


DISTRIBUTED_OPTIMIZER = ["--use-distributed-optimizer", "--ckpt-format", "torch_dist"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--pipeline-model-parallel-size", "2"], []], ids=["tp1_pp2_dp2", "tp1_pp1_dp4"])
def test_torch_dist_checkpoint_reshards_to_another_layout(tmp_path, layout):
    """DDP with the distributed optimizer saved at TP=2 x DP=2 continues at another layout: weights, Adam's moments
    and fp32 main parameters follow, so the first resumed loss is the uninterrupted run's next one (the run that
    saved at 6 went on to 8; --ckpt-step 6 loads the checkpoint of 6)."""
    args = TINY_GPT + STEPS + DISTRIBUTED_OPTIMIZER + ["--train-iters", "8"]
    saved_layout = ["--tensor-model-parallel-size", "2"]
    straight = run_training(4, args + saved_layout + ["--save", str(tmp_path), "--save-interval", "6"]).check().losses
    resumed = run_training(4, args + layout + ["--load", str(tmp_path), "--ckpt-step", "6"]).check()
    assert "at iteration 6" in resumed.stdout and len(resumed.losses) == 2
    assert "WARNING" not in resumed.stderr  # the tracker names 8, a complete checkpoint: nothing to warn about
    assert resumed.losses[0] == pytest.approx(straight[6], rel=1e-6)
    assert resumed.losses[1] == pytest.approx(straight[7], rel=1e-3)  # a step later: reduction order differs


@pytest.mark.slow
@pytest.mark.parametrize("layout,extra,rel", [
    (["--pipeline-model-parallel-size", "2", "--model-shard-group-size", "1"], [], 1e-5),
    (["--model-shard-group-size", "2"], [], 1e-5),
    (["--model-shard-group-size", "1"], [], 1e-5),
    (["--model-shard-group-size", "2"], ["--use-distributed-optimizer", "--bf16"], 2e-3),  # bf16 matmuls: TP=2 vs 1
], ids=["tp1_pp2_dp2_m2", "tp1_pp1_dp4_s2_m2", "tp1_pp1_dp4_m4", "tp1_pp1_dp4_s2_m2_distributed_optimizer_bf16"])
def test_edit_torch_dist_checkpoint_reshards_with_its_outer_state(tmp_path, layout, extra, rel):
    """EDiT with the penalty, saved at TP=2 x DP=2 (two replicas of one rank: a shard group of 2 would take 8 ranks)
    after iteration 6, between the syncs of 5 and 7, continues at another layout, shard group or replica count. The
    first resumed iteration syncs before its forward: its loss is the uninterrupted run's only if every replica's
    parameters, the anchors and the outer momentum (non-zero since 5) all came back. With the same data per replica
    (PP=2) the losses after it follow too."""
    args = TINY_GPT + STEPS + ["--dp-mode", "edit", *local_sgd(2, 2), *PENALTY] + TORCH_DIST + extra + \
        ["--train-iters", "10"]
    saved_layout = ["--tensor-model-parallel-size", "2", "--model-shard-group-size", "1"]
    straight = run_training(4, args + saved_layout + ["--save", str(tmp_path), "--save-interval", "6"]).check().losses
    resumed = run_training(4, args + layout + ["--load", str(tmp_path), "--ckpt-step", "6"]).check()
    assert "at iteration 6" in resumed.stdout and len(resumed.losses) == 4
    assert "edit sync at iteration 7" in resumed.stdout
    assert resumed.losses[0] == pytest.approx(straight[6], rel=rel)
    if "--pipeline-model-parallel-size" in layout:
        assert resumed.losses == pytest.approx(straight[6:], rel=1e-4)


ELASTIC = ("--micro-batch-size", "1", "--global-batch-size", "6", *local_sgd(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 3])
def test_edit_checkpoint_resumes_with_a_different_number_of_replicas(tmp_path, replicas):
    saved = run(*edit(1, 2, *ELASTIC, "--train-iters", "6", "--save", str(tmp_path)))
    resumed = run(*edit(1, replicas, *ELASTIC, "--train-iters", "6", "--load", str(tmp_path)))
    for dump in resumed:  # every replica continues from the same anchor (and replica m from replica m mod 2)
        for unit, saved_unit in zip(dump["units"], saved[0]["units"]):
            assert torch.equal(unit["anchor"], saved_unit["anchor"]), unit["name"]
        for name, value in dump["params"].items():
            assert torch.equal(value, saved[dump["rank"] % 2]["params"][name]), name
    continued = run(*edit(1, replicas, *ELASTIC, "--train-iters", "10", "--load", str(tmp_path),
                          "--override-opt_param-scheduler"))
    # syncs at iterations 7 and 9, and the final one after 10
    assert len(continued[-1]["losses"]) == 4 and len(continued[-1]["syncs"]) == (3 if replicas > 1 else 0)


def torchrun_workers_once_saved(args: list, save_dir, *launch_flags: str):
    """pretrain_gpt.py under torchrun on 2 CPU ranks, once its first checkpoint is in `save_dir`: (job, worker pids)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *launch_flags,
               str(REPO / "pretrain_gpt.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tracker = save_dir / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 240
    while not tracker.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert tracker.exists() and job.poll() is None, "no checkpoint was written while the job ran"
    return job, [int(pid) for pid in open(f"/proc/{job.pid}/task/{job.pid}/children").read().split()]


@pytest.mark.slow
def test_killed_rank_restarts_from_the_last_checkpoint_and_finishes(tmp_path):
    args = [*TINY_GPT, "--micro-batch-size", "2", "--train-iters", "300", "--log-interval", "50", "--eval-interval",
            "1000", "--eval-iters", "1", "--save", str(tmp_path), "--load", str(tmp_path), "--save-interval", "50"]
    job, workers = torchrun_workers_once_saved(args, tmp_path, "--max-restarts=1")
    os.kill(workers[-1], signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert "loaded checkpoint from" in stdout
    assert " iteration      300/     300 |" in stdout
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "300"


@pytest.mark.slow
def test_sigterm_saves_the_iteration_under_way_and_exits_zero(tmp_path):
    """Slurm's preemption or scancel: SIGTERM reaches the ranks (here from torchrun's side); with
    --exit-signal-handler they finish the iteration, save it and exit 0, and a restart continues from it."""
    args = [*TINY_GPT, "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3000",
            "--log-interval", "1", "--eval-interval", "100000", "--eval-iters", "1", "--dp-mode", "edit",
            "--model-shard-group-size", "1", *local_sgd(2, 3), "--save", str(tmp_path), "--load", str(tmp_path),
            "--save-interval", "4", "--exit-signal-handler"]
    job, workers = torchrun_workers_once_saved(args, tmp_path)
    for worker in workers:
        os.kill(worker, signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    exited = [line for line in stdout.splitlines() if "(SIGTERM)" in line]
    assert exited and exited[0].startswith(" exiting after iteration "), stdout[-2000:]
    stopped = int(exited[0].split()[3])
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == str(stopped) and stopped < 3000
    resumed = run_training(2, args[:args.index("--train-iters") + 1] + [str(stopped + 2)] +
                           args[args.index("--train-iters") + 2:] + ["--override-opt_param-scheduler"]).check()
    assert f"at iteration {stopped}" in resumed.stdout and len(resumed.losses) == 2


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format,file,damage", [("torch", "mp_rank_00_000_dp_000/model_optim_rng.pt", "truncated"),
                                                     ("torch_dist", "__0_0.distcp", "overwritten")])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, ckpt_format, file, damage):
    """Truncated (its size is not the one written), or bytes overwritten in place (its SHA-256 is not)."""
    args = TINY_GPT + STEPS + ["--train-iters", "6", "--ckpt-format", ckpt_format]
    run_training(1, args + ["--save", str(tmp_path), "--save-interval", "3"]).check()
    newest = tmp_path / "iter_0000006" / file
    with open(newest, "r+b") as f:
        if damage == "truncated":
            f.truncate(newest.stat().st_size // 2)
        else:
            middle = newest.stat().st_size // 2
            f.seek(middle)
            flipped = bytes(255 - b for b in f.read(64))
            f.seek(middle)
            f.write(flipped)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("garbage\n")
    resumed = run_training(1, args + ["--load", str(tmp_path)]).check()
    assert f"skipping {tmp_path / 'iter_0000006'}: {newest} " + ("has" if damage == "truncated" else
                                                     "changed since it was written") in resumed.stderr
    assert "latest_checkpointed_iteration.txt holds no iteration number ('garbage')" in resumed.stderr
    assert "at iteration 3" in resumed.stdout and len(resumed.losses) == 3


@pytest.mark.slow
def test_what_a_kill_during_a_save_leaves_resumes_from_the_previous_checkpoint(tmp_path):
    """A job killed while saving iteration 6 leaves iter_0000006.tmp/ with part of its files and the tracker at 3:
    the resumed job loads 3, and its own save of 6 replaces the partial folder."""
    args = TINY_GPT + STEPS + ["--train-iters", "6", "--save", str(tmp_path), "--load", str(tmp_path)]
    uninterrupted = run_training(1, args + ["--save-interval", "3"]).check()
    (tmp_path / "iter_0000006").rename(tmp_path / "iter_0000006.tmp")
    (tmp_path / "iter_0000006.tmp" / "megatron_edit.json").unlink()  # the record is written last
    partial = next((tmp_path / "iter_0000006.tmp").glob("*.distcp"))
    with open(partial, "r+b") as f:
        f.truncate(partial.stat().st_size // 3)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = run_training(1, args + ["--save-interval", "3"]).check()
    assert "at iteration 3" in resumed.stdout and resumed.losses == uninterrupted.losses[3:]
    assert not (tmp_path / "iter_0000006.tmp").exists() and (tmp_path / "iter_0000006" / "megatron_edit.json").exists()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "6"


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_a_save_the_disk_refuses_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, ckpt_format):
    """The filesystem refuses a save's writes (here a file-size limit, EFBIG; a full disk is ENOSPC, the same path):
    every rank stops with one line naming the error, without waiting out a timeout, the partial folder is gone, and
    the last complete checkpoint resumes."""
    args = TINY_GPT + STEPS + ["--ckpt-format", ckpt_format, "--save", str(tmp_path), "--save-interval", "2"]
    run_training(2, args + ["--train-iters", "2"]).check()
    command, env = training_command(2, args + ["--train-iters", "4", "--load", str(tmp_path),
                                               "--override-opt_param-scheduler"])
    limited = subprocess.run(["bash", "-c", 'ulimit -f 16 && exec "$@"', "bash", *command], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert limited.returncode != 0
    assert ("error: the checkpoint of iteration 4 could not be written (rank 0: File too large and 1 more); its "
            f"partial folder is removed and in {tmp_path} iteration 2 is intact") in limited.stderr, limited.stderr[-3000:]
    assert "Traceback" not in limited.stderr, limited.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    resumed = run_training(2, args + ["--train-iters", "3", "--load", str(tmp_path),
                                      "--override-opt_param-scheduler"]).check()
    assert "at iteration 2" in resumed.stdout and len(resumed.losses) == 1


@pytest.mark.slow
def test_incompatible_or_missing_checkpoint_is_one_line(tmp_path):
    run_training(1, TINY_GPT + STEPS + ["--train-iters", "2", "--save", str(tmp_path)]).check()
    wider = [a if a != "64" else "128" for a in TINY_GPT]
    result = run_training(1, wider + STEPS + ["--train-iters", "4", "--load", str(tmp_path)])
    assert result.returncode != 0
    assert "error: checkpoint 2 does not fit this run: hidden_size 64 (checkpoint) vs 128 (this run)" in result.stderr
    longer = TINY_GPT + STEPS + ["--train-iters", "4", "--load", str(tmp_path)]
    result = run_training(1, longer)
    assert result.returncode != 0
    assert "error: checkpoint 2's learning-rate schedule differs from this run's: lr_decay_steps 16 (checkpoint) " \
           "vs 32 (this run;" in result.stderr and "--override-opt_param-scheduler" in result.stderr
    assert len(run_training(1, longer + ["--override-opt_param-scheduler"]).check().losses) == 2
    aedit = ["--dp-mode", "aedit", "--model-shard-group-size", "1", "--ckpt-format", "torch_dist"]
    result = run_training(2, TINY_GPT + STEPS + aedit + ["--train-iters", "4", "--save", str(tmp_path)])
    assert result.returncode != 0
    assert "error: --ckpt-format torch_dist: A-EDiT's replicas stand at different iterations" in result.stderr
    result = run_training(1, longer + ["--ckpt-step", "3"])
    assert result.returncode != 0 and f"error: --ckpt-step 3: {tmp_path} holds no complete checkpoint of iteration 3 " \
        "(it holds 2)" in result.stderr
    result = run_training(1, TINY_GPT + STEPS + ["--train-iters", "4", "--load", str(tmp_path / "nope")])
    assert result.returncode != 0 and f"error: --load {tmp_path / 'nope'} does not exist" in result.stderr
    result = run_training(1, TINY_GPT + STEPS + ["--train-iters", "4", "--load", str(tmp_path / "iter_0000002")])
    assert result.returncode != 0 and f"error: --load {tmp_path / 'iter_0000002'} holds no checkpoint to load (it is " \
        f"one checkpoint's directory: give its parent, --load {tmp_path}); to start from scratch" in result.stderr
    # A crafted .metadata (torch DCP reads it with plain pickle), its size recorded as written, is refused before
    # anything unpickles it.
    crafted = pickle.dumps(RunsCode(tmp_path / "ran"))
    (tmp_path / "iter_0000002" / ".metadata").write_bytes(crafted)
    record = json.loads((tmp_path / "iter_0000002" / "megatron_edit.json").read_text())
    record["files"][".metadata"] = len(crafted)
    (tmp_path / "iter_0000002" / "megatron_edit.json").write_text(json.dumps(record))
    result = run_training(1, longer + ["--override-opt_param-scheduler"])
    assert result.returncode != 0 and "holds objects that loading would run code for" in result.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_finetune_and_partial_loads_follow_megatron_lms_flags(tmp_path):
    args = TINY_GPT + STEPS + ["--bf16", "--ckpt-format", "torch_dist"]
    scratch = run_training(2, args + ["--train-iters", "12", "--save", str(tmp_path), "--save-interval", "12",
                                      "--no-save-optim"]).check()
    result = run_training(2, args + ["--train-iters", "14", "--load", str(tmp_path)])
    assert result.returncode != 0
    assert "checkpoint 12 was saved with --no-save-optim: load it with --no-load-optim or --finetune" in result.stderr
    resumed = run_training(2, args + ["--train-iters", "14", "--load", str(tmp_path), "--no-load-optim"]).check()
    assert "at iteration 12" in resumed.stdout and len(resumed.losses) == 2
    # Without the optimizer, the weights load into the other optimizer too.
    distributed = run_training(2, args + ["--train-iters", "14", "--load", str(tmp_path), "--no-load-optim",
                                          "--use-distributed-optimizer"]).check()
    assert distributed.losses[0] == pytest.approx(resumed.losses[0], rel=1e-6)
    finetuned = run_training(2, args + ["--train-iters", "3", "--load", str(tmp_path), "--finetune"]).check()
    assert "(--finetune: weights of iteration 12)" in finetuned.stdout and len(finetuned.losses) == 3
    # The trained weights carry on through a fresh optimizer's steps (in bf16, through its fp32 main copies, which
    # must be refreshed from the loaded weights), starting again from the first batch.
    assert max(finetuned.losses) < scratch.losses[0] - 0.1


def write_megatron_lm_checkpoint(directory, dump, ranks: int, transformer_impl: str = "local") -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                    str(REPO / "tests/megatron_lm_checkpoint.py"), "--save", str(directory), "--dump", str(dump),
                    "--transformer-impl", transformer_impl], cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=300)


def loads_with_its_exact_weights(fixture, dump, tmp_path) -> list:
    """Loads the Megatron-LM checkpoint `fixture` (training no further) and compares every parameter with what its
    writer dumped; returns the flags that load it."""
    args = TINY_GPT + STEPS + TORCH_DIST + ["--load", str(fixture)]
    run_training(1, args + ["--train-iters", "3", "--dump-dir", str(tmp_path)], script="tests/edit_runner.py").check()
    loaded, saved = torch.load(tmp_path / "rank0.pt")["params"], torch.load(dump)
    assert loaded.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    return args


def model_keys(directory) -> dict:
    """{key: global shape} of a torch_dist checkpoint's model entries (objects by their key alone)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {key.split("/shard_")[0]: tuple(getattr(entry, "size", ())) for key, entry in metadata.items()
            if not key.startswith(("optimizer", "rng_state", "megatron_edit", "opt_param_scheduler"))}


@pytest.mark.slow
def test_megatron_lm_checkpoint_loads_and_trains_on(tmp_path):
    """A checkpoint as Megatron-LM writes it (tests/megatron_lm_checkpoint.py: megatron-core alone, no record of ours)
    loads with its exact weights and trains on under DDP and under EDiT, whose anchors start from those weights (its
    first loss is DDP's, and its syncs keep it near DDP); --finetune restarts at iteration 0. Ours carries the keys
    and units Megatron-LM reads."""
    fixture, dump = tmp_path / "megatron_lm", tmp_path / "saved.pt"
    write_megatron_lm_checkpoint(fixture, dump, ranks=2)
    args = loads_with_its_exact_weights(fixture, dump, tmp_path)
    ddp = run_training(2, args + ["--train-iters", "7"]).check()
    assert "at iteration 3" in ddp.stdout and len(ddp.losses) == 4
    edit = run_training(2, args + ["--train-iters", "7", "--dp-mode", "edit", "--model-shard-group-size", "1",
                                   *local_sgd(0, 2)]).check()
    assert "edit sync at iteration" in edit.stdout
    assert edit.losses[0] == pytest.approx(ddp.losses[0], rel=1e-6)
    assert edit.losses == pytest.approx(ddp.losses, rel=0.02)
    finetuned = run_training(2, args + ["--train-iters", "2", "--finetune"]).check()
    assert "(--finetune: weights of iteration 3)" in finetuned.stdout and len(finetuned.losses) == 2

    ours = tmp_path / "ours"
    run_training(1, TINY_GPT + STEPS + TORCH_DIST + ["--train-iters", "2", "--save", str(ours)]).check()
    common = torch.load(ours / "iter_0000002" / "common.pt", weights_only=False)
    assert {"args", "checkpoint_version", "iteration", "opt_param_scheduler"} <= common.keys()
    assert common["opt_param_scheduler"]["num_steps"] == 2 * 8  # samples, as Megatron-LM counts


@pytest.mark.slow
def test_a_transformer_engine_checkpoint_loads_into_local_layers_and_ours_holds_its_keys(tmp_path):
    """Megatron-LM with --transformer-impl transformer_engine saves each layer norm inside the linear layer after it
    (linear_qkv.layer_norm_weight, linear_fc1.layer_norm_weight) and FP8 state as each TE module's _extra_state
    (tests/megatron_lm_checkpoint.py's TE_LAYER_KEYS, from megatron-core's TE spec): it loads into our local layers
    with its exact weights (its FP8 state set aside), and our checkpoint holds every key of it at the same shape,
    which is what TE's layers ask for when loading it."""
    fixture, dump = tmp_path / "megatron_lm_te", tmp_path / "saved.pt"
    write_megatron_lm_checkpoint(fixture, dump, ranks=1, transformer_impl="transformer_engine")
    args = loads_with_its_exact_weights(fixture, dump, tmp_path)
    ours = tmp_path / "ours"
    trained = run_training(1, args + ["--train-iters", "4", "--save", str(ours)]).check()
    assert "at iteration 3" in trained.stdout and len(trained.losses) == 1
    theirs = model_keys(fixture / "iter_0000003")
    assert any(key.endswith("linear_qkv.layer_norm_weight") for key in theirs)
    assert model_keys(ours / "iter_0000004") == theirs
