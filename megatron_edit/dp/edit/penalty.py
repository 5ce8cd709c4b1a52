"""EDiT's pseudo-gradient penalty as pure math: anomaly detection, softmax weights, clipping.

Per module and sync, each replica i has a pseudo-gradient norm G_i.
- Anomaly elimination: an EWMA of G (mean m <- m + a (x - m), variance v <- (1-a)(v + a d_old d_new) with
  d_old = x - m_before, d_new = x - m_after) gives z = (G - m) / s. After `warmup_syncs` observations, a norm
  with z > threshold, or a non-finite one, marks its replica an outlier for that module: its pseudo-gradient
  counts as zero. Choices of ours, so that no replica is locked out for good (see EwmaAnomalyDetector):
  the mean starts at the first norm (not 0); s = max(sqrt(v), 1e-2 m), so z stays finite at zero variance;
  a flagged norm enters the statistics winsorized, as x = m + threshold * s; after
  `max_consecutive` flags in a row the next finite norm is accepted. Non-finite norms are always outliers
  and leave the detector untouched.
- Weighted averaging: w_i = softmax(-G_i / T) over the healthy replicas (smaller norm, larger weight);
  without it, healthy replicas weigh equally. Outliers weigh 0.
- Clipping: the averaged pseudo-gradient d is scaled by min(1, c / ||d||).
"""
import dataclasses
import math
from typing import List, Optional

import torch


@dataclasses.dataclass(frozen=True)
class PenaltyConfig:
    anomaly_elimination: bool = False
    ewma_alpha: float = 0.02
    anomaly_warmup_syncs: int = 120
    anomaly_threshold: float = 3.0
    anomaly_max_consecutive: int = 3
    weighted_average: bool = False
    weight_temperature: float = 1.0
    pseudo_grad_clip: Optional[float] = None

    @classmethod
    def from_args(cls, args) -> "PenaltyConfig":
        return cls(anomaly_elimination=args.edit_anomaly_elimination, ewma_alpha=args.edit_anomaly_ewma_alpha,
                   anomaly_warmup_syncs=args.edit_anomaly_warmup_syncs, anomaly_threshold=args.edit_anomaly_threshold,
                   anomaly_max_consecutive=args.edit_anomaly_max_consecutive,
                   weighted_average=args.edit_weighted_average, weight_temperature=args.edit_weight_temperature,
                   pseudo_grad_clip=args.edit_pseudo_grad_clip)

    @property
    def needs_norms(self) -> bool:
        """Whether replicas must exchange their pseudo-gradient norms before averaging."""
        return self.anomaly_elimination or self.weighted_average


