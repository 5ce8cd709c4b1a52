"""EDiT and A-EDiT on tensor- and pipeline-parallel layouts: a replica decides as one, and what is logged means
what it means under ddp."""
import math

import pytest
import torch

from launcher import TINY_GPT, run_training
from test_edit import edit, local_sgd, run

pytestmark = pytest.mark.slow  # every test here starts processes

PENALTY = ("--edit-anomaly-elimination", "--edit-anomaly-warmup-syncs", "1", "--edit-weighted-average",
           "--edit-weight-temperature", "0.05", "--edit-pseudo-grad-clip", "0.02")
TENSOR_PARALLEL = ("--tensor-model-parallel-size", "2")
PIPELINE_PARALLEL = ("--pipeline-model-parallel-size", "2")


def aedit(*extra, train_iters: int = 24) -> tuple:
    """A-EDiT, 2 replicas of one data-parallel rank each, after 2 warm-up iterations a sync every 3 iterations of a
    simulated clock (a straggler's iterations take longer on it): the same iterations however busy the machine."""
    nproc, args = edit(1, 2, *local_sgd(2, 1))
    return ("--dp-mode", "aedit") + args[2:] + ("--aedit-sync-seconds", "0.375", "--simulated-step-seconds", "0.125",
                                                "--train-iters", str(train_iters)) + extra


def by_replica(dumps: list) -> dict:
    replicas = {}
    for dump in dumps:
        replicas.setdefault(dump["replica"], []).append(dump)
    return replicas


@pytest.mark.parametrize("layout", [TENSOR_PARALLEL, PIPELINE_PARALLEL], ids=["tp2", "pp2"])
def test_aedit_replica_syncs_as_one_on_tensor_and_pipeline_layouts(layout):
    dumps = run(4, aedit(*layout))
    replicas = by_replica(dumps)
    assert sorted(replicas) == [0, 1] and all(len(ranks) == 2 for ranks in replicas.values())
    for ranks in replicas.values():
        iterations = [[sync["iteration"] for sync in dump["syncs"]] for dump in ranks]
        assert iterations[0] == iterations[1]  # every rank of a replica syncs in the same iterations
        assert len(iterations[0]) >= 2
        assert len(ranks[0]["losses"]) == len(ranks[1]["losses"])  # and stops together
    last_stage = [dump for dump in dumps if dump["losses"][0] > 0]  # other pipeline stages see no loss
    assert last_stage and all(dump["losses"][-1] < dump["losses"][0] for dump in last_stage)
    # The replicas meet in every sync: each holds the same number of them, ending on the same model.
    assert len({len(dump["syncs"]) for dump in dumps}) == 1


def assert_replicated_copies_identical(dumps: list) -> int:
    """Within each replica, every parameter (or tensor-parallel slice) several ranks hold, TP-replicated ones and
    the tied embedding's copies on the first and last stage, is bit-identical on all of them. Returns how many
    (parameter, rank pair) comparisons were made."""
    compared = 0
    for ranks in by_replica(dumps).values():
        for i, first in enumerate(ranks):
            for second in ranks[i + 1:]:
                for name in first["params"].keys() & second["params"].keys():
                    if name in first["tensor_parallel"] and first["tensor_rank"] != second["tensor_rank"]:
                        continue  # different slices
                    assert torch.equal(first["params"][name], second["params"][name]), name
                    compared += 1
    return compared


SLOW_LINK = ("--sync-dtype", "int8", "--sync-error-feedback", "--sync-delay-steps", "1")


