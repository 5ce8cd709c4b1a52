"""tools/scaling_law.py's fit recovers known constants, and the tool runs end to end at the smallest sizes."""
import numpy as np
import pytest

from tools import scaling_law


def test_power_law_fit_recovers_constants_and_reports_their_uncertainty():
    n = np.geomspace(1e4, 1e7, 6)
    exact = scaling_law.power_law(n, 40.0, 0.3, 2.5)
    values, errors = scaling_law.fit_power_law(n, exact)
    assert values == pytest.approx([40.0, 0.3, 2.5], rel=1e-6)
    noisy = exact + np.array([0.01, -0.02, 0.015, -0.01, 0.02, -0.015])
    values, errors = scaling_law.fit_power_law(n, noisy)
    assert abs(values[1] - 0.3) < 3 * errors[1] and 0 < errors[1] < 0.3
    assert abs(values[2] - 2.5) < 3 * errors[2]


def test_scaling_law_tool_end_to_end_on_three_tiny_sizes(tmp_path):
    scaling_law.main(["--output-dir", str(tmp_path), "--sizes", "3", "--methods", "ddp", "--train-iters", "6",
                      "--seq-length", "32", "--global-batch-size", "4", "--mock-data"])
    table = (tmp_path / "fits.md").read_text()
    assert "| ddp | L(N) |" in table and "| ddp | L(C) |" in table
    assert (tmp_path / "runs.csv").read_text().count("\n") == 4
    assert (tmp_path / "scaling_laws.png").exists()
