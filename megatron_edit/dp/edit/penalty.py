"""EDiT's pseudo-gradient penalty as pure math: anomaly detection, softmax weights, clipping.

Per module and sync, each replica i has a pseudo-gradient norm G_i.
- Anomaly elimination: an EWMA of G (mean m <- m + a (G - m), variance v <- (1-a)(v + a d_old d_new) with
  d_old = G - m_before, d_new = G - m_after) gives z = (G - m) / sqrt(v). After `warmup_syncs` observations, a
  norm with z > threshold, or a non-finite one, marks its replica an outlier for that module: its pseudo-gradient
  counts as zero. Choices of ours: the mean starts at the first norm (not 0), and outliers do not update the
  statistics, so one spike does not widen the band it is judged by.
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
    weighted_average: bool = False
    weight_temperature: float = 1.0
    pseudo_grad_clip: Optional[float] = None

    @classmethod
    def from_args(cls, args) -> "PenaltyConfig":
        return cls(args.edit_anomaly_elimination, args.edit_anomaly_ewma_alpha, args.edit_anomaly_warmup_syncs,
                   args.edit_anomaly_threshold, args.edit_weighted_average, args.edit_weight_temperature,
                   args.edit_pseudo_grad_clip)

    @property
    def needs_norms(self) -> bool:
        """Whether replicas must exchange their pseudo-gradient norms before averaging."""
        return self.anomaly_elimination or self.weighted_average


class EwmaAnomalyDetector:
    """One module's pseudo-gradient norm history on this replica."""

    def __init__(self, alpha: float, warmup: int, threshold: float):
        self.alpha, self.warmup, self.threshold = alpha, warmup, threshold
        self.mean, self.variance, self.count = 0.0, 0.0, 0

    def z_score(self, norm: float) -> float:
        if self.variance <= 0.0:
            return 0.0 if norm == self.mean else math.inf
        return (norm - self.mean) / math.sqrt(self.variance)

    def observe(self, norm: float) -> bool:
        """True when `norm` is an outlier; otherwise it joins the statistics."""
        if not math.isfinite(norm):
            return True
        if self.count >= self.warmup and self.z_score(norm) > self.threshold:
            return True
        if self.count == 0:
            self.mean = norm
        else:
            before = norm - self.mean
            self.mean += self.alpha * before
            self.variance = (1 - self.alpha) * (self.variance + self.alpha * before * (norm - self.mean))
        self.count += 1
        return False


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
