"""The pseudo-gradient penalty (math and in training) and A-EDiT under a straggler."""
import math

import pytest
import torch

from megatron_edit.dp.edit.penalty import EwmaAnomalyDetector, clip_factor, replica_weights
from test_edit import edit, local_sgd, run


def test_detector_against_hand_computed_sequence():
    detector = EwmaAnomalyDetector(alpha=0.5, warmup=2, threshold=3.0, max_consecutive=3)
    flags = [detector.observe(norm) for norm in [1.0, 3.0, 2.0, 10.0, 2.5]]
    # mean 1 -> 2 (var 0.5) -> 2 (var 0.25); 10 has z = 8/0.5 = 16: flagged, and enters winsorized as 2 + 3 * 0.5:
    # mean 2.75, var 0.5 (0.25 + 0.5 * 1.5 * 0.75) = 0.40625; 2.5 has z < 0: mean 2.625, var 0.2109375
    assert flags == [False, False, False, True, False]
    assert (detector.mean, detector.variance, detector.count, detector.consecutive) == (2.625, 0.2109375, 5, 0)
    assert detector.observe(math.nan) and detector.observe(math.inf)


def detector(max_consecutive=3):
    return EwmaAnomalyDetector(alpha=0.02, warmup=120, threshold=3.0, max_consecutive=max_consecutive)


