"""tools/time_to_quality.py: the link model and the time-to-quality reading on hand-made curves, and the tool end to
end at the smallest size."""
import csv

import pytest

from tools import time_to_quality

TINY = ["--mock-data", "--num-layers", "1", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "8", "--eval-interval", "4", "--eval-iters", "2",
        "--lr-warmup-iters", "1", "--local-sgd-sync-interval", "2"]


def test_reaching_a_loss_is_read_linearly_between_evaluations_or_never():
    curve = [(10, 5.0, 100.0), (20, 4.0, 200.0), (30, 3.5, 300.0)]
    assert time_to_quality.time_to_reach(curve, 4.5) == pytest.approx(150.0)
    assert time_to_quality.time_to_reach(curve, 5.5) == 100.0
    assert time_to_quality.time_to_reach(curve, 3.0) is None


def test_modeled_time_is_compute_plus_every_byte_over_the_link():
    record = {"bytes": {4: 1000.0, 8: 1500.0}}
    assert time_to_quality.modeled_seconds(record, compute=0.5, rate=100.0) == {4: 12.0, 8: 19.0}


@pytest.mark.slow
@pytest.mark.usefixtures("tool_jobs_from_fork_server")
def test_tool_sets_ddp_against_a_variant_at_each_rho(tmp_path):
    time_to_quality.main(["--output-dir", str(tmp_path), *TINY, "--rhos", "0.35", "3.5",
                          "--variant", "edit=--dp-mode edit --local-sgd-warmup-iters 2"])
    with open(tmp_path / "time_to_quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rho"], r["method"]) for r in rows] == [("0.35", "ddp"), ("0.35", "edit"), ("3.5", "ddp"),
                                                      ("3.5", "edit")]
    for rho in ("0.35", "3.5"):
        ddp, edit = (r for r in rows if r["rho"] == rho)
        assert ddp["vs ddp wall-clock"] == "1.0" and ddp["time to ddp's loss, vs ddp"] == "1.0"
        assert ddp["x fewer bytes"] == "1.0" and float(edit["x fewer bytes"]) > 1
        assert 0 < float(edit["vs ddp wall-clock"]) < 1  # fewer bytes over the same link
        assert edit["warm-up share of bytes"].endswith("%") and edit["warm-up share of bytes"] != "0%"
    fast_link, slow_link = (float(r["vs ddp wall-clock"]) for r in rows if r["method"] == "edit")
    assert slow_link < fast_link  # ... and the slower the link (the larger rho), the more that counts
