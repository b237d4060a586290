"""Online centroids (online.py): running means, forgetting, checkpoints and replica merging."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stream_l2ae.errors import ConfigError
from stream_l2ae.online import CentroidStatistics, OnlineCentroids

EYE2 = np.eye(2)
INITIAL = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])


def unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=float)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_stream(n_batches=8, batch_size=24, seed=0):
    """Batches of unit embeddings near the three ``INITIAL`` directions, with event times.

    Returns a list of ``(z, clusters, now)``; the true cluster of each row is its nearest one.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(n_batches):
        clusters = rng.integers(0, 3, size=batch_size)
        z = unit(INITIAL[clusters] + 0.15 * rng.normal(size=(batch_size, 4)))
        batches.append((z, clusters, 10.0 * (index + 1)))
    return batches


def online(**kwargs) -> OnlineCentroids:
    settings = {"half_life": 25.0, "prior_weight": 5.0, **kwargs}
    return OnlineCentroids(INITIAL, **settings)


# ----- running mean -----------------------------------------------------------------------------


def test_partial_fit_follows_the_running_mean_formula():
    centroids = OnlineCentroids(EYE2, half_life=2.0, prior_weight=2.0)
    np.testing.assert_array_equal(centroids.centroids, EYE2)

    # Clock 0 -> 2 (two records); nothing to decay yet.
    centroids.partial_fit(np.array([[0.6, 0.8], [0.8, 0.6]]), np.array([0, 0]))
    assert centroids.clock == 2.0
    np.testing.assert_allclose(centroids.counts, [2.0, 0.0])
    # (2 * [1, 0] + [1.4, 1.4]) / (2 + 2)
    np.testing.assert_allclose(centroids.centroids, [[0.85, 0.35], [0.0, 1.0]], atol=1e-12)

    # Clock 2 -> 4 = one half-life: the old statistics halve before the batch is added.
    # Inputs are normalized first: [3, 4] counts as [0.6, 0.8].
    centroids.partial_fit(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([1, 0]))
    assert centroids.clock == 4.0
    np.testing.assert_allclose(centroids.counts, [0.5 * 2 + 1, 1.0])
    expected = [
        (2 * np.array([1.0, 0.0]) + 0.5 * np.array([1.4, 1.4]) + [1.0, 0.0]) / (2 + 2),
        (2 * np.array([0.0, 1.0]) + [0.6, 0.8]) / (2 + 1),
    ]
    np.testing.assert_allclose(centroids.centroids, expected, atol=1e-12)
    np.testing.assert_allclose(centroids.centroids, [[0.925, 0.175], [0.2, 2.8 / 3]], atol=1e-12)
    assert centroids.n_updates_ == 2


def test_partial_fit_assigns_rows_to_the_nearest_centroid():
    centroids = OnlineCentroids(EYE2, half_life=1e9, prior_weight=1.0)
    centroids.partial_fit(np.array([[0.9, 0.1], [0.2, 0.9], [0.1, 5.0]]))
    np.testing.assert_allclose(centroids.counts, [1.0, 2.0], atol=1e-6)


