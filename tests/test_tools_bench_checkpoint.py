"""tools/bench_checkpoint.py end to end at the smallest size: both formats saved and loaded, their bytes counted."""
import csv

import pytest

from tools import bench_checkpoint

pytestmark = pytest.mark.slow  # every test here starts processes


def test_torch_dist_writes_each_tensor_once_where_torch_writes_a_copy_per_rank(tmp_path):
    bench_checkpoint.main(["--nprocs", "2", "--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4",
                           "--vocab-size", "512", "--output-dir", str(tmp_path),
                           "--checkpoint-dir", str(tmp_path / "checkpoints")])
    with open(tmp_path / "checkpoint.csv") as f:
        rows = {(row["format"], row["optimizer"]): row for row in csv.DictReader(f)}
    assert sorted(rows) == [("torch", "distributed"), ("torch", "plain"), ("torch_dist", "distributed"),
                            ("torch_dist", "plain")]
    assert all(float(row["save s"]) > 0 and float(row["load s"]) > 0 for row in rows.values())
    # Two data-parallel ranks with a plain optimizer hold the same model and Adam state: torch saves both copies.
    assert float(rows[("torch_dist", "plain")]["MB on disk"]) < 0.6 * float(rows[("torch", "plain")]["MB on disk"])
    assert not list((tmp_path / "checkpoints").rglob("*.distcp"))  # each checkpoint is removed after its row