@pytest.mark.parametrize("layout", [
    TENSOR_PARALLEL, PIPELINE_PARALLEL, PIPELINE_PARALLEL + SLOW_LINK,
    TENSOR_PARALLEL + ("--use-distributed-optimizer", "--bf16", "--optimizer", "adam", "--lr", "3e-3") + SLOW_LINK,
], ids=["tp2", "pp2_tied_embeddings", "pp2_int8_delayed", "tp2_distributed_optimizer_bf16_int8_delayed"])
def test_penalty_keeps_replicated_and_tied_copies_bit_identical(layout):
    nproc, args = edit(1, 2, *local_sgd(2, 2), *PENALTY, "--edit-anomaly-threshold", "1")
    dumps = run(2 * nproc, args + layout)
    assert assert_replicated_copies_identical(dumps) > 0
    syncs = dumps[0]["syncs"]
    assert len(syncs) == 4  # iterations 5, 7, 9 and the final one
    records = [r for sync in syncs for r in sync["records"]]
    assert any(r["clipped_norm"] < r["averaged_norm"] for r in records)  # clipping bites
    assert any(abs(r["weights"][0] - 0.5) > 1e-3 for r in records)  # weights follow the norms
    if PIPELINE_PARALLEL[0] in layout:  # the word embedding's two copies decided alike on the first and last stage
        first, last = (next(d for d in dumps if d["replica"] == 0 and name in [u["name"] for u in d["units"]])
                       for name in ("embedding.word_embeddings", "output_layer"))
        decisions = [[(r["norms"], r["outliers"], r["weights"], r["reset_to_anchor"],
                       None if math.isnan(r["clipped_norm"]) else r["clipped_norm"])  # NaN: reset, no step
                      for sync in dump["syncs"] for r in sync["records"] if r["name"] == name]
                     for dump, name in ((first, "embedding.word_embeddings"), (last, "output_layer"))]
        assert decisions[0] == decisions[1]


@pytest.mark.parametrize("layout", [
    PIPELINE_PARALLEL,
    TENSOR_PARALLEL + ("--use-distributed-optimizer", "--bf16", "--optimizer", "adam", "--lr", "3e-3") + SLOW_LINK,
], ids=["pp2_tied_embeddings", "tp2_distributed_optimizer_bf16_int8_delayed"])
def test_staggered_fragments_keep_replicated_and_tied_copies_bit_identical(layout):
    """F=2 over H=4: the plan is one for the whole model, so the tied embedding's two copies (first and last stage)
    sync in the same fragment, and every pipeline stage syncs its part of each fragment in the same iteration."""
    nproc, args = edit(1, 2, *local_sgd(2, 4), "--sync-fragments", "2", *PENALTY, "--train-iters", "12")
    dumps = run(2 * nproc, args + layout)
    assert assert_replicated_copies_identical(dumps) > 0
    for ranks in by_replica(dumps).values():
        synced_at = [{name: sync["iteration"] for sync in dump["syncs"][:-1] for name in
                      (r["name"] for r in sync["records"])} for dump in ranks]
        if PIPELINE_PARALLEL[0] in layout:
            first, last = sorted(synced_at, key=lambda s: "output_layer" in s)
            assert first["embedding.word_embeddings"] == last["output_layer"]
            assert len(set(first.values()) | set(last.values())) == 2  # two fragments, two sync iterations
        else:
            assert synced_at[0] == synced_at[1] and len(set(synced_at[0].values())) == 2


def test_aedit_step_weight_blends_softmax_weights_with_shares_of_local_steps():
    weight = 0.5
    fast, slow = run(2, aedit("--simulate-straggler", "1:3", "--edit-weighted-average", "--aedit-step-weight",
                              str(weight)))
    steps_per_replica = []
    for dump in (fast, slow):
        iterations = [sync["iteration"] for sync in dump["syncs"]]
        # local steps before each sync: after warm-up (2) up to the sync iteration; the final sync, after the last
        previous, steps = 2, []
        for k, iteration in enumerate(iterations):
            final = k == len(iterations) - 1
            steps.append(iteration - previous + (1 if final else 0) if k else iteration - 1 - previous)
            previous = iteration
        steps_per_replica.append(steps)
    assert any(a != b for a, b in zip(*steps_per_replica))  # the straggler took fewer steps
    for k, sync in enumerate(fast["syncs"]):
        steps = [replica_steps[k] for replica_steps in steps_per_replica]
        for record in sync["records"]:
            softmax = torch.softmax(-torch.tensor(record["norms"], dtype=torch.float64), dim=0).tolist()
            expected = [(1 - weight) * w + weight * s / sum(steps) for w, s in zip(softmax, steps)]
            assert record["weights"] == pytest.approx(expected, rel=1e-9), (sync["iteration"], record["name"])