class EwmaAnomalyDetector:
    """One module's pseudo-gradient norm history on this replica.

    The plain EWMA z-test can exclude a replica for good: at zero variance z is infinite, and if outliers never
    enter the statistics, a lasting level shift of the norms (a new learning-rate phase, a new data mix) stays
    an outlier forever; when it hits every replica, no outer step is ever taken again. Three changes bound that:

    - Variance floor: z = (G - m) / s with s = max(sqrt(v), floor * m), floor = 1e-2. Relative to the mean, so
      the detector is scale-free (norms times c give the same flags). 1e-2 is far above the rounding jitter of
      a norm (~1e-6 in fp32) and means a norm within threshold x 1% of the mean is never an outlier, however
      quiet the history: discarding a replica's work for a few-percent larger step is never worth it (1e-3
      would drop it for 0.3%). An all-zero history (a frozen module) has no scale: there any positive norm
      scores 1/floor = 100, and only the cap below lets it in.
    - Winsorizing: a flagged norm updates the statistics as if it were m + threshold * s, the edge of the band.
      One spike moves the mean by at most a * threshold * s and cannot widen the band much; a lasting shift
      keeps pushing the band outward (s grows by a factor sqrt((1-a)(1 + a(1-a) threshold^2)), 7% per sync at
      the defaults) until the new level is inside it. The public EDiT code (atorch/local_sgd,
      OnlineDynamicEWMA) instead updates with every finite norm, outliers included, reports z = 0 at zero
      variance and widens the threshold by the spread of recent z-scores: it adapts too, but one huge spike
      inflates the variance for ~1/a syncs, letting the next anomalies through, and after constant norms
      nothing can be flagged. Winsorizing adapts with a bounded influence per observation.
    - A cap on consecutive exclusions: after `max_consecutive` flags in a row, the next finite norm is
      accepted and joins the statistics as is. A transient anomaly (a bad batch, a loss spike) spans one or
      two syncs of H local steps each; one that lasts longer is a new regime, and the cap bounds what a replica
      loses to a wrong verdict. The default 3 keeps 3H steps of protection against a spike while guaranteeing
      every replica's pseudo-gradient at least every 4th sync.

    Non-finite norms are outliers always (they would poison the average) and leave the detector untouched:
    no statistics update, no count toward the cap.
    """

    STD_FLOOR = 1e-2  # relative to the mean; see above

    def __init__(self, alpha: float, warmup: int, threshold: float, max_consecutive: int):
        self.alpha, self.warmup, self.threshold, self.max_consecutive = alpha, warmup, threshold, max_consecutive
        self.mean, self.variance, self.count, self.consecutive = 0.0, 0.0, 0, 0

    @classmethod
    def from_config(cls, penalty: PenaltyConfig) -> "EwmaAnomalyDetector":
        return cls(penalty.ewma_alpha, penalty.anomaly_warmup_syncs, penalty.anomaly_threshold,
                   penalty.anomaly_max_consecutive)

    @property
    def std(self) -> float:
        """The spread norms are judged by: the EWMA's, at least STD_FLOOR of the mean."""
        return max(math.sqrt(self.variance), self.STD_FLOOR * abs(self.mean))

    def z_score(self, norm: float) -> float:
        if self.std > 0.0:
            return (norm - self.mean) / self.std
        return 0.0 if norm <= self.mean else 1.0 / self.STD_FLOOR  # all-zero history: no scale to measure by

    def observe(self, norm: float) -> bool:
        """True when `norm` is an outlier. Finite norms update the statistics (flagged ones winsorized)."""
        if not math.isfinite(norm):
            return True
        flagged = self.count >= self.warmup and self.z_score(norm) > self.threshold
        if flagged and self.consecutive < self.max_consecutive:
            self.consecutive += 1
            self._update(self.mean + self.threshold * self.std)
            return True
        self.consecutive = 0
        self._update(norm)
        return False

    def _update(self, value: float) -> None:
        if self.count == 0:
            self.mean = value
        else:
            before = value - self.mean
            self.mean += self.alpha * before
            self.variance = (1 - self.alpha) * (self.variance + self.alpha * before * (value - self.mean))
        self.count += 1

    def state_dict(self) -> dict:
        return {"mean": self.mean, "variance": self.variance, "count": self.count, "consecutive": self.consecutive}

    def load_state_dict(self, state) -> None:
        self.mean, self.variance = state["mean"], state["variance"]
        self.count, self.consecutive = state["count"], state["consecutive"]


def replica_weights(norms: List[float], outliers: List[bool], weighted: bool, temperature: float) -> List[float]:
    """Averaging weights over the replicas; all zeros when every replica is an outlier."""
    healthy = [i for i, bad in enumerate(outliers) if not bad]
    weights = [0.0] * len(norms)
    if not healthy:
        return weights
    if weighted:
        scores = torch.tensor([-norms[i] / temperature for i in healthy], dtype=torch.float64)
        for i, w in zip(healthy, torch.softmax(scores, dim=0).tolist()):
            weights[i] = w
    else:
        for i in healthy:
            weights[i] = 1.0 / len(healthy)
    return weights


def clip_factor(norm: float, max_norm: Optional[float]) -> float:
    """Scale that brings a pseudo-gradient of `norm` to at most `max_norm`."""
    if max_norm is None or norm <= max_norm:
        return 1.0
    return max_norm / norm


def blend_step_shares(weights: List[float], steps: List[float], outliers: List[bool], step_weight: float) -> List[float]:
    """A-EDiT: (1 - b) w_i + b s_i / sum(s) with s_i the local steps of healthy replica i (outliers count 0 steps),
    so replicas that did more work weigh more. Unchanged when b is 0, every replica is an outlier, or none stepped."""
    healthy_steps = [0.0 if bad else s for s, bad in zip(steps, outliers)]
    total = sum(healthy_steps)
    if not step_weight or not any(weights) or total <= 0:
        return weights
    return [(1 - step_weight) * w + step_weight * s / total for w, s in zip(weights, healthy_steps)]
