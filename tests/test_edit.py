"""EDiT (--dp-mode edit) against a plain re-implementation, and its claims about layers, bytes and memory."""
import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from launcher import REPO, TINY_GPT, run_training
from megatron_edit.dp.local_sgd.outer import outer_sgd_step
from megatron_edit.dp.local_sgd.params import MainParams, ModuleShard

# SGD keeps the comparison about EDiT: Adam would turn reduction-order noise on near-zero gradients into
# lr-sized parameter differences.
TRAINING = TINY_GPT + ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--lr", "0.05", "--weight-decay", "0",
                       "--clip-grad", "0", "--lr-decay-style", "constant", "--micro-batch-size", "2",
                       "--global-batch-size", "8", "--train-iters", "10", "--log-interval", "100",
                       "--eval-interval", "1000", "--eval-iters", "1", "--outer-lr", "0.7", "--outer-momentum", "0.8"]


def local_sgd(warmup, interval):
    """W and H, or W and (H0, H): a ramp of sync intervals from H0 up to H."""
    if isinstance(interval, tuple):
        return local_sgd(warmup, interval[1]) + ["--local-sgd-initial-sync-interval", str(interval[0])]
    return ["--local-sgd-warmup-iters", str(warmup), "--local-sgd-sync-interval", str(interval)]


@functools.lru_cache(maxsize=None)
def run(nproc: int, extra: tuple):
    """Per-rank dumps of tests/edit_runner.py for TRAINING + extra on nproc CPU ranks."""
    dump_dir = tempfile.mkdtemp(prefix="edit-run-")
    run_training(nproc, TRAINING + list(extra) + ["--dump-dir", dump_dir], script="tests/edit_runner.py").check()
    return [torch.load(Path(dump_dir) / f"rank{r}.pt") for r in range(nproc)]


@functools.lru_cache(maxsize=None)
def reference(replicas: int, shard_size: int, extra: tuple):
    dump = tempfile.mktemp(suffix=".pt")
    command = [sys.executable, str(REPO / "tests/edit_reference.py"), *TRAINING, *extra, "--device", "cpu",
               "--replicas", str(replicas), "--shard-size", str(shard_size), "--dump", dump]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(dump)


def edit(shard: int, replicas: int, *extra) -> tuple:
    return shard * replicas, ("--dp-mode", "edit", "--model-shard-group-size", str(shard), *extra)


def assert_params_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("shard,replicas,warmup,interval", [
    (1, 2, 2, 3),   # M=2 replicas of one rank each
    (2, 2, 2, 3),   # each replica sharded over two ranks
    (1, 2, 2, 1),   # H=1: a sync before every local step
    (2, 2, 0, 2),   # W=0: local steps from the first iteration
    (2, 2, 0, (1, 4)),  # W=0 and a ramp of intervals: syncs after 1, 3 and 7 local steps, then every 4
    (1, 2, 1, (2, 8)),  # after warm-up: syncs after 2 and 6 local steps (the next, after 14, is past the end)
], ids=["M2", "S2", "H1", "W0", "ramp", "ramp-after-warmup"])
def test_edit_matches_reference_implementation(shard, replicas, warmup, interval):
    nproc, args = edit(shard, replicas, *local_sgd(warmup, interval))
    dumps = run(nproc, args)
    expected = reference(replicas, shard, tuple(local_sgd(warmup, interval)))
    if isinstance(interval, tuple):
        initial, interval = interval
        ramp = [sync["iteration"] for sync in dumps[0]["syncs"]]
        assert ramp == ([2, 4, 8, 10] if initial == 1 else [4, 8, 10])  # the iteration after each sync point; final
    for replica in range(replicas):
        for rank in range(replica * shard, (replica + 1) * shard):
            assert_params_close(dumps[rank]["params"], expected[replica])
    # Training ends with a sync: every rank holds the same model, and that sync came after local steps.
    for name, value in dumps[0]["params"].items():
        assert all(torch.equal(value, dump["params"][name]) for dump in dumps), name
    assert dumps[0]["syncs"][-1]["iteration"] == 10  # the final sync, after the last of the 10 iterations


LR_SCALE = ("--local-sgd-lr-scale", "1.5")


