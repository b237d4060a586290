from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from stream_l2ae.errors import ConfigError, NotFittedError
from stream_l2ae.thresholds import (
    QuantileThreshold,
    SPOTThreshold,
    StreamingQuantileThreshold,
    Threshold,
    _fit_generalized_pareto,
    threshold_from_dict,
)


def json_round_trip(threshold: Threshold) -> Threshold:
    return threshold_from_dict(json.loads(json.dumps(threshold.to_dict(), allow_nan=False)))


# --- QuantileThreshold ---------------------------------------------------------------------------


@pytest.mark.parametrize("alert_rate", [0.001, 0.01, 0.05])
def test_quantile_threshold_gives_requested_alert_rate_on_held_out_data(alert_rate):
    rng = np.random.default_rng(1)
    threshold = QuantileThreshold(alert_rate=alert_rate).fit(rng.exponential(0.02, 200_000))
    held_out_rate = threshold.is_anomaly(rng.exponential(0.02, 200_000)).mean()
    assert held_out_rate == pytest.approx(alert_rate, rel=0.2)


def test_quantile_threshold_is_static():
    rng = np.random.default_rng(2)
    threshold = QuantileThreshold().fit(rng.exponential(0.02, 10_000))
    before = threshold.value
    assert threshold.update(np.full(1000, 1.5)) == before
    assert threshold.value == before


def test_quantile_threshold_round_trip():
    threshold = QuantileThreshold(alert_rate=0.1).fit(np.linspace(0, 1, 101))
    restored = json_round_trip(threshold)
    assert isinstance(restored, QuantileThreshold)
    assert restored.value == threshold.value
    assert restored.alert_rate == 0.1


def test_is_anomaly_is_strict_and_keeps_shape():
    threshold = QuantileThreshold(alert_rate=0.5).fit([0.0, 1.0])  # median 0.5
    flags = threshold.is_anomaly(np.array([[0.4, 0.5], [0.6, 2.0]]))
    assert flags.dtype == bool
    assert flags.tolist() == [[False, False], [True, True]]


@pytest.mark.parametrize(
    "make",
    [QuantileThreshold, StreamingQuantileThreshold, SPOTThreshold],
    ids=["quantile", "streaming", "spot"],
)
def test_value_before_fit_raises_not_fitted(make):
    threshold = make()
    assert not threshold.is_fitted
    with pytest.raises(NotFittedError):
        threshold.value  # noqa: B018
    with pytest.raises(NotFittedError):
        threshold.is_anomaly([0.1])
    assert json_round_trip(threshold).to_dict() == threshold.to_dict()


@pytest.mark.parametrize(
    "make",
    [QuantileThreshold, StreamingQuantileThreshold, SPOTThreshold],
    ids=["quantile", "streaming", "spot"],
)
def test_non_finite_scores_are_rejected(make):
    threshold = make().fit(np.linspace(0, 1, 1000))
    with pytest.raises(ValueError, match="non-finite"):
        threshold.update([0.1, math.nan])
    with pytest.raises(ValueError, match="at least one score"):
        make().fit([])


# --- StreamingQuantileThreshold ------------------------------------------------------------------


def test_streaming_quantile_matches_np_quantile_on_stationary_stream():
    rng = np.random.default_rng(3)
    threshold = StreamingQuantileThreshold(alert_rate=0.01, half_life=100_000)
    stream = rng.exponential(0.01, 1_000_000)
    for batch in np.split(stream, 200):
        value = threshold.update(batch)
    assert value == pytest.approx(np.quantile(stream, 0.99), rel=0.02)
    assert value == pytest.approx(0.01 * math.log(100), rel=0.02)
    assert threshold.total_weight == pytest.approx(100_000 / math.log(2), rel=0.05)


def test_streaming_quantile_resolves_tiny_scores():
    rng = np.random.default_rng(4)
    scores = rng.exponential(1e-4, 50_000)
    threshold = StreamingQuantileThreshold(alert_rate=0.05, half_life=1e9).fit(scores)
    assert threshold.value == pytest.approx(np.quantile(scores, 0.95), rel=0.005)