STEPS = ["--micro-batch-size", "2", "--global-batch-size", "8", "--log-interval", "1", "--eval-interval", "3",
         "--eval-iters", "2", "--train-iters", "6"]


def test_warmup_edit_logs_exactly_ddps_training_and_validation_losses():
    ddp = run_training(4, TINY_GPT + STEPS).check()
    warmup = run_training(4, TINY_GPT + STEPS + ["--dp-mode", "edit", "--model-shard-group-size", "2",
                                                 *local_sgd(6, 2)]).check()
    assert len(ddp.losses) == 6
    assert warmup.losses == pytest.approx(ddp.losses, abs=1e-5)
    assert warmup.validation_losses.keys() == ddp.validation_losses.keys() == {0, 3, 6}
    for iteration, loss in ddp.validation_losses.items():
        assert warmup.validation_losses[iteration] == pytest.approx(loss, abs=1e-5)


def test_aedit_saves_at_a_sync_and_the_resumed_run_continues_and_syncs(tmp_path):
    args = list(TINY_GPT) + ["--micro-batch-size", "2", "--global-batch-size", "8", "--log-interval", "4",
                             "--eval-interval", "1000", "--eval-iters", "1"]
    checkpoints = ("--save", str(tmp_path), "--save-interval", "6")
    first = run_training(2, args + list(aedit(*checkpoints))).check()
    assert " saved checkpoint at iteration" in first.stdout and "edit sync at iteration" in first.stdout
    second = run_training(2, args + list(aedit(*checkpoints, "--load", str(tmp_path), "--override-opt_param-scheduler",
                                                           train_iters=40))).check()
    assert "loaded checkpoint from" in second.stdout
    assert second.stdout.count("edit sync at iteration") >= 2
    assert " training summary: " in second.stdout


@pytest.mark.parametrize("layout,shard", [
    (TENSOR_PARALLEL, 1), (PIPELINE_PARALLEL, 1),
    (("--use-distributed-optimizer", "--bf16", "--optimizer", "adam", "--lr", "3e-3"), 2)],
    ids=["tp2", "pp2", "shard2-distopt-bf16"])
def test_shipped_codecs_track_fp32_on_every_layout(layout, shard):
    """EDiT's default codecs (int2 with error feedback for the warm-up's gradients and for syncs; W=4 of 10, H=3):
    copies that several ranks of a replica hold stay bit-identical (tensor-replicated ones, the tied embedding on
    two stages), every warm-up iteration and the sync send about a sixteenth of fp32's bytes, every rank
    ends on one model, and the losses fall and stay within 6% of the fp32 run's."""
    nproc, args = edit(shard, 2, *local_sgd(4, 3), *layout)
    nproc = 2 * nproc if shard == 1 else nproc
    fp32 = run(nproc, args)
    shipped = run(nproc, args + ("--sync-dtype", "int2", "--local-sgd-warmup-grad-dtype", "int2"))
    assert assert_replicated_copies_identical(shipped) > 0 or layout == PIPELINE_PARALLEL
    for dump_fp32, dump_shipped in zip(fp32, shipped):
        sent = [(a["bytes"].get("sync", 0), b["bytes"].get("sync", 0))
                for a, b in zip(dump_fp32["iterations"], dump_shipped["iterations"])]
        assert [i + 1 for i, (f, _) in enumerate(sent) if f] == [1, 2, 3, 4, 8]  # warm-up, the sync after 3 steps
        assert all(0.0625 <= q / f <= 0.11 for f, q in sent[:4] + [sent[7]]), sent  # 2 bits, scales, padding
    for first, other in zip(*by_replica(shipped).values()):  # rank k of each replica: one model at the end
        assert first["params"].keys() == other["params"].keys()
        for name in first["params"]:
            assert torch.equal(first["params"][name], other["params"][name]), name
    losses = [(a["losses"], b["losses"]) for a, b in zip(fp32, shipped) if a["losses"][0] > 0][0]
    # int2 gradients move a 10-step toy run by up to ~4% (Adam at 3e-3, bf16); quality is the benchmark's to judge
    torch.testing.assert_close(losses[1], losses[0], rtol=0.06, atol=0)
    assert losses[1][-1] < losses[1][0]
    assert losses[1] != losses[0]  # the rounding did reach the model