@pytest.mark.slow
def test_local_step_lr_scale_matches_reference_implementation():
    """S=2, M=2, W=2, H=3: the local steps (iterations 3-10) step at 1.5 x the schedule's LR, the warm-up at 1 x."""
    nproc, args = edit(2, 2, *local_sgd(2, 3), *LR_SCALE)
    dumps = run(nproc, args)
    expected = reference(2, 2, tuple(local_sgd(2, 3)) + LR_SCALE)
    for rank, dump in enumerate(dumps):
        assert_params_close(dump["params"], expected[rank // 2])
    assert dumps[0]["learning_rates"][0] == [0.05]
    assert dumps[0]["learning_rates"][2:] == [[pytest.approx(0.075)]] * 8


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--tensor-model-parallel-size", "2", "--use-distributed-optimizer", "--bf16",
                                     "--optimizer", "adam", "--lr", "0.002"),
                                    ("--pipeline-model-parallel-size", "2",)], ids=["tp2_distopt_adam_bf16", "pp2"])
def test_local_step_lr_scale_on_tensor_and_pipeline_layouts(layout):
    """Every parameter group of every rank (the distributed optimizer's, over bf16's fp32 main copies) steps at the
    scaled LR once the replicas part, and training goes on."""
    nproc, args = edit(1, 2, *local_sgd(2, 3), *LR_SCALE)
    dumps = run(2 * nproc, args + layout)
    lr = dumps[0]["learning_rates"][0][0]
    for dump in dumps:
        assert dump["learning_rates"][:2] == [[lr]] * 2
        assert dump["learning_rates"][2:] == [[pytest.approx(1.5 * lr)]] * 8
    assert dumps[-1]["losses"][-1] < dumps[-1]["losses"][0]


DELAY = ("--sync-delay-steps", "2")


