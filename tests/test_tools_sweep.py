"""tools/sweep_local_sgd.py end to end at the smallest size: a grid against DDP, a table with the spread, resumable."""
import csv
import json

import pytest

from tools import sweep_local_sgd

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("tool_jobs_from_fork_server")]  # every test starts processes

TINY = ["--mock-data", "--num-layers", "1", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "8", "--log-interval", "4", "--eval-iters", "2",
        "--lr-warmup-iters", "1", "--warmup-iters", "2", "--sync-intervals", "3", "--ddp-lrs", "2e-3", "--lrs", "2e-3",
        "--outer-lrs", "0.7", "1.0"]


def test_sweep_runs_the_grid_against_ddp_and_does_not_repeat_finished_runs(tmp_path, capsys):
    sweep_local_sgd.main(["--output-dir", str(tmp_path), *TINY])
    with open(tmp_path / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], r["outer lr"]) for r in rows) == [("ddp", ""), ("edit", "0.7"), ("edit", "1.0")]
    assert {r["S"] for r in rows if r["method"] == "edit"} == {"2.0"}  # EDiT's recipe: M x the LR in local steps
    losses = [float(r["validation loss"]) for r in rows]
    assert losses == sorted(losses) and all(0 < loss < 6.3 for loss in losses)  # best first; 511-token vocabulary
    ddp = next(r for r in rows if r["method"] == "ddp")
    assert ddp["vs best ddp"] == "+0.00%" and all(r["vs ddp same lr"].endswith("%") for r in rows)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    assert ddp["x fewer bytes than ddp"] == "1.0"
    assert all(float(r["x fewer bytes than ddp"]) > 1 for r in rows if r["method"] == "edit")  # whole run
    assert (tmp_path / "sweep_front.png").stat().st_size > 0
    capsys.readouterr()

    sweep_local_sgd.main(["--output-dir", str(tmp_path), *TINY])  # everything is already there
    assert "running" not in capsys.readouterr().out
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    first = json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[0])  # DDP ran first
    assert first["validation loss"] == pytest.approx(float(ddp["validation loss"]), abs=1e-4)

    # A later invocation without DDP runs is still measured against the DDP runs already there.
    sweep_local_sgd.main(["--output-dir", str(tmp_path), "--table-name", "edit_only", *TINY, "--ddp-lrs"])
    with open(tmp_path / "edit_only.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["edit", "edit"]
    assert all(r["vs best ddp"].endswith("%") and r["vs ddp same lr"] == r["vs best ddp"] for r in rows)

    # Every configuration run so far in one table, whatever grid asked for it; seeds it lacks do not run.
    sweep_local_sgd.main(["--output-dir", str(tmp_path), "--table-name", "all", *TINY, "--ddp-lrs", "--outer-lrs",
                          "0.7", "--all-runs", "--seeds", "2"])
    with open(tmp_path / "all.csv") as f:
        assert sorted(r["method"] for r in csv.DictReader(f)) == ["ddp", "edit", "edit"]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
