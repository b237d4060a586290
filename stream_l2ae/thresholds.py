"""Alert thresholds on anomaly scores, static or kept up to date on a stream.

Scores are ``1 - cosine similarity`` in ``[0, 2]``; higher is more anomalous and normal records
score near 0. Every threshold follows the same small protocol (:class:`Threshold`): ``value`` is the
current threshold, ``is_anomaly(scores)`` flags ``scores > value``, ``update(scores)`` feeds a batch
and returns the threshold to use for the *next* batch, and ``to_dict()`` /
:func:`threshold_from_dict` round-trip the full state through JSON-safe dicts.

A scoring loop therefore looks like::

    flags = threshold.is_anomaly(batch_scores)  # decide with the current threshold
    threshold.update(batch_scores)              # then learn from the batch

Three kinds are provided:

* :class:`QuantileThreshold`: a fixed quantile of calibration scores.
* :class:`StreamingQuantileThreshold`: a tail quantile tracked with exponential forgetting.
* :class:`SPOTThreshold`: peaks-over-threshold with a Generalized Pareto tail (Siffer et al., 2017).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize, minimize_scalar

from stream_l2ae.errors import ConfigError, NotFittedError

__all__ = [
    "MAX_SCORE",
    "QuantileThreshold",
    "SPOTThreshold",
    "StreamingQuantileThreshold",
    "Threshold",
    "threshold_from_dict",
]

MAX_SCORE = 2.0
"""Largest possible anomaly score (``1 - cos`` of opposite unit vectors)."""


class Threshold(ABC):
    """Common interface of every alert threshold.

    Subclasses set ``kind`` (the ``"kind"`` key of :meth:`to_dict`) and implement ``value``,
    ``update`` and the private parameter/state (de)serialisation hooks.
    """

    kind: ClassVar[str]

    @property
    @abstractmethod
    def value(self) -> float:
        """Current threshold; scores strictly above it are anomalies.

        Raises
        ------
        NotFittedError
            If the threshold has not seen any scores yet.
        """

    @property
    def is_fitted(self) -> bool:
        """Whether :attr:`value` is available."""
        try:
            self.value  # noqa: B018 - the property raises when not fitted
        except NotFittedError:
            return False
        return True

    @abstractmethod
    def update(self, scores: ArrayLike) -> float:
        """Feed a batch of scores and return the threshold to use for the next batch."""

    def is_anomaly(self, scores: ArrayLike) -> np.ndarray:
        """Boolean mask, same shape as ``scores``, of the scores strictly above :attr:`value`."""
        return np.asarray(scores, dtype=np.float64) > self.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the ``kind``, the constructor parameters and the fitted ``state``.

        ``state`` is ``None`` before fitting. :func:`threshold_from_dict` rebuilds the object.
        """
        return {"kind": self.kind, **self._params(), "state": self._state()}

    @abstractmethod
    def _params(self) -> dict[str, Any]:
        """Constructor keyword arguments, JSON-safe."""

    @abstractmethod
    def _state(self) -> dict[str, Any] | None:
        """Fitted state, JSON-safe, or ``None`` before fitting."""

    @abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_state` returned."""

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={value!r}" for name, value in self._params().items())
        return f"{type(self).__name__}({params})"


class QuantileThreshold(Threshold):
    """Static threshold: the ``1 - alert_rate`` quantile of calibration scores.

    Parameters
    ----------
    alert_rate
        Fraction of calibration scores left above the threshold, in ``(0, 1)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> threshold = QuantileThreshold(alert_rate=0.01).fit(rng.exponential(0.01, size=100_000))
    >>> round(threshold.value, 4)  # the exact 0.99 quantile of Exp(0.01) is 0.0461
    0.0457
    >>> held_out = rng.exponential(0.01, size=100_000)
    >>> round(float(threshold.is_anomaly(held_out).mean()), 3)  # close to alert_rate
    0.011
    >>> threshold.update(held_out) == threshold.value  # static: updates change nothing
    True
    """

    kind = "quantile"

    def __init__(self, alert_rate: float = 0.01) -> None:
        self.alert_rate = _check_open_unit_interval("alert_rate", alert_rate)
        self._value: float | None = None

    def fit(self, scores: ArrayLike) -> QuantileThreshold:
        """Set the threshold to the ``1 - alert_rate`` quantile of ``scores``."""
        array = _as_nonempty_scores(scores, "fit")
        self._value = float(np.quantile(array, 1.0 - self.alert_rate))
        return self

    @property
    def value(self) -> float:
        if self._value is None:
            raise NotFittedError("QuantileThreshold is not fitted; call fit(scores) first")
        return self._value

    def update(self, scores: ArrayLike) -> float:
        """Validate the batch and return the unchanged threshold."""
        _as_scores(scores)
        return self.value

    def _params(self) -> dict[str, Any]:
        return {"alert_rate": self.alert_rate}

    def _state(self) -> dict[str, Any] | None:
        return None if self._value is None else {"value": self._value}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._value = _finite_float("state.value", state["value"])


class StreamingQuantileThreshold(Threshold):
    """Tail quantile of the score stream with exponential forgetting.

    Scores go into a fixed histogram over ``[0, MAX_SCORE]`` whose bins are log-spaced from
    ``min_score`` (most scores are tiny, so resolution is relative: about 0.35 % per bin with the
    defaults); everything below ``min_score`` shares the first bin. Before each batch is added the
    counts decay by ``0.5 ** (batch_size / half_life)``, so a record's weight halves every
    ``half_life`` records. The threshold is the ``1 - alert_rate`` quantile of the weighted
    histogram, interpolated linearly within its bin. Scores outside ``[0, MAX_SCORE]`` are clipped.

    Parameters
    ----------
    alert_rate
        Target fraction of recent scores above the threshold, in ``(0, 1)``.
    half_life
        Number of records after which a record's weight has halved (positive, finite).
    n_bins
        Number of histogram bins (at least 16).
    min_score
        Smallest positive bin edge, in ``(0, MAX_SCORE)``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> threshold = StreamingQuantileThreshold(alert_rate=0.01, half_life=50_000)
    >>> for _ in range(20):
    ...     next_value = threshold.update(rng.exponential(0.01, size=10_000))
    >>> round(next_value, 3)  # the exact 0.99 quantile of Exp(0.01) is 0.046
    0.046
    >>> for _ in range(40):  # the scores drift up; a few half-lives later the threshold follows
    ...     next_value = threshold.update(rng.exponential(0.02, size=10_000))
    >>> round(next_value, 3)
    0.092
    """

    kind = "streaming_quantile"

    def __init__(
        self,
        alert_rate: float = 0.01,
        half_life: float = 100_000,
        n_bins: int = 4096,
        min_score: float = 1e-6,
    ) -> None:
        self.alert_rate = _check_open_unit_interval("alert_rate", alert_rate)
        if not _is_real(half_life) or not (0 < half_life < math.inf):
            raise ConfigError(f"half_life must be a positive finite number, got {half_life!r}")
        self.half_life = float(half_life)
        if not _is_integer(n_bins) or n_bins < 16:
            raise ConfigError(f"n_bins must be an integer >= 16, got {n_bins!r}")
        self.n_bins = int(n_bins)
        if not _is_real(min_score) or not (0 < min_score < MAX_SCORE):
            raise ConfigError(f"min_score must be in (0, {MAX_SCORE}), got {min_score!r}")
        self.min_score = float(min_score)
        # n_bins bins: [0, min_score], then log-spaced up to MAX_SCORE.
        self._edges = np.concatenate(([0.0], np.geomspace(self.min_score, MAX_SCORE, self.n_bins)))
        self._weights = np.zeros(self.n_bins)
        self._value: float | None = None

    @property
    def total_weight(self) -> float:
        """Sum of the decayed weights; about ``half_life / ln 2`` on a long stream."""
        return float(self._weights.sum())

    @property
    def value(self) -> float:
        if self._value is None:
            raise NotFittedError(
                "StreamingQuantileThreshold has seen no scores; call fit(scores) or update(scores)"
            )
        return self._value

    def fit(self, scores: ArrayLike) -> StreamingQuantileThreshold:
        """Reset the histogram to the calibration ``scores`` (warm start).

        The calibration scores get a total weight of at most ``half_life / ln 2`` (the weight of
        a long stationary stream), so a large calibration set does not outweigh live data for
        longer than a long stream would.
        """
        array = _as_nonempty_scores(scores, "fit")
        steady_state_weight = self.half_life / math.log(2.0)
        record_weight = min(1.0, steady_state_weight / array.size)
        self._weights = record_weight * self._bin_counts(array)
        self._value = self._weighted_quantile()
        return self

    def update(self, scores: ArrayLike) -> float:
        """Decay the histogram, add the batch and return the new threshold."""
        array = _as_scores(scores)
        if array.size:
            self._weights *= 0.5 ** (array.size / self.half_life)
            self._weights += self._bin_counts(array)
            self._value = self._weighted_quantile()
        return self.value

    def _bin_counts(self, array: np.ndarray) -> np.ndarray:
        bins = np.searchsorted(self._edges, array, side="right") - 1
        np.clip(bins, 0, self.n_bins - 1, out=bins)
        return np.bincount(bins, minlength=self.n_bins).astype(np.float64)

    def _weighted_quantile(self) -> float:
        cumulative = np.cumsum(self._weights)
        target = (1.0 - self.alert_rate) * cumulative[-1]
        index = min(int(np.searchsorted(cumulative, target, side="left")), self.n_bins - 1)
        below = cumulative[index - 1] if index > 0 else 0.0
        bin_weight = self._weights[index]
        fraction = (target - below) / bin_weight if bin_weight > 0 else 1.0
        fraction = min(max(fraction, 0.0), 1.0)
        low, high = self._edges[index], self._edges[index + 1]
        return float(low + fraction * (high - low))

    def _params(self) -> dict[str, Any]:
        return {
            "alert_rate": self.alert_rate,
            "half_life": self.half_life,
            "n_bins": self.n_bins,
            "min_score": self.min_score,
        }

    def _state(self) -> dict[str, Any] | None:
        if self._value is None:
            return None
        occupied = np.flatnonzero(self._weights)  # sparse: most bins are empty
        return {"bins": occupied.tolist(), "weights": self._weights[occupied].tolist()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        bins = np.asarray(state["bins"], dtype=np.int64)
        weights = np.asarray(state["weights"], dtype=np.float64)
        if bins.shape != weights.shape or bins.ndim != 1 or bins.size == 0:
            raise ValueError("bins and weights must be non-empty lists of the same length")
        if bins.min() < 0 or bins.max() >= self.n_bins:
            raise ValueError(f"bin index out of range [0, {self.n_bins})")
        if not np.all(np.isfinite(weights) & (weights >= 0)) or weights.sum() <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        self._weights = np.zeros(self.n_bins)
        self._weights[bins] = weights
        self._value = self._weighted_quantile()


class SPOTThreshold(Threshold):
    """Streaming peaks-over-threshold (SPOT) with a Generalized Pareto tail.

    Follows Siffer et al., "Anomaly Detection in Streams with Extreme Value Theory" (KDD 2017),
    processing a batch at a time. :meth:`fit` sets the initial threshold ``t`` to the
    ``init_quantile`` quantile of calibration scores and fits a Generalized Pareto distribution
    (shape ``gamma``, scale ``sigma``) to the excesses over ``t`` (the *peaks*) by maximum
    likelihood, using Grimshaw's reduction to a one-dimensional search. The alert threshold is
    the score exceeded with probability ``risk``::

        z = t + sigma / gamma * ((risk * n / n_peaks) ** -gamma - 1)     (gamma -> 0: exponential)

    where ``n`` counts the non-anomalous scores seen. :meth:`update` flags scores above ``z``
    as anomalies and leaves them out of the model; the other scores above ``t`` become new peaks.
    The GPD is refitted once per batch that brings new peaks.

    Unlike the paper, the refit accounts for leaving the anomalies out: a peak that arrived while
    the alert threshold was ``z`` is known to be at most ``z``, so its likelihood is that of a GPD
    truncated at ``z - t``. Without this correction the top of the peak distribution goes
    missing, the fitted tail gets lighter, ``z`` drops, and more of the tail goes missing: on
    stationary exponential scores the alert rate drifts to several times ``risk``.

    Only the ``max_peaks`` most recent peaks are kept; when older ones are dropped ``n`` is scaled
    by the same factor, so the exceedance rate ``n_peaks / n`` is preserved and both the tail
    shape and the rate slowly follow the stream.

    Degenerate data never produce NaN: with no peaks (e.g. all scores equal), or when ``t`` is
    exceeded less often than ``risk``, the threshold is ``t`` itself, and if the GPD quantile is
    not finite it falls back to the empirical quantile of the kept peaks. ``t`` stays fixed after
    :meth:`fit`, so once the threshold is ``t`` no new peak can be learnt until :meth:`fit` is
    called again on more varied scores.

    Parameters
    ----------
    risk
        Target probability that a normal score exceeds the threshold, in ``(0, 1)`` and below
        ``1 - init_quantile``.
    init_quantile
        Quantile of the calibration scores used as the initial threshold ``t``, in ``(0, 1)``.
    max_peaks
        Most peaks kept in memory (integer >= 2). A refit costs ``O(max_peaks)``: about 25 ms
        for 5000 peaks.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> spot = SPOTThreshold(risk=1e-3).fit(rng.exponential(0.05, size=20_000))
    >>> round(spot.value, 3)  # the exact 1 - 1e-3 quantile of Exp(0.05) is 0.345
    0.344
    >>> batch = np.concatenate([rng.exponential(0.05, size=5_000), [1.5, 1.8]])
    >>> int(spot.is_anomaly(batch).sum())  # the two injected outliers and two natural ones
    4
    >>> round(spot.update(batch), 3)
    0.342
    >>> spot.n_observed  # the 4 scores above the threshold were left out of the model
    24998.0
    """

    kind = "spot"

    def __init__(
        self, risk: float = 1e-4, init_quantile: float = 0.98, max_peaks: int = 5000
    ) -> None:
        self.risk = _check_open_unit_interval("risk", risk)
        self.init_quantile = _check_open_unit_interval("init_quantile", init_quantile)
        if self.risk >= 1.0 - self.init_quantile:
            raise ConfigError(
                f"risk={risk!r} must be below 1 - init_quantile = {1.0 - self.init_quantile:g}"
                f" (init_quantile={init_quantile!r})"
            )
        if not _is_integer(max_peaks) or max_peaks < 2:
            raise ConfigError(f"max_peaks must be an integer >= 2, got {max_peaks!r}")
        self.max_peaks = int(max_peaks)
        self._initial_threshold: float | None = None
        self._n_observed = 0.0
        self._excesses = np.empty(0)
        # Upper limit of each excess when it was added: z - t, or inf for calibration peaks.
        self._excess_limits = np.empty(0)
        self._gamma: float | None = None
        self._sigma: float | None = None
        self._value: float | None = None

    @property
    def value(self) -> float:
        if self._value is None:
            raise NotFittedError("SPOTThreshold is not fitted; call fit(scores) first")
        return self._value

    @property
    def initial_threshold(self) -> float:
        """The peaks threshold ``t``."""
        self.value  # noqa: B018 - raises NotFittedError
        assert self._initial_threshold is not None
        return self._initial_threshold

    @property
    def n_observed(self) -> float:
        """Number ``n`` of non-anomalous scores seen (scaled down when peaks are dropped)."""
        return self._n_observed

    @property
    def n_peaks(self) -> int:
        """Number of peaks kept."""
        return int(self._excesses.size)

    @property
    def gpd_params(self) -> tuple[float, float] | None:
        """Fitted ``(gamma, sigma)`` of the tail, or ``None`` when there are no peaks."""
        if self._gamma is None or self._sigma is None:
            return None
        return self._gamma, self._sigma

    def fit(self, scores: ArrayLike) -> SPOTThreshold:
        """Calibrate on ``scores``: initial threshold, peaks, GPD fit and alert threshold."""
        array = _as_nonempty_scores(scores, "fit")
        initial_threshold = float(np.quantile(array, self.init_quantile))
        self._initial_threshold = initial_threshold
        self._n_observed = float(array.size)
        self._excesses = array[array > initial_threshold] - initial_threshold
        self._excess_limits = np.full(self._excesses.size, math.inf)
        self._drop_old_peaks()
        self._refit_tail()
        return self

    def update(self, scores: ArrayLike) -> float:
        """Learn from the non-anomalous scores of a batch and return the new alert threshold."""
        array = _as_scores(scores)
        initial_threshold = self.initial_threshold
        normal = array <= self.value
        new_excesses = array[normal & (array > initial_threshold)] - initial_threshold
        self._n_observed += float(np.count_nonzero(normal))
        if new_excesses.size:
            limit = self.value - initial_threshold
            self._excesses = np.concatenate((self._excesses, new_excesses))
            self._excess_limits = np.concatenate(
                (self._excess_limits, np.full(new_excesses.size, limit))
            )
            self._drop_old_peaks()
            self._refit_tail()
        else:
            self._value = self._alert_threshold()
        return self._value

    def _drop_old_peaks(self) -> None:
        if self._excesses.size > self.max_peaks:
            self._n_observed *= self.max_peaks / self._excesses.size
            self._excesses = self._excesses[-self.max_peaks :]
            self._excess_limits = self._excess_limits[-self.max_peaks :]

    def _refit_tail(self) -> None:
        if self._excesses.size:
            self._gamma, self._sigma = _fit_generalized_pareto(self._excesses, self._excess_limits)
        else:
            self._gamma = self._sigma = None
        self._value = self._alert_threshold()

    def _alert_threshold(self) -> float:
        assert self._initial_threshold is not None
        initial_threshold = self._initial_threshold
        n_peaks = self._excesses.size
        if n_peaks == 0 or self._gamma is None or self._sigma is None:
            return initial_threshold
        # Probability, given a peak, of exceeding the alert threshold.
        tail_ratio = self.risk * self._n_observed / n_peaks
        if tail_ratio >= 1.0:  # t itself is already exceeded less often than `risk`
            return initial_threshold
        log_ratio = math.log(tail_ratio)
        gamma, sigma = self._gamma, self._sigma
        with np.errstate(over="ignore"):
            if abs(gamma) < 1e-12:
                excess = -sigma * log_ratio
            else:
                excess = sigma * float(np.expm1(-gamma * log_ratio)) / gamma
        if not math.isfinite(excess):
            excess = float(np.quantile(self._excesses, 1.0 - tail_ratio))
        return initial_threshold + max(excess, 0.0)

    def _params(self) -> dict[str, Any]:
        return {"risk": self.risk, "init_quantile": self.init_quantile, "max_peaks": self.max_peaks}

    def _state(self) -> dict[str, Any] | None:
        if self._value is None:
            return None
        return {
            "initial_threshold": self._initial_threshold,
            "n_observed": self._n_observed,
            "excesses": self._excesses.tolist(),
            "excess_limits": [
                None if math.isinf(limit) else limit for limit in self._excess_limits.tolist()
            ],
            "gamma": self._gamma,
            "sigma": self._sigma,
            "value": self._value,
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        excesses = np.asarray(state["excesses"], dtype=np.float64).reshape(-1)
        if excesses.size > self.max_peaks or not np.all(np.isfinite(excesses) & (excesses > 0)):
            raise ValueError(f"excesses must be at most {self.max_peaks} positive finite numbers")
        limits = np.array(
            [math.inf if limit is None else limit for limit in state["excess_limits"]],
            dtype=np.float64,
        )
        if limits.shape != excesses.shape or np.any(np.isnan(limits) | (limits < excesses)):
            raise ValueError("excess_limits must match excesses, each limit >= its excess")
        gamma, sigma = state["gamma"], state["sigma"]
        if (gamma is None) != (sigma is None) or (gamma is None) != (excesses.size == 0):
            raise ValueError("gamma and sigma must be set exactly when there are excesses")
        self._initial_threshold = _finite_float(
            "state.initial_threshold", state["initial_threshold"]
        )
        self._n_observed = _finite_float("state.n_observed", state["n_observed"])
        self._excesses = excesses
        self._excess_limits = limits
        self._gamma = None if gamma is None else _finite_float("state.gamma", gamma)
        self._sigma = None if sigma is None else _finite_float("state.sigma", sigma)
        self._value = _finite_float("state.value", state["value"])


_THRESHOLD_KINDS: dict[str, type[Threshold]] = {
    cls.kind: cls for cls in (QuantileThreshold, StreamingQuantileThreshold, SPOTThreshold)
}


def threshold_from_dict(data: Mapping[str, Any]) -> Threshold:
    """Rebuild a threshold from :meth:`Threshold.to_dict` output.

    The ``state`` key may be missing or ``None``, so a config such as
    ``{"kind": "spot", "risk": 1e-4}`` builds an unfitted threshold.

    Raises
    ------
    ConfigError
        If the kind is unknown, a parameter is invalid or the state is malformed.

    Examples
    --------
    >>> import json
    >>> threshold = QuantileThreshold(alert_rate=0.05).fit([0.0, 0.1, 0.2, 0.3, 0.4])
    >>> threshold.to_dict()
    {'kind': 'quantile', 'alert_rate': 0.05, 'state': {'value': 0.38}}
    >>> threshold_from_dict(json.loads(json.dumps(threshold.to_dict()))).value
    0.38
    >>> threshold_from_dict({"kind": "spot", "risk": 1e-3})
    SPOTThreshold(risk=0.001, init_quantile=0.98, max_peaks=5000)
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"threshold config must be a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    cls = _THRESHOLD_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(
            f"unknown threshold kind {kind!r}; expected one of {sorted(_THRESHOLD_KINDS)}"
        )
    params = {key: value for key, value in data.items() if key not in ("kind", "state")}
    try:
        threshold = cls(**params)
    except TypeError as exc:
        raise ConfigError(f"invalid parameters for threshold kind {kind!r}: {exc}") from exc
    state = data.get("state")
    if state is not None:
        try:
            threshold._load_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid state for threshold kind {kind!r}: {exc!r}") from exc
    return threshold


def _fit_generalized_pareto(
    excesses: np.ndarray, limits: np.ndarray | None = None
) -> tuple[float, float]:
    """Maximum-likelihood ``(gamma, sigma)`` of a GPD (location 0), optionally truncated.

    ``limits[i]`` is the largest value ``excesses[i]`` could have taken (``inf``: untruncated).
    Without finite limits this is Grimshaw's method (:func:`_fit_gpd_grimshaw`); otherwise that
    fit is the starting point of a Nelder-Mead search on the truncated likelihood over
    ``(gamma, log sigma)``, kept only if it improves the likelihood with ``gamma > -1``.
    """
    start = _fit_gpd_grimshaw(excesses)
    if limits is None or start[0] <= -1.0:
        return start
    y = np.asarray(excesses, dtype=np.float64)
    finite_limits = np.asarray(limits, dtype=np.float64)
    finite_limits = finite_limits[np.isfinite(finite_limits)]
    if finite_limits.size == 0 or y.size < 3:
        return start
    limit_values, limit_counts = np.unique(finite_limits, return_counts=True)

    def negative_log_likelihood(params: np.ndarray) -> float:
        return -_gpd_truncated_log_likelihood(params[0], params[1], y, limit_values, limit_counts)

    start_params = np.array([start[0], math.log(start[1])])
    start_value = negative_log_likelihood(start_params)
    result = minimize(
        negative_log_likelihood,
        start_params,
        method="Nelder-Mead",
        options={
            "initial_simplex": start_params + np.array([[0.0, 0.0], [0.05, 0.0], [0.0, 0.1]]),
            "xatol": 1e-7,
            "fatol": 1e-9,
            "maxiter": 500,
        },
    )
    gamma, log_sigma = (float(value) for value in result.x)
    if not (np.isfinite(result.fun) and result.fun < start_value and gamma > -1.0):
        return start
    return gamma, math.exp(log_sigma)


def _gpd_truncated_log_likelihood(
    gamma: float,
    log_sigma: float,
    excesses: np.ndarray,
    limit_values: np.ndarray,
    limit_counts: np.ndarray,
) -> float:
    """Log-likelihood of GPD ``excesses``, ``limit_counts[j]`` of them truncated at a limit.

    Every excess contributes ``log f(y)``; each one truncated at ``limit_values[j]`` also
    contributes ``-log F(limit_values[j])``, summed per distinct limit.
    """
    if not gamma > -1.0 or not math.isfinite(log_sigma):
        return -math.inf
    sigma = math.exp(log_sigma)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if abs(gamma) < 1e-8:
            log_density = -excesses.size * log_sigma - excesses.sum() / sigma
            log_survival_at_limit = -limit_values / sigma
        else:
            scaled = gamma / sigma * excesses
            if scaled.min() <= -1.0:  # an excess beyond the support's upper end
                return -math.inf
            log_density = -excesses.size * log_sigma - (1.0 + 1.0 / gamma) * np.log1p(scaled).sum()
            scaled_limits = gamma / sigma * limit_values
            log_survival_at_limit = np.where(
                scaled_limits > -1.0, -np.log1p(scaled_limits) / gamma, -np.inf
            )
        log_cdf_at_limit = np.log(-np.expm1(log_survival_at_limit))
    result = float(log_density - np.dot(limit_counts, log_cdf_at_limit))
    return result if math.isfinite(result) else -math.inf


def _fit_gpd_grimshaw(excesses: np.ndarray) -> tuple[float, float]:
    """Maximum-likelihood ``(gamma, sigma)`` of a Generalized Pareto distribution (location 0).

    Grimshaw (1993) reduces the likelihood to one variable ``x = gamma / sigma``: for fixed ``x``
    the optimum is ``gamma(x) = mean(log(1 + x * y))`` and ``sigma = gamma / x``, giving the profile
    log-likelihood ``-m * (log(sigma) + 1 + gamma)``. Its stationary points lie in
    ``(-1 / max(y), 0)`` and ``(0, 2 * (mean(y) - min(y)) / min(y) ** 2)``, and ``x -> 0`` is the
    exponential distribution, always a stationary point. The local maxima are located on a grid
    over both intervals, refined with a bounded scalar search, and the best one (or the
    exponential) is returned. The likelihood grows without bound as ``x -> -1 / max(y)``, so
    only interior maxima are candidates, as with Grimshaw's root finding.
    """
    y = np.asarray(excesses, dtype=np.float64)
    mean, smallest, largest = float(y.mean()), float(y.min()), float(y.max())
    exponential = (0.0, mean)
    if y.size < 3 or largest - smallest <= 1e-9 * largest:
        return exponential

    # Grid over (-1/largest, 0): dense near both ends, where the interesting shapes live.
    half = np.geomspace(1e-6, 0.5, 64)
    left = -np.concatenate((half, 1.0 - half[::-1][1:])) / largest
    left.sort()
    right_end = min(2.0 * (mean - smallest) / smallest**2, 1e12 / mean)
    right_start = 1e-6 / largest
    right = np.geomspace(right_start, right_end, 128) if right_end > right_start else np.empty(0)
    grid = np.concatenate((left, [0.0], right))
    zero_index = left.size

    log_likelihood = np.empty(grid.size)
    nonzero = np.arange(grid.size) != zero_index
    log_likelihood[nonzero] = _gpd_profile_log_likelihood(grid[nonzero], y)
    log_likelihood[zero_index] = -y.size * (math.log(mean) + 1.0)

    inner = log_likelihood[1:-1]
    is_local_max = (
        (inner >= log_likelihood[:-2]) & (inner >= log_likelihood[2:]) & np.isfinite(inner)
    )
    best_x, best_log_likelihood = 0.0, log_likelihood[zero_index]
    for index in np.flatnonzero(is_local_max) + 1:
        if index == zero_index:
            continue
        low, high = grid[index - 1], grid[index + 1]  # one side of 0, or 0 itself as an end
        result = minimize_scalar(
            lambda x: -_gpd_profile_log_likelihood(np.array([x]), y)[0],
            bounds=(low, high),
            method="bounded",
            options={"xatol": 1e-10 * max(abs(low), abs(high))},
        )
        candidates = ((result.x, -result.fun), (grid[index], log_likelihood[index]))
        for x, value in candidates:
            if x != 0.0 and np.isfinite(value) and value > best_log_likelihood:
                best_x, best_log_likelihood = float(x), float(value)

    if best_x == 0.0:
        return exponential
    gamma = float(np.mean(np.log1p(best_x * y)))
    sigma = gamma / best_x
    if not (math.isfinite(gamma) and math.isfinite(sigma) and sigma > 0):
        return exponential
    return gamma, sigma


def _gpd_profile_log_likelihood(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Grimshaw profile log-likelihood at each nonzero ``x = gamma / sigma``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_terms = np.log1p(np.multiply.outer(x, y))
        gamma = log_terms.mean(axis=-1)
        sigma = gamma / x
        result = -y.size * (np.log(sigma) + 1.0 + gamma)
    return np.where(np.isfinite(result) & (sigma > 0), result, -np.inf)


def _as_scores(scores: ArrayLike) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"scores contain {n_bad} non-finite value(s) (NaN or inf)")
    return array


def _as_nonempty_scores(scores: ArrayLike, method: str) -> np.ndarray:
    array = _as_scores(scores)
    if array.size == 0:
        raise ValueError(f"{method} needs at least one score, got an empty array")
    return array


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_open_unit_interval(name: str, value: object) -> float:
    if not _is_real(value) or not (0.0 < value < 1.0):  # type: ignore[operator]
        raise ConfigError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _finite_float(name: str, value: object) -> float:
    if not _is_real(value) or not math.isfinite(value):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]
