"""The baselines EDiT is judged against: DiLoCo and Post-Local-SGD, checked against EDiT and each other."""
import pytest
import torch

from test_edit import assert_params_close, edit, local_sgd, run

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
