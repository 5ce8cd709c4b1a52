"""tools/compare_methods.py end to end at the smallest size: every method trains, the table and plots appear."""
import csv

import pytest

from tools import compare_methods

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tool_jobs_from_fork_server")]  # every test starts processes


def test_compare_methods_writes_table_and_plots_for_every_method(tmp_path):
    compare_methods.main(["--output-dir", str(tmp_path), "--mock-data", "--num-layers", "2", "--hidden-size", "64",
                          "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
                          "--train-iters", "14", "--log-interval", "2", "--eval-iters", "1",
                          "--local-sgd-warmup-iters", "2", "--local-sgd-sync-interval", "4",
                          # one outer step for every method (each has its own defaults), so DiLoCo and EDiT compare
                          "--outer-lr", "0.7", "--outer-momentum", "0.8", "--",
                          "--outer-nesterov", "--sync-dtype", "fp32", "--local-sgd-lr-scale", "1"])
    with open(tmp_path / "results.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["ddp", "post-local-sgd", "diloco", "edit", "aedit"]
    for row in rows.values():
        assert float(row["tokens/s"]) > 0 and float(row["peak memory MiB"]) > 0
        assert float(row["validation loss"]) < 6.2  # below the 511-token vocabulary's uniform loss, 6.24
    sent = {method: float(row["MB to other replicas per rank"]) for method, row in rows.items()}
    assert all(0 < sent[m] < sent["ddp"] / 2 for m in ("post-local-sgd", "diloco", "edit", "aedit"))
    # DiLoCo and EDiT make the same updates: the same training loss at the last log line (iteration 14).
    assert abs(float(rows["diloco"]["final train loss"]) - float(rows["edit"]["final train loss"])) < 1e-3
    assert "| ddp |" in (tmp_path / "results.md").read_text()
    for plot in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


def test_compare_methods_reports_mean_and_spread_over_seeds(tmp_path):
    compare_methods.main(["--output-dir", str(tmp_path), "--mock-data", "--methods", "ddp", "diloco", "--seeds", "2",
                          "--num-layers", "1", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2",
                          "--global-batch-size", "4", "--train-iters", "8", "--log-interval", "4", "--eval-iters", "2",
                          "--local-sgd-warmup-iters", "2", "--local-sgd-sync-interval", "3"])
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in runs] == [("ddp", "1234"), ("ddp", "1235"),
                                                         ("diloco", "1234"), ("diloco", "1235")]
    with open(tmp_path / "results.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    for method, row in rows.items():
        losses = [float(r["validation loss"]) for r in runs if r["method"] == method]
        assert losses[0] != losses[1]  # the seed changes initialization and data order
        assert float(row["seeds"]) == 2
        assert float(row["validation loss"]) == pytest.approx(sum(losses) / 2, abs=1e-4)
        assert float(row["validation min"]) == pytest.approx(min(losses), abs=1e-4)
        assert float(row["validation std"]) > 0
    assert rows["ddp"]["vs ddp"] == "+0.00%" and rows["diloco"]["vs ddp"].endswith("%")