def test_streaming_quantile_tracks_shifted_distribution():
    rng = np.random.default_rng(5)
    half_life = 20_000
    threshold = StreamingQuantileThreshold(alert_rate=0.01, half_life=half_life)
    threshold.fit(rng.exponential(0.01, 100_000))
    before = threshold.value
    for _ in range(6 * half_life // 2_000):  # six half-lives of shifted data
        threshold.update(rng.exponential(0.05, 2_000))
    assert before == pytest.approx(0.01 * math.log(100), rel=0.05)
    assert threshold.value == pytest.approx(0.05 * math.log(100), rel=0.05)


def test_streaming_quantile_warm_start_weight_is_capped():
    threshold = StreamingQuantileThreshold(half_life=1_000).fit(np.full(1_000_000, 0.1))
    assert threshold.total_weight == pytest.approx(1_000 / math.log(2))


def test_streaming_quantile_clips_out_of_range_scores_and_handles_empty_batch():
    threshold = StreamingQuantileThreshold(alert_rate=0.5)
    value = threshold.update([-1e-9, 2.0000001, 5.0])
    assert 0.0 <= value <= 2.0
    assert threshold.update(np.empty(0)) == value


def test_streaming_quantile_degenerate_input_is_finite():
    threshold = StreamingQuantileThreshold().fit(np.zeros(1000))
    assert math.isfinite(threshold.value)
    assert math.isfinite(threshold.update(np.full(10, 0.3)))


def test_streaming_quantile_round_trip_gives_identical_outputs():
    rng = np.random.default_rng(6)
    threshold = StreamingQuantileThreshold(alert_rate=0.02, half_life=5_000, n_bins=1024)
    threshold.fit(rng.exponential(0.01, 20_000))
    threshold.update(rng.exponential(0.02, 3_000))
    restored = json_round_trip(threshold)
    assert restored.value == threshold.value
    for batch in np.split(rng.exponential(0.03, 10_000), 5):
        assert restored.update(batch) == threshold.update(batch)
        assert np.array_equal(restored.is_anomaly(batch), threshold.is_anomaly(batch))


# --- SPOTThreshold -------------------------------------------------------------------------------


def run_spot(spot: SPOTThreshold, stream: np.ndarray, batch_size: int) -> float:
    """Stream in batches, deciding each batch with the previous threshold; return the alert rate."""
    n_alerts = 0
    for batch in np.split(stream, len(stream) // batch_size):
        n_alerts += int(spot.is_anomaly(batch).sum())
        spot.update(batch)
    return n_alerts / len(stream)


@pytest.mark.parametrize("risk", [1e-3, 1e-4])
def test_spot_alert_rate_matches_risk_on_exponential_scores(risk):
    rng = np.random.default_rng(7)
    spot = SPOTThreshold(risk=risk).fit(rng.exponential(0.05, 50_000))
    assert spot.value == pytest.approx(-0.05 * math.log(risk), rel=0.15)
    alert_rate = run_spot(spot, rng.exponential(0.05, 1_000_000), batch_size=10_000)
    assert risk / 3 <= alert_rate <= 3 * risk


def test_spot_alert_rate_matches_risk_on_gpd_scores():
    rng = np.random.default_rng(8)
    gamma, sigma, risk = 0.2, 0.02, 1e-3
    scores = stats.genpareto.rvs(gamma, scale=sigma, size=1_050_000, random_state=rng)
    spot = SPOTThreshold(risk=risk, init_quantile=0.95).fit(scores[:50_000])
    exact = stats.genpareto.ppf(1 - risk, gamma, scale=sigma)
    assert spot.value == pytest.approx(exact, rel=0.2)
    assert run_spot(spot, scores[50_000:], batch_size=5_000) == pytest.approx(risk, rel=0.5)
    fitted_gamma, fitted_sigma = spot.gpd_params
    assert fitted_gamma == pytest.approx(gamma, abs=0.1)


def test_gpd_fit_agrees_with_scipy_maximum_likelihood():
    rng = np.random.default_rng(9)
    for shape in (-0.3, 0.0, 0.3):
        excesses = stats.genpareto.rvs(shape, scale=0.1, size=2_000, random_state=rng)
        gamma, sigma = _fit_generalized_pareto(excesses)
        scipy_gamma, _, scipy_sigma = stats.genpareto.fit(excesses, floc=0)
        assert gamma == pytest.approx(scipy_gamma, abs=1e-3)
        assert sigma == pytest.approx(scipy_sigma, rel=1e-3)


def test_gpd_fit_corrects_for_truncated_excesses():
    rng = np.random.default_rng(14)
    excesses = stats.genpareto.rvs(0.1, scale=0.05, size=20_000, random_state=rng)
    limit = stats.genpareto.ppf(0.9, 0.1, scale=0.05)  # the top 10 % never reach the model
    kept = excesses[excesses <= limit]
    naive_gamma, _ = _fit_generalized_pareto(kept)
    gamma, sigma = _fit_generalized_pareto(kept, np.full(kept.size, limit))
    assert naive_gamma < -0.2  # truncation makes the tail look bounded
    assert gamma == pytest.approx(0.1, abs=0.05)
    assert sigma == pytest.approx(0.05, rel=0.05)


def test_spot_does_not_absorb_anomalies():
    rng = np.random.default_rng(10)
    spot = SPOTThreshold(risk=1e-3).fit(rng.exponential(0.05, 20_000))
    state_before, value_before = spot.to_dict()["state"], spot.value
    anomalies = np.linspace(value_before + 0.1, 2.0, 500)
    assert spot.is_anomaly(anomalies).all()
    assert spot.update(anomalies) == value_before
    assert spot.to_dict()["state"] == state_before

    mixed = np.concatenate([anomalies, [spot.initial_threshold + 0.01, 0.0]])
    n_peaks, n_observed = spot.n_peaks, spot.n_observed
    spot.update(mixed)
    assert spot.n_peaks == n_peaks + 1
    assert spot.n_observed == n_observed + 2


def test_spot_round_trip_gives_identical_outputs():
    rng = np.random.default_rng(11)
    spot = SPOTThreshold(risk=1e-3, max_peaks=300).fit(rng.exponential(0.05, 20_000))
    run_spot(spot, rng.exponential(0.05, 20_000), batch_size=2_000)
    restored = json_round_trip(spot)
    assert restored.to_dict() == spot.to_dict()
    for batch in np.split(rng.exponential(0.06, 20_000), 10):
        assert np.array_equal(restored.is_anomaly(batch), spot.is_anomaly(batch))
        assert restored.update(batch) == spot.update(batch)


def test_spot_keeps_at_most_max_peaks_and_preserves_exceedance_rate():
    rng = np.random.default_rng(12)
    spot = SPOTThreshold(risk=1e-3, init_quantile=0.98, max_peaks=200)
    spot.fit(rng.exponential(0.05, 100_000))
    assert spot.n_peaks == 200
    assert spot.n_peaks / spot.n_observed == pytest.approx(0.02, rel=0.05)
    run_spot(spot, rng.exponential(0.05, 100_000), batch_size=5_000)
    assert spot.n_peaks == 200
    assert spot.n_peaks / spot.n_observed == pytest.approx(0.02, rel=0.2)


@pytest.mark.parametrize(
    "calibration",
    [np.full(1_000, 0.1), np.zeros(1_000), np.array([0.3]), np.r_[np.zeros(99), 0.5]],
    ids=["all-equal", "all-zero", "single", "one-excess"],
)
def test_spot_degenerate_input_never_gives_nan(calibration):
    spot = SPOTThreshold().fit(calibration)
    assert math.isfinite(spot.value)
    for batch in (np.full(100, 0.1), np.zeros(100), np.linspace(0, 2, 100), np.empty(0)):
        assert math.isfinite(spot.update(batch))
    assert math.isfinite(json_round_trip(spot).value)


def test_spot_without_peaks_falls_back_to_initial_threshold():
    spot = SPOTThreshold().fit(np.full(1_000, 0.1))
    assert spot.n_peaks == 0
    assert spot.gpd_params is None
    assert spot.value == pytest.approx(0.1)


def test_spot_update_before_fit_raises_not_fitted():
    with pytest.raises(NotFittedError):
        SPOTThreshold().update([0.1, 0.2])


# --- parameters and serialisation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "bad_value"),
    [
        (lambda: QuantileThreshold(alert_rate=0.0), "0.0"),
        (lambda: QuantileThreshold(alert_rate=1.5), "1.5"),
        (lambda: QuantileThreshold(alert_rate="0.1"), "'0.1'"),
        (lambda: StreamingQuantileThreshold(alert_rate=math.nan), "nan"),
        (lambda: StreamingQuantileThreshold(half_life=-5), "-5"),
        (lambda: StreamingQuantileThreshold(half_life=math.inf), "inf"),
        (lambda: StreamingQuantileThreshold(n_bins=8), "8"),
        (lambda: StreamingQuantileThreshold(n_bins=100.0), "100.0"),
        (lambda: StreamingQuantileThreshold(min_score=3.0), "3.0"),
        (lambda: SPOTThreshold(risk=-1e-4), "-0.0001"),
        (lambda: SPOTThreshold(init_quantile=1.0), "1.0"),
        (lambda: SPOTThreshold(risk=0.05, init_quantile=0.98), "0.05"),
        (lambda: SPOTThreshold(max_peaks=1), "1"),
        (lambda: SPOTThreshold(max_peaks=True), "True"),
    ],
)
def test_invalid_parameters_raise_config_error_naming_the_value(make, bad_value):
    with pytest.raises(ConfigError) as excinfo:
        make()
    assert bad_value in str(excinfo.value)


def test_threshold_from_dict_builds_unfitted_threshold_from_config():
    threshold = threshold_from_dict({"kind": "streaming_quantile", "half_life": 500})
    assert isinstance(threshold, StreamingQuantileThreshold)
    assert threshold.half_life == 500
    assert not threshold.is_fitted


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "median"}, "'median'"),
        ({"alert_rate": 0.1}, "None"),
        ({"kind": "quantile", "alert_rte": 0.1}, "alert_rte"),
        ({"kind": "spot", "risk": 2.0}, "2.0"),
        ({"kind": "quantile", "state": {"value": math.nan}}, "state.value"),
        ({"kind": "spot", "state": {"excesses": []}}, "invalid state"),
        ({"kind": "streaming_quantile", "state": {"bins": [5000], "weights": [1.0]}}, "range"),
    ],
)
def test_threshold_from_dict_rejects_bad_input(data, message):
    with pytest.raises(ConfigError, match=message):
        threshold_from_dict(data)


def test_to_dict_is_json_safe_and_tagged():
    rng = np.random.default_rng(13)
    scores = rng.exponential(0.02, 5_000)
    for threshold in (
        QuantileThreshold().fit(scores),
        StreamingQuantileThreshold().fit(scores),
        SPOTThreshold(risk=1e-3).fit(scores),
    ):
        data = threshold.to_dict()
        assert data["kind"] == threshold.kind
        json.dumps(data, allow_nan=False)
        assert type(json_round_trip(threshold)) is type(threshold)
