"""Drift of the score stream: river's ADWIN on the batch mean score, and the alert rate against
the rate the threshold was calibrated for.

Both signals are updated once per batch (vectorised: the batch is summarised by numpy first), so
the hot path gains no per-record Python work. Drift is *persistent* when a signal has held for
``persist_s`` seconds; that is what triggers a retrain (see ``trainer``), not a single blip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from river.drift import ADWIN

from stream_l2ae.errors import ConfigError


@dataclass
class DriftStatus:
    score_drift: bool
    """ADWIN saw the mean score change in this batch."""
    alert_rate: float
    """Alert rate over the recent records (exponentially weighted)."""
    alert_rate_ratio: float
    """``alert_rate`` divided by the calibrated alert rate."""
    active: bool
    """A drift signal is on now."""
    persistent: bool
    """A drift signal has been on for at least ``persist_s``."""
    mean_score: float


class DriftMonitor:
    """Watches the score stream of one daemon.

    Parameters
    ----------
    calibrated_alert_rate
        The share of alerts the threshold was calibrated for.
    rate_factor
        The alert rate is drifting when above ``rate_factor`` times the calibrated rate.
    half_life_records
        Memory of the alert-rate estimate.
    persist_s
        How long a signal must hold to count as persistent.
    delta
        ADWIN's confidence parameter.

    Examples
    --------
    >>> import numpy as np
    >>> monitor = DriftMonitor(0.01, persist_s=0)
    >>> rng = np.random.default_rng(0)
    >>> for t in range(50):
    ...     status = monitor.update(rng.exponential(0.05, 512), threshold=0.3, now=float(t))
    >>> status.active
    False
    >>> for t in range(50, 100):
    ...     status = monitor.update(rng.exponential(0.5, 512), threshold=0.3, now=float(t))
    >>> status.active, status.persistent, round(status.alert_rate_ratio) > 3
    (True, True, True)
    """

    def __init__(
        self,
        calibrated_alert_rate: float,
        *,
        rate_factor: float = 3.0,
        half_life_records: float = 20_000.0,
        persist_s: float = 60.0,
        delta: float = 0.002,
    ) -> None:
        if not 0 < calibrated_alert_rate < 1:
            raise ConfigError(
                f"calibrated_alert_rate must be in (0, 1), got {calibrated_alert_rate!r}"
            )
        if rate_factor <= 1:
            raise ConfigError(f"rate_factor must be > 1, got {rate_factor!r}")
        self.calibrated_alert_rate = calibrated_alert_rate
        self.rate_factor = rate_factor
        self.half_life_records = half_life_records
        self.persist_s = persist_s
        self.adwin = ADWIN(delta=delta)
        self.alert_rate = calibrated_alert_rate
        self.recent_score_drift_at: float | None = None
        self.active_since: float | None = None
        self.n_score_drifts = 0

    def update(
        self, scores: np.ndarray, *, threshold: float, now: float | None = None
    ) -> DriftStatus:
        now = time.monotonic() if now is None else now
        scores = np.asarray(scores, dtype=np.float64)
        n = len(scores)
        mean_score = float(scores.mean()) if n else float("nan")
        score_drift = False
        if n:
            self.adwin.update(mean_score)
            score_drift = bool(self.adwin.drift_detected)
            weight = 1.0 - 0.5 ** (n / self.half_life_records)
            batch_rate = float((scores > threshold).mean())
            self.alert_rate += weight * (batch_rate - self.alert_rate)
        if score_drift:
            self.n_score_drifts += 1
            self.recent_score_drift_at = now
        ratio = self.alert_rate / self.calibrated_alert_rate
        recent_shift = (
            self.recent_score_drift_at is not None
            and now - self.recent_score_drift_at < max(self.persist_s, 1e-9)
        )
        active = ratio > self.rate_factor or recent_shift
        if active and self.active_since is None:
            self.active_since = now
        elif not active:
            self.active_since = None
        persistent = active and now - self.active_since >= self.persist_s
        return DriftStatus(score_drift, self.alert_rate, ratio, active, persistent, mean_score)