@pytest.mark.slow
def test_delayed_outer_step_matches_reference_implementation():
    """S=2, M=2, W=2, H=3, tau=2: the syncs of iterations 6 and 9 are applied at 8 and (training over) before the final
    sync, each carrying the local steps made since it was issued."""
    nproc, args = edit(2, 2, *local_sgd(2, 3), *DELAY)
    dumps = run(nproc, args)
    expected = reference(2, 2, tuple(local_sgd(2, 3)) + DELAY)
    for rank, dump in enumerate(dumps):
        assert_params_close(dump["params"], expected[rank // 2])
    events = [[kind for kind, _ in record["trace"] if kind != "forward_end"] for record in dumps[0]["iterations"]]
    units = len(dumps[0]["units"])
    assert events[5] == ["issue"] * units and events[7] == ["synced"] * units  # iterations 6 and 8
    assert events[8] == ["issue"] * units and not events[6] and not events[9]  # 9's waits for the final sync
    assert [sync["iteration"] for sync in dumps[0]["syncs"]] == [8, 10, 10]


FRAGMENTS = ("--sync-fragments", "2")


@pytest.mark.slow
def test_staggered_fragments_match_reference_implementation():
    """S=2, M=2, W=2, H=4, F=2, tau=1: fragment 1 syncs at iterations 5 and 9 (2 and 6 local steps), fragment 0 at 7
    (4 local steps), each applied one iteration later; then the final sync of every module."""
    extra = (*local_sgd(2, 4), *FRAGMENTS, "--sync-delay-steps", "1")
    nproc, args = edit(2, 2, *extra)
    dumps = run(nproc, args)
    expected = reference(2, 2, extra)
    for rank, dump in enumerate(dumps):
        assert_params_close(dump["params"], expected[rank // 2])
    units = {u["name"] for u in dumps[0]["units"]}
    issued = {iteration: {name for kind, name in record["trace"] if kind == "issue"}
              for iteration, record in enumerate(dumps[0]["iterations"], start=1)}
    assert {i for i, names in issued.items() if names} == {5, 7, 9}
    assert issued[5] == issued[9] and issued[5] | issued[7] == units and not issued[5] & issued[7]
    assert [(sync["iteration"], len(sync["records"])) for sync in dumps[0]["syncs"]] == [
        (6, len(issued[5])), (8, len(issued[7])), (10, len(issued[9])), (10, len(units))]


@pytest.mark.slow
def test_quantized_delayed_exchange_moves_to_its_all_gather_once_its_all_to_all_is_done():
    """int8 with tau=2: each module's all-to-all is issued in the sync (iteration 6), its all-gather at a later module
    boundary, in the order of issue, no later than the outer step applied at 8; the model stays within int8's rounding
    of the fp32 delayed run."""
    nproc, args = edit(2, 2, *local_sgd(2, 3), *DELAY)
    fp32 = run(nproc, args)
    int8 = run(nproc, args + ("--sync-dtype", "int8"))
    units = [u["name"] for u in int8[0]["units"]]
    for dump in int8:
        events = [(iteration, kind, name) for iteration, record in enumerate(dump["iterations"], start=1)
                  for kind, name in record["trace"] if kind in ("issue", "advance", "synced")]
        sync_6 = [e for e in events if 6 <= e[0] <= 8]
        issued, advanced, synced = ([(i, n) for i, k, n in sync_6 if k == kind]
                                    for kind in ("issue", "advance", "synced"))
        assert [n for _, n in issued] == [n for _, n in advanced] == [n for _, n in synced] == units
        assert {i for i, _ in issued} == {6} and {i for i, _ in synced} == {8}
        for name in units:
            advance = next(k for k, event in enumerate(sync_6) if event[1:] == ("advance", name))
            assert sync_6.index((6, "issue", name)) < advance
    for rank in range(nproc):
        for name, value in fp32[rank]["params"].items():
            difference = (int8[rank]["params"][name] - value).abs().max().item()
            assert 0 < difference < 2e-3, name


@pytest.mark.slow
def test_delayed_outer_step_on_tensor_parallel_reproduces_the_unsplit_run():
    nproc, args = edit(1, 2, *local_sgd(2, 3), *DELAY)
    unsplit = run(nproc, args)
    split = run(2 * nproc, args + ("--tensor-model-parallel-size", "2"))
    torch.testing.assert_close(split[0]["losses"], unsplit[0]["losses"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split[-1]["losses"], unsplit[-1]["losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_each_module_syncs_right_before_its_own_forward_and_overlaps_the_next():
    dumps = run(*edit(2, 2, *local_sgd(2, 3)))
    units = [u["name"] for u in dumps[0]["units"]]
    for iteration, record in enumerate(dumps[0]["iterations"], start=1):
        events = record["trace"]
        syncing = [e for e in events if e[0] in ("issue", "synced")]
        if iteration not in (6, 9):
            assert syncing == [], iteration
            continue
        position = {(kind, name): events.index((kind, name)) for kind, name in events[::-1]}
        for k, name in enumerate(units):
            assert position[("synced", name)] < position[("forward_end", name)]
            if k > 0:  # synchronized after the previous module ran, i.e. just before its own forward
                assert position[("synced", name)] > position[("forward_end", units[k - 1])]
            if k + 1 < len(units):  # the next module's collective is in flight while this one computes
                assert position[("issue", units[k + 1])] < position[("forward_end", name)]


@pytest.mark.slow
def test_no_bytes_cross_sync_group_on_local_steps_and_pseudo_gradient_once_on_sync_steps():
    dumps = run(*edit(2, 2, *local_sgd(2, 3)))
    for dump in dumps:
        shard_values = sum(u["shard_numel"] for u in dump["units"])
        for iteration, record in enumerate(dump["iterations"], start=1):
            # Only the replica's own groups may carry bytes on a local step: shard, and tensor/pipeline parallel.
            crossing = {group: n for group, n in record["bytes"].items()
                        if n and group not in ("shard", "tp", "pp", "mp", "embd", "pos_embd")}
            if iteration <= 2:
                assert crossing.get("sync", 0) > 0  # warm-up: gradients are averaged over replicas
            elif iteration in (6, 9):
                assert crossing == {"sync": 4 * shard_values}, iteration
            else:
                assert crossing == {}, iteration


@pytest.mark.slow
def test_outer_state_is_two_values_per_owned_parameter():
    dumps = run(*edit(2, 2, *local_sgd(2, 3)))
    for dump in dumps:
        params = sum(p.numel() for p in dump["params"].values())
        assert sum(u["numel"] for u in dump["units"]) == params
        assert all(u["shard_numel"] == -(-u["numel"] // 2) for u in dump["units"])
        assert dump["outer_state_numel"] == 2 * sum(u["shard_numel"] for u in dump["units"])


@pytest.mark.parametrize("offload,expected", [(True, "cpu"), (False, "meta")])
def test_offloaded_outer_state_lives_off_the_compute_device(offload, expected):
    """Parameters on the meta device stand in for a GPU: offloaded state must not follow them there."""
    params = [torch.nn.Parameter(torch.empty(10, 3, device="meta"))]
    main = MainParams.__new__(MainParams)
    main.full, main.fragments = {}, {}
    shard = ModuleShard("layer", params, shard_rank=1, shard_size=4, main_params=main, offload=offload)
    assert shard.anchor.device.type == shard.momentum.device.type == expected
    assert shard.anchor.numel() == 8 and shard.owned == slice(8, 16)


@pytest.mark.slow
def test_warmup_longer_than_training_is_synchronous_data_parallelism():
    edit_dumps = run(*edit(2, 2, *local_sgd(20, 3)))
    ddp_dumps = run(4, ())
    assert_params_close(edit_dumps[0]["params"], ddp_dumps[0]["params"])
    assert all(not record["bytes"].get("sync", 0) == 0 for record in edit_dumps[0]["iterations"])


@pytest.mark.slow
def test_single_replica_is_plain_training():
    edit_dumps = run(*edit(2, 1, *local_sgd(1, 2)))
    ddp_dumps = run(2, ())
    assert_params_close(edit_dumps[0]["params"], ddp_dumps[0]["params"])


@pytest.mark.slow
@pytest.mark.parametrize("layout,shard", [(("--tensor-model-parallel-size", "2"), 2),
                                          (("--pipeline-model-parallel-size", "2"), 1)])
def test_edit_with_tensor_or_pipeline_parallelism_matches_its_tp1_pp1_run(layout, shard):
    """With a ramp of sync intervals (1, then 2, then H=3): syncs after 1, 3 and 6 local steps."""
    nproc, args = edit(shard, 2, *local_sgd(2, (1, 3)))
    plain = run(nproc, args)[-1]["losses"]
    composed = run(2 * nproc, args + layout)
    assert composed[-1]["losses"] == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < plain[0]
    # --distributed-timeout-minutes (10 by default) reaches every group, megatron-core's and the mode's; but for
    # megatron-core 0.16's gloo group of expert data parallelism, made without it, which only MoE models use.
    timeouts = composed[-1]["group_timeouts"]
    timeouts.pop("_EXPERT_DATA_PARALLEL_GROUP_GLOO")
    assert {"_TENSOR_MODEL_PARALLEL_GROUP", "local_sgd.shard", "local_sgd.sync_exchange"} <= timeouts.keys()
    assert {name: seconds for name, seconds in timeouts.items() if seconds != 600} == {}


def test_outer_step_equals_torch_sgd_nesterov():
    torch.manual_seed(0)
    anchor, grads = torch.randn(50), [torch.randn(50) for _ in range(3)]
    reference = torch.nn.Parameter(anchor.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.8, nesterov=True)
    momentum = torch.zeros(50)
    for g in grads:
        reference.grad = g.clone()
        sgd.step()
        outer_sgd_step(anchor, momentum, g, lr=0.7, momentum_coefficient=0.8, nesterov=True)
    torch.testing.assert_close(anchor, reference.detach())


@pytest.mark.slow
def test_distributed_optimizer_and_bf16_main_parameters():
    """Warm-up averages gradient shards, syncs read and write fp32 main parameters (full or this rank's fragment)."""
    adam = ("--optimizer", "adam", "--lr", "3e-3")
    nproc, args = edit(2, 2, *local_sgd(2, (2, 4)), *adam)  # a ramp: syncs after 2 and 6 local steps
    plain = run(nproc, args)
    sharded = run(nproc, args + ("--use-distributed-optimizer",))
    bf16 = run(nproc, args + ("--use-distributed-optimizer", "--bf16"))
    assert sharded[-1]["losses"] == pytest.approx(plain[-1]["losses"], rel=1e-5)
    assert bf16[-1]["losses"] == pytest.approx(plain[-1]["losses"], abs=0.01)
    for dumps in (sharded, bf16):
        for name, value in dumps[0]["params"].items():  # one replica, identical on its shard ranks
            assert torch.equal(value, dumps[1]["params"][name]), name
