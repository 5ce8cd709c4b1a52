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


@pytest.mark.slow
@pytest.mark.usefixtures("tool_jobs_from_fork_server")
def test_scaling_law_tool_end_to_end_on_two_tiny_sizes_and_two_budgets(tmp_path):
    scaling_law.main(["--output-dir", str(tmp_path), "--sizes", "2", "--methods", "ddp", "edit", "--budgets", "4", "6",
                      "--seq-length", "32", "--global-batch-size", "4", "--mock-data", "--eval-iters", "4"])
    table = (tmp_path / "fits.md").read_text()
    assert "| ddp | L(N) |" in table and "| edit | L(C) |" in table
    assert "L(N, D) = E + A N^-alpha + B D^-beta" in table
    assert "| N | tokens | edit loss | factor (fit) | 16th-84th percentile | factor (interpolated) |" in table
    assert "| geometric mean (finite) |" in table
    assert (tmp_path / "runs.csv").read_text().count("\n") == 9  # header, 2 sizes x 2 budgets x 2 methods
    assert (tmp_path / "scaling_laws.png").exists()


def test_loss_nd_fit_recovers_constants_and_the_compute_equivalence_factor():
    """On points of a known L(N, D), the fit returns its constants; an 'EDiT' that needs exactly twice DDP's tokens
    for each loss gets a factor of 1/2."""
    n, d = (np.array(v, dtype=np.float64).ravel() for v in np.meshgrid(np.geomspace(1e4, 1e6, 4),
                                                                         np.geomspace(1e5, 1e7, 3)))
    truth = np.array([2.0, 30.0, 0.3, 200.0, 0.35])
    theta, covariance = scaling_law.fit_loss_nd(n, d, scaling_law.loss_nd(n, d, *truth))
    assert theta == pytest.approx(truth, rel=1e-5)
    edit = [{"non-embedding params": ni, "tokens": di, "validation loss": scaling_law.loss_nd(ni, di / 2, *truth)}
            for ni, di in zip(n, d)]
    factors = scaling_law.compute_equivalence(truth, np.zeros((5, 5)), edit)
    assert [f["factor"] for f in factors] == pytest.approx([0.5] * len(edit), rel=1e-9)
    noisy = scaling_law.loss_nd(n, d, *truth) + 0.01 * np.sin(np.arange(len(n)))
    theta, covariance = scaling_law.fit_loss_nd(n, d, noisy)
    errors = np.sqrt(np.diag(covariance))
    assert np.all(errors > 0) and abs(theta[4] - truth[4]) < 3 * errors[4]


def test_interpolated_tokens_are_log_linear_between_the_bracketing_ddp_budgets():
    ddp = [{"non-embedding params": 10, "tokens": d, "validation loss": loss} for d, loss in [(100, 6.0), (200, 5.0)]]
    assert scaling_law.interpolated_tokens(10, 5.5, ddp) == pytest.approx(100 * 2 ** 0.5)
    assert np.isnan(scaling_law.interpolated_tokens(10, 4.0, ddp))  # beyond the largest budget: no extrapolation