def test_partial_fit_accepts_tensors():
    a = OnlineCentroids(EYE2, half_life=10.0, prior_weight=1.0)
    b = OnlineCentroids(EYE2, half_life=10.0, prior_weight=1.0)
    z = np.array([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    a.partial_fit(z, np.array([1, 0, 1]), skip=np.array([False, False, True]))
    b.partial_fit(torch.tensor(z), torch.tensor([1, 0, 1]), skip=torch.tensor([0, 0, 1]))
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert isinstance(a.centroids_tensor(), torch.Tensor)
    assert a.centroids_tensor().dtype == torch.float32


def test_skip_mask_leaves_skipped_rows_out():
    stream = make_stream(n_batches=1, batch_size=30)
    z, clusters, _ = stream[0]
    skip = np.zeros(30, dtype=bool)
    skip[::3] = True
    masked, reference = online(), online()
    masked.partial_fit(z, clusters, skip=skip)
    reference.partial_fit(z[~skip], clusters[~skip])
    np.testing.assert_array_equal(masked.statistics().sums, reference.statistics().sums)
    np.testing.assert_array_equal(masked.statistics().counts, reference.statistics().counts)
    assert masked.clock == reference.clock
    assert masked.counts.sum() == pytest.approx(20.0)


def test_skipping_every_row_changes_nothing():
    centroids = online()
    z, clusters, _ = make_stream(n_batches=1)[0]
    centroids.partial_fit(z, clusters)
    before = centroids.statistics()
    centroids.partial_fit(z, clusters, skip=np.ones(len(z), dtype=bool))
    after = centroids.statistics()
    np.testing.assert_array_equal(after.sums, before.sums)
    np.testing.assert_array_equal(after.counts, before.counts)
    assert after.clock == before.clock
    assert centroids.last_movement_ == pytest.approx(0.0, abs=1e-12)


def test_last_movement_reports_how_far_centroids_moved():
    centroids = OnlineCentroids(EYE2, half_life=1e9, prior_weight=1.0)
    centroids.partial_fit(np.array([[0.0, 1.0]]), np.array([0]))
    # centroid 0 goes from [1, 0] to [0.5, 0.5]: 1 - cos 45 degrees
    assert centroids.last_movement_ == pytest.approx(1 - math.sqrt(0.5), abs=1e-6)


def test_prior_weight_zero_gives_plain_means_and_keeps_empty_clusters():
    centroids = OnlineCentroids(EYE2, half_life=1e9, prior_weight=0.0)
    np.testing.assert_array_equal(centroids.centroids, EYE2)
    centroids.partial_fit(np.array([[0.6, 0.8], [0.8, 0.6]]), np.array([0, 0]))
    np.testing.assert_allclose(centroids.centroids, [[0.7, 0.7], [0.0, 1.0]], atol=1e-6)


def test_occupancy():
    centroids = online()
    np.testing.assert_allclose(centroids.occupancy, [1 / 3] * 3)
    centroids.partial_fit(unit(INITIAL[[0, 0, 0, 2]]), np.array([0, 0, 0, 2]), now=1.0)
    np.testing.assert_allclose(centroids.occupancy, [0.75, 0.0, 0.25])


# ----- forgetting ---------------------------------------------------------------------------------


def test_counts_halve_after_one_half_life_of_event_time():
    centroids = online(half_life=30.0)
    z = unit(INITIAL[[0] * 6 + [1] * 2])
    centroids.partial_fit(z, np.array([0] * 6 + [1] * 2), now=100.0)
    sums = centroids.statistics().sums
    np.testing.assert_array_equal(centroids.counts, [6.0, 2.0, 0.0])

    centroids.partial_fit(np.empty((0, 4)), now=130.0)  # no data for one half-life
    assert centroids.clock == 130.0
    np.testing.assert_array_equal(centroids.counts, [3.0, 1.0, 0.0])
    np.testing.assert_array_equal(centroids.statistics().sums, sums / 2)

    centroids.partial_fit(np.empty((0, 4)), now=190.0)  # two more
    np.testing.assert_array_equal(centroids.counts, [0.75, 0.25, 0.0])


def test_counts_halve_after_one_half_life_of_records():
    """The default clock counts records: half_life new records halve the older weight."""
    centroids = online(half_life=8.0)
    centroids.partial_fit(unit(INITIAL[[0] * 10]), np.zeros(10, dtype=int))
    assert centroids.clock == 10.0
    centroids.partial_fit(unit(INITIAL[[1] * 8]), np.ones(8, dtype=int))
    assert centroids.clock == 18.0
    np.testing.assert_array_equal(centroids.counts, [5.0, 8.0, 0.0])


def test_decayed_centroid_returns_towards_the_prior():
    centroids = OnlineCentroids(EYE2, half_life=10.0, prior_weight=1.0)
    centroids.partial_fit(np.array([[0.0, 1.0]]), np.array([0]), now=0.0)
    np.testing.assert_allclose(centroids.centroids[0], [0.5, 0.5])
    centroids.partial_fit(np.empty((0, 2)), now=10.0)
    # ([1, 0] + 0.5 * [0, 1]) / 1.5
    np.testing.assert_allclose(centroids.centroids[0], [2 / 3, 1 / 3])


def test_explicit_clock():
    centroids = online(half_life=10.0)
    z = unit(INITIAL[[0, 0]])
    centroids.partial_fit(z, np.array([0, 0]), now=1000.0)
    assert centroids.clock == 1000.0
    # a late batch (older timestamp) does not move the clock back and decays nothing
    centroids.partial_fit(z, np.array([0, 0]), now=990.0)
    assert centroids.clock == 1000.0
    np.testing.assert_array_equal(centroids.counts, [4.0, 0.0, 0.0])
    centroids.partial_fit(z, np.array([0, 0]), now=1020.0)
    np.testing.assert_array_equal(centroids.counts, [4.0 / 4 + 2, 0.0, 0.0])
    # without now, the clock counts records from where it is
    centroids.partial_fit(z, np.array([0, 0]))
    assert centroids.clock == 1022.0


def test_statistics_decayed_to():
    stats = CentroidStatistics(np.ones((2, 2)), np.array([4.0, 2.0]), clock=5.0)
    later = stats.decayed_to(15.0, half_life=10.0)
    np.testing.assert_array_equal(later.counts, [2.0, 1.0])
    np.testing.assert_array_equal(later.sums, np.full((2, 2), 0.5))
    assert later.clock == 15.0
    earlier = stats.decayed_to(0.0, half_life=10.0)  # never decays backwards
    np.testing.assert_array_equal(earlier.counts, stats.counts)
    assert earlier.clock == 5.0


# ----- checkpoints --------------------------------------------------------------------------------


def test_state_round_trip_continues_identically():
    stream = make_stream()
    original = online()
    for z, clusters, now in stream[:4]:
        original.partial_fit(z, clusters, now=now)
    arrays, document = original.state()
    document = json.loads(json.dumps(document))
    assert set(arrays) == {
        "online.sums", "online.counts", "online.clock", "online.initial_centroids"
    }  # fmt: skip
    restored = OnlineCentroids.from_state(arrays, document)
    np.testing.assert_array_equal(restored.centroids, original.centroids)
    np.testing.assert_array_equal(restored.counts, original.counts)
    assert restored.clock == original.clock
    assert restored.n_updates_ == original.n_updates_ == 4
    assert (restored.half_life, restored.prior_weight) == (25.0, 5.0)

    for z, _, now in stream[4:]:  # nearest-cluster assignment, event-time clock
        original.partial_fit(z, now=now)
        restored.partial_fit(z, now=now)
    for z, _, _ in stream[:2]:  # record clock
        original.partial_fit(z)
        restored.partial_fit(z)
    np.testing.assert_array_equal(restored.centroids, original.centroids)
    assert restored.clock == original.clock


def test_state_holds_own_statistics_only():
    a, b = online(), online()
    z, clusters, now = make_stream(n_batches=1)[0]
    b.partial_fit(z, clusters, now=now)
    a.update_peer("b", b.statistics())
    arrays, document = a.state()
    assert arrays["online.counts"].sum() == 0
    assert OnlineCentroids.from_state(arrays, document).counts.sum() == 0


def test_from_state_rejects_mismatched_statistics():
    arrays, document = online().state()
    arrays["online.sums"] = np.zeros((2, 4))
    with pytest.raises(ConfigError, match="shape"):
        OnlineCentroids.from_state(arrays, document)


# ----- merging replicas ---------------------------------------------------------------------------


def feed(replica: OnlineCentroids, batches, *, explicit_clusters: bool) -> None:
    for z, clusters, now in batches:
        replica.partial_fit(z, clusters if explicit_clusters else None, now=now)


def split_stream(stream):
    """Interleave a stream over two replicas; the last batch is split so both end on its time."""
    *body, (z, clusters, now) = stream
    half = len(z) // 2
    first = body[0::2] + [(z[:half], clusters[:half], now)]
    second = body[1::2] + [(z[half:], clusters[half:], now)]
    return first, second


@pytest.mark.parametrize("explicit_clusters", [True, False], ids=["given", "nearest"])
def test_replicas_merged_with_update_peer_equal_one_process(explicit_clusters):
    stream = make_stream()
    whole, a, b = online(), online(), online()
    feed(whole, stream, explicit_clusters=explicit_clusters)
    first, second = split_stream(stream)
    feed(a, first, explicit_clusters=explicit_clusters)
    feed(b, second, explicit_clusters=explicit_clusters)
    assert a.clock == b.clock == whole.clock
    a.update_peer("b", b.statistics())
    b.update_peer("a", a.statistics())
    tolerance = 1e-6 if explicit_clusters else 1e-4
    for replica in (a, b):
        np.testing.assert_allclose(replica.centroids, whole.centroids, atol=tolerance)
        np.testing.assert_allclose(replica.counts, whole.counts, atol=tolerance)


def test_absorb_merges_checkpoints_with_different_clocks():
    stream = make_stream()
    whole, a, b = online(), online(), online()
    feed(whole, stream, explicit_clusters=True)
    feed(a, stream[0::2], explicit_clusters=True)  # ends at t=70
    feed(b, stream[1::2], explicit_clusters=True)  # ends at t=80
    assert a.clock < b.clock == whole.clock
    later_into_earlier, earlier_into_later = online(), online()
    later_into_earlier.absorb(a.statistics())
    later_into_earlier.absorb(b.statistics())
    earlier_into_later.absorb(b.statistics())
    earlier_into_later.absorb(a.statistics())
    for merged in (later_into_earlier, earlier_into_later):
        assert merged.clock == whole.clock
        np.testing.assert_allclose(merged.centroids, whole.centroids, atol=1e-9)
        np.testing.assert_allclose(merged.counts, whole.counts, atol=1e-9)
    assert merged.peers == {}


def test_replica_that_is_ahead_sees_the_merged_centroids():
    stream = make_stream()
    whole, a, b = online(), online(), online()
    feed(whole, stream, explicit_clusters=True)
    feed(a, stream[0::2], explicit_clusters=True)  # ends at t=70
    feed(b, stream[1::2], explicit_clusters=True)  # ends at t=80
    b.update_peer("a", a.statistics())
    np.testing.assert_allclose(b.centroids, whole.centroids, atol=1e-9)


def test_replica_that_lags_sees_the_merged_centroids():
    """A replica whose last batch is older than its peer's must still match one process."""
    stream = make_stream()
    whole, a, b = online(), online(), online()
    feed(whole, stream, explicit_clusters=True)
    feed(a, stream[0::2], explicit_clusters=True)  # ends at t=70
    feed(b, stream[1::2], explicit_clusters=True)  # ends at t=80
    a.update_peer("b", b.statistics())
    np.testing.assert_allclose(a.centroids, whole.centroids, atol=1e-6)


def test_update_peer_replaces_a_republished_state():
    stream = make_stream()
    first, second = split_stream(stream)
    a, b = online(), online()
    feed(a, first, explicit_clusters=True)
    feed(b, second[:-1], explicit_clusters=True)
    a.update_peer("b", b.statistics())
    feed(b, second[-1:], explicit_clusters=True)
    a.update_peer("b", b.statistics())  # the new state already contains the old one
    a.update_peer("b", b.statistics())  # republishing the same state changes nothing
    expected = a.statistics().counts + b.statistics().counts
    np.testing.assert_allclose(a.counts, expected, atol=1e-12)
    assert list(a.peers) == ["b"]


def test_peers_add_up_and_drop_peer_removes_one():
    stream = make_stream(n_batches=3)
    a, b, c = online(), online(), online()
    for replica, (z, clusters, _) in zip((a, b, c), stream, strict=True):
        replica.partial_fit(z, clusters, now=50.0)
    own_centroids = a.centroids
    a.update_peer("b", b.statistics())
    a.update_peer("c", c.statistics())
    total = sum(r.statistics().counts for r in (a, b, c))
    np.testing.assert_allclose(a.counts, total)
    a.drop_peer("c")
    np.testing.assert_allclose(a.counts, total - c.statistics().counts)
    a.drop_peer("b")
    a.drop_peer("never-seen")  # unknown ids are ignored
    np.testing.assert_array_equal(a.centroids, own_centroids)
    assert a.peers == {}


def test_peer_statistics_are_decayed_to_the_local_clock():
    a = online(half_life=10.0)
    a.partial_fit(np.empty((0, 4)), now=30.0)
    peer = CentroidStatistics(np.zeros((3, 4)), np.array([8.0, 0.0, 0.0]), clock=10.0)
    a.update_peer("old", peer)
    np.testing.assert_allclose(a.counts, [2.0, 0.0, 0.0])


@pytest.mark.parametrize("method", ["update_peer", "absorb"])
def test_merging_statistics_of_another_shape_raises_config_error(method):
    centroids = online()
    stats = CentroidStatistics(np.zeros((2, 4)), np.zeros(2), clock=0.0)
    with pytest.raises(ConfigError, match=r"\(2, 4\)"):
        if method == "update_peer":
            centroids.update_peer("x", stats)
        else:
            centroids.absorb(stats)


def test_embeddings_of_another_dimension_raise_config_error():
    with pytest.raises(ConfigError, match="dimension 4"):
        online().partial_fit(np.ones((3, 5)))
    with pytest.raises(ConfigError):
        online().partial_fit(np.ones((3, 4, 1)))


def test_one_dimensional_embedding_raises_config_error():
    with pytest.raises(ConfigError):
        online().partial_fit(np.ones(4))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"initial_centroids": np.ones(3)}, "(3,)"),
        ({"initial_centroids": np.empty((0, 3))}, "(0, 3)"),
        ({"half_life": 0.0}, "half_life must be > 0, got 0.0"),
        ({"half_life": float("nan")}, "nan"),
        ({"prior_weight": -1.0}, "prior_weight must be >= 0, got -1.0"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs, named):
    settings = {"initial_centroids": INITIAL, **kwargs}
    with pytest.raises(ConfigError) as excinfo:
        OnlineCentroids(settings.pop("initial_centroids"), **settings)
    assert named in str(excinfo.value)
