"""The baselines EDiT is judged against: DiLoCo and Post-Local-SGD, checked against EDiT and each other."""
import pytest
import torch

from test_edit import assert_params_close, edit, local_sgd, run
from test_edit_layouts import assert_replicated_copies_identical

pytestmark = pytest.mark.slow  # every test here starts processes

SCHEDULE = tuple(local_sgd(2, 3))  # W=2, H=3, 10 iterations: syncs after iterations 5 and 8


def mode(name: str, shard: int, replicas: int, *extra) -> tuple:
    return shard * replicas, ("--dp-mode", name, "--model-shard-group-size", str(shard), *extra)


def sync_bytes(dump) -> list:
    return [record["bytes"].get("sync", 0) for record in dump["iterations"]]


def test_diloco_lands_on_edits_parameters_with_a_full_outer_copy():
    """Same update, different when and how: DiLoCo syncs the whole model at the end of iterations 5 and 8,
    EDiT each module at the start of iterations 6 and 9."""
    edit_dumps = run(*edit(2, 2, *SCHEDULE))
    diloco_dumps = run(*mode("diloco", 2, 2, *SCHEDULE))
    for rank in range(4):
        assert_params_close(diloco_dumps[rank]["params"], edit_dumps[rank]["params"])
    numel = sum(p.numel() for p in edit_dumps[0]["params"].values())
    assert diloco_dumps[0]["outer_state_numel"] == 2 * numel  # every rank: anchor + momentum of the whole model
    assert edit_dumps[0]["outer_state_numel"] < numel + 100   # EDiT: the same, shared by the shard group of 2
    # DiLoCo all-reduces the whole model on every rank of the sync group; EDiT only each rank's shard.
    assert sync_bytes(diloco_dumps[0])[2:] == [0, 0, 4 * numel, 0, 0, 4 * numel, 0, 0]  # after warm-up
    edit_sync = sync_bytes(edit_dumps[0])
    assert [i + 1 for i, b in enumerate(edit_sync) if b] == [1, 2, 6, 9]  # warm-up, then the two syncs
    assert edit_sync[5] <= 4 * numel // 2 + 4 * 8  # half the model per rank (plus padding of the 8 modules)


@pytest.fixture(scope="module")
def averaging_runs():
    history = ("--dump-param-history",)
    return (run(*mode("diloco", 1, 2, *SCHEDULE, "--outer-lr", "1", "--outer-momentum", "0", *history)),
            run(*mode("post-local-sgd", 1, 2, *SCHEDULE, *history)))


def test_diloco_with_outer_lr_1_and_no_momentum_is_post_local_sgd(averaging_runs):
    diloco, post_local_sgd = averaging_runs
    for rank in range(2):
        for step in range(10):
            assert_params_close(diloco[rank]["param_history"][step], post_local_sgd[rank]["param_history"][step])


def test_post_local_sgd_averages_replicas_exactly_after_sync_steps_only(averaging_runs):
    _, post_local_sgd = averaging_runs
    numel = sum(p.numel() for p in post_local_sgd[0]["params"].values())
    for step in range(10):
        first, second = (post_local_sgd[rank]["param_history"][step] for rank in range(2))
        identical = all(torch.equal(first[name], second[name]) for name in first)
        # warm-up (1, 2) is synchronous; after the syncs at 5 and 8 the replicas hold the very same parameters
        assert identical == (step + 1 in (1, 2, 5, 8)), step + 1
    assert sync_bytes(post_local_sgd[0])[2:] == [0, 0, 4 * numel, 0, 0, 4 * numel, 0, 0]


def test_diloco_int8_sync_on_tensor_parallel_sends_a_quarter_and_tracks_fp32():
    """--sync-dtype int8 with error feedback, TP=2: each sync moves about a quarter of fp32's bytes, TP-replicated
    copies stay bit-identical, and the losses follow the fp32 run's within int8's rounding."""
    nproc, args = mode("diloco", 1, 2, *SCHEDULE, "--tensor-model-parallel-size", "2")
    fp32 = run(2 * nproc, args)
    int8 = run(2 * nproc, args + ("--sync-dtype", "int8", "--sync-error-feedback"))
    assert assert_replicated_copies_identical(int8) > 0
    fp32_syncs, int8_syncs = ([b for b in sync_bytes(dumps[0])[2:] if b] for dumps in (fp32, int8))
    assert len(int8_syncs) == len(fp32_syncs) == 2
    assert all(0.25 <= b / f <= 0.27 for b, f in zip(int8_syncs, fp32_syncs))
    torch.testing.assert_close(int8[-1]["losses"], fp32[-1]["losses"], rtol=0, atol=1e-3)
    assert int8[-1]["losses"] != fp32[-1]["losses"]  # int8 rounding did reach the model


def test_diloco_ramps_its_sync_intervals_as_edit_does():
    """W=0 and H0=1 up to H=4: DiLoCo syncs after iterations 1, 3 and 7 (and at the end), landing where EDiT does."""
    ramp = tuple(local_sgd(0, (1, 4)))
    edit_dumps = run(*edit(2, 2, *ramp))
    diloco_dumps = run(*mode("diloco", 2, 2, *ramp))
    for rank in range(4):
        assert_params_close(diloco_dumps[rank]["params"], edit_dumps[rank]["params"])
    assert [i + 1 for i, b in enumerate(sync_bytes(diloco_dumps[0])) if b] == [1, 3, 7]