def noisy_norms(count, level=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (level * (1 + 0.05 * torch.randn(count, generator=generator, dtype=torch.float64))).tolist()


def test_constant_norms_are_never_flagged_and_z_stays_finite():
    for value in (1.0, 0.0):
        d = detector()
        assert not any(d.observe(value) for _ in range(300)) and d.variance == 0.0
        assert d.z_score(value) == 0.0
        assert math.isfinite(d.z_score(2.0)) and d.z_score(2.0) > d.threshold  # a doubling is still an outlier
    d = detector()
    for _ in range(300):
        d.observe(1.0)
    assert not d.observe(1.02)  # within threshold x 1% of a quiet history's mean


def test_single_spike_is_flagged_and_barely_moves_the_statistics():
    d = detector()
    for norm in noisy_norms(300):
        d.observe(norm)
    mean, std = d.mean, math.sqrt(d.variance)
    assert d.observe(1000.0)
    assert abs(d.mean - mean) < 0.1 * std  # winsorized: alpha x threshold x std = 0.06 std, whatever the spike
    assert math.sqrt(d.variance) < 1.1 * std
    assert not d.observe(mean)


@pytest.mark.parametrize("before", ["noisy", "constant"])
def test_lasting_level_shift_is_accepted_after_a_bounded_number_of_syncs(before):
    history = noisy_norms(300) if before == "noisy" else [1.0] * 300
    shifted = noisy_norms(300, level=2.0, seed=1)
    for max_consecutive, bound in [(3, 15), (10 ** 9, 60)]:  # winsorizing alone adapts too, more slowly
        d = detector(max_consecutive)
        for norm in history:
            d.observe(norm)
        flags = [d.observe(norm) for norm in shifted]
        assert any(flags[:3]) and not any(flags[bound:]), (max_consecutive, flags.index(True))
        assert d.mean == pytest.approx(2.0, rel=0.05)


def test_one_replica_is_excluded_at_most_max_consecutive_syncs_in_a_row():
    d = detector(max_consecutive=2)
    for norm in noisy_norms(300):
        d.observe(norm)
    flags = [d.observe(1e6) for _ in range(9)]
    assert flags == [True, True, False] * 3


def test_non_finite_norms_are_always_flagged_and_leave_the_detector_untouched():
    d = detector(max_consecutive=1)
    for norm in noisy_norms(300):
        d.observe(norm)
    assert d.observe(1e6)  # one exclusion: the cap is reached
    state = d.state_dict()
    assert all(d.observe(bad) for bad in [math.nan, math.inf, -math.inf, math.nan])
    assert d.state_dict() == state
    assert not d.observe(1e6)  # NaNs did not count toward the cap, nor reset it


def test_detector_state_round_trips():
    d = detector()
    for norm in noisy_norms(200) + [50.0, 50.0]:
        d.observe(norm)
    restored = detector()
    restored.load_state_dict(d.state_dict())
    assert restored.state_dict() == d.state_dict() and restored.consecutive == 2


def test_max_consecutive_must_be_at_least_one():
    from test_arguments import error_of

    assert "--edit-anomaly-max-consecutive must be >= 1" in \
        error_of(["--dp-mode", "edit", "--edit-anomaly-max-consecutive", "0"], world_size=2)


def test_weights_follow_the_softmax_of_minus_norms_over_healthy_replicas():
    norms, temperature = [1.0, 2.0, 4.0], 2.0
    expected = [math.exp(-n / temperature) for n in norms]
    assert replica_weights(norms, [False] * 3, True, temperature) == pytest.approx([e / sum(expected) for e in expected])
    healthy = expected[:2]
    assert replica_weights(norms, [False, False, True], True, temperature) == \
        pytest.approx([healthy[0] / sum(healthy), healthy[1] / sum(healthy), 0.0])
    assert replica_weights(norms, [False, True, False], False, temperature) == [0.5, 0.0, 0.5]
    assert replica_weights(norms, [True] * 3, True, temperature) == [0.0, 0.0, 0.0]


def test_clip_factor():
    assert clip_factor(4.0, 2.0) == 0.5 and clip_factor(1.0, 2.0) == 1.0 and clip_factor(9.0, None) == 1.0


# Three single-rank replicas, syncs at iterations 3, 5, 7, 9; the detector judges from the third sync on.
# Outer lr 1 without momentum makes the new anchor exactly the weighted average of the replicas' parameters.
PENALTY = ("--edit-anomaly-elimination", "--edit-anomaly-warmup-syncs", "2", "--edit-anomaly-ewma-alpha", "0.5",
           "--edit-anomaly-threshold", "6", "--outer-lr", "1.0", "--outer-momentum", "0", "--train-iters", "9",
           "--global-batch-size", "6")


def penalty_run(*extra):
    return run(*edit(1, 3, *local_sgd(0, 2), *PENALTY, *extra))


def sync_at(dump: dict, iteration: int) -> dict:
    """The first sync recorded at `iteration` (syncs at 3, 5, 7, 9, then the final one after iteration 9)."""
    return next(sync for sync in dump["syncs"] if sync["iteration"] == iteration)


@pytest.mark.slow
def test_scaled_replica_is_flagged_and_anchor_is_weighted_average_of_the_healthy():
    dumps = penalty_run("--inject-fault", "1:9:scale", "--edit-weighted-average", "--edit-weight-temperature", "0.1",
                        "--dump-param-history")
    last_sync = sync_at(dumps[0], 9)
    # With 2 warm-up syncs the detector may also flag a healthy replica on a tiny module (a norm history of two
    # points); the claims are about the faulty one, and the anchor is checked against the recorded weights.
    for record in last_sync["records"]:
        assert record["outliers"][1], record["name"]
        assert record["weights"][1] == 0.0 and sum(record["weights"]) == pytest.approx(1.0)
        assert record["weights"][0] != pytest.approx(0.5)  # weighted by norms, not equal
    before = [dump["param_history"][7] for dump in dumps]  # each replica's parameters after iteration 8
    for index, (unit, record) in enumerate(zip(dumps[0]["units"], last_sync["records"])):
        flat = [torch.cat([params[name].view(-1) for name in unit["params"]]) for params in before]
        expected = sum(w * f for w, f in zip(record["weights"], flat))
        torch.testing.assert_close(last_sync["anchors"][index][:unit["numel"]], expected, rtol=1e-5, atol=1e-6)
    healthy_weight = sum(r["weights"][0] + r["weights"][2] for r in last_sync["records"])
    assert healthy_weight == pytest.approx(len(last_sync["records"]))


@pytest.mark.slow
def test_nan_pseudo_gradient_never_reaches_a_parameter():
    dumps = penalty_run("--inject-fault", "2:9:nan")
    assert all(r["outliers"][2] and r["weights"][2] == 0.0 for r in sync_at(dumps[0], 9)["records"])
    for dump in dumps:
        assert all(torch.isfinite(p).all() for p in dump["params"].values())
        assert all(torch.isfinite(u["anchor"]).all() for u in dump["units"])


@pytest.mark.slow
def test_when_every_replica_is_an_outlier_the_anchor_stays_and_parameters_reset_to_it():
    dumps = penalty_run(*[arg for r in range(3) for arg in ("--inject-fault", f"{r}:9:scale")])
    assert all(r["reset_to_anchor"] for r in sync_at(dumps[0], 9)["records"])
    assert sync_at(dumps[0], 9)["anchor_checksum"] == sync_at(dumps[0], 7)["anchor_checksum"]


@pytest.mark.slow
def test_aedit_with_a_3x_straggler_syncs_together_without_waiting_for_step_counts():
    """On a simulated clock (0.25 s an iteration, 0.75 s on the straggler; a sync once 3 s have passed since the
    last one ended): the fast replica syncs every 13 iterations, the straggler every 5 (the first sync after 12 and
    4), both in the same syncs, until the fast one finishes (iteration 60) and ends everyone's training with the
    final sync."""
    nproc, args = edit(1, 2, *local_sgd(0, 1))
    args = ("--dp-mode", "aedit") + args[2:] + ("--aedit-sync-seconds", "3", "--simulate-straggler", "1:3",
                                               "--simulated-step-seconds", "0.25", "--train-iters", "60")
    fast, slow = run(nproc, args)
    assert [s["iteration"] for s in fast["syncs"]] == [13, 26, 39, 52, 60]
    assert [s["iteration"] for s in slow["syncs"]] == [5, 10, 15, 20, 24]
    for a, b in zip(fast["syncs"], slow["syncs"]):
        assert a["anchor_checksum"] == b["anchor_checksum"]  # the same parameters after every sync
    assert len(fast["losses"]) == 60 and len(slow["losses"]) == 24
    for name, value in fast["params"].items():  # the final sync leaves every replica with the same model
        assert torch.equal(value, slow["params"][name]), name


class ReferenceDetector:
    """The anomaly detector as penalty.py's docstring states it, written apart from the project's code."""

    def __init__(self, alpha, warmup, threshold, max_consecutive=3, floor=1e-2):
        self.alpha, self.warmup, self.threshold, self.max_consecutive, self.floor = \
            alpha, warmup, threshold, max_consecutive, floor
        self.mean = self.variance = 0.0
        self.count = self.consecutive = 0

    def observe(self, norm):
        spread = max(math.sqrt(self.variance), self.floor * self.mean)
        if self.count >= self.warmup and (norm - self.mean) / spread > self.threshold \
                and self.consecutive < self.max_consecutive:
            self.consecutive += 1
            self.add(self.mean + self.threshold * spread)
            return True
        self.consecutive = 0
        self.add(norm)
        return False

    def add(self, x):
        if self.count == 0:
            self.mean = x
        else:
            old_mean = self.mean
            self.mean = old_mean + self.alpha * (x - old_mean)
            self.variance = (1 - self.alpha) * (self.variance + self.alpha * (x - old_mean) * (x - self.mean))
        self.count += 1


@pytest.mark.slow
def test_penalty_in_training_matches_an_independent_reference():
    """Three replicas, W=1, H=2: syncs at iterations 4, 6, 8, 10 and the final one after 11; replica 1's
    pseudo-gradients are scaled x100 from iteration 8. From each replica's dumped parameters before every sync,
    recompute norms, outliers, softmax weights, clipping and the outer Nesterov step here, and compare anchors."""
    alpha, warmup, threshold, temperature, clip, lr, mu = 0.5, 2, 6.0, 0.05, 0.05, 0.7, 0.8
    dumps = run(*edit(1, 3, *local_sgd(1, 2), "--edit-anomaly-elimination", "--edit-anomaly-warmup-syncs", str(warmup),
                      "--edit-anomaly-ewma-alpha", str(alpha), "--edit-anomaly-threshold", str(threshold),
                      "--edit-weighted-average", "--edit-weight-temperature", str(temperature),
                      "--edit-pseudo-grad-clip", str(clip), "--outer-lr", str(lr), "--outer-momentum", str(mu),
                      "--inject-fault", "1:8:scale", "--train-iters", "11", "--global-batch-size", "6",
                      "--dump-param-history"))
    syncs = dumps[0]["syncs"]
    assert [s["iteration"] for s in syncs] == [4, 6, 8, 10, 11]
    units = dumps[0]["units"]

    def flat(params, unit):
        return torch.cat([params[name].double().view(-1) for name in unit["params"]])

    anchors = [flat(dumps[0]["param_history"][0], unit) for unit in units]  # after warm-up iteration 1
    momenta = [torch.zeros_like(a) for a in anchors]
    detectors = [[ReferenceDetector(alpha, warmup, threshold) for _ in dumps] for _ in units]
    flagged_any = clipped_any = False
    for sync in syncs:
        final = sync is syncs[-1]
        # parameters the sync reads: after iteration t - 1 (in the forward of t), or after the last one
        step = sync["iteration"] - (1 if final else 2)
        for u, unit in enumerate(units):
            deltas = [anchors[u] - flat(dump["param_history"][step], unit) for dump in dumps]
            if sync["iteration"] >= 8:
                deltas[1] = deltas[1] * 100
            norms = [d.norm().item() for d in deltas]
            outliers = [detectors[u][i].observe(n) for i, n in enumerate(norms)]
            record = sync["records"][u]
            assert record["outliers"] == outliers, (sync["iteration"], unit["name"])
            flagged_any |= any(outliers)
            healthy = [i for i, bad in enumerate(outliers) if not bad]
            if healthy:  # otherwise the anchor stays
                scores = torch.tensor([-norms[i] / temperature for i in healthy], dtype=torch.float64)
                weights = dict(zip(healthy, torch.softmax(scores, dim=0).tolist()))
                average = sum(weights[i] * deltas[i] for i in healthy)
                scale = min(1.0, clip / average.norm().item())
                clipped_any |= scale < 1.0
                average = average * scale
                momenta[u] = mu * momenta[u] + average
                anchors[u] = anchors[u] - lr * (average + mu * momenta[u])
            torch.testing.assert_close(sync["anchors"][u][:unit["numel"]].double(), anchors[u], rtol=1e-4, atol=1e-6,
                                       msg=f"{unit['name']} at sync {sync['iteration']}")
    assert flagged_any and clipped_any  # every part of the penalty was exercised
