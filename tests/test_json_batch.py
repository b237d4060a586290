"""The one-pass JSON path must give exactly what decoding record by record gives, or nothing."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from consumers.processing import BatchScorer, InputBatch
from stream_l2ae.datasets import load_dataset
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.features import FeatureMapper
from stream_l2ae.json_batch import CHUNK_VALUES, FlatJsonDecoder

NAMES = ("a", "b")


def reference(values: list[bytes], names=NAMES) -> np.ndarray | None:
    """Record by record: every value a JSON object whose fields are numbers (not bools)."""
    rows = []
    for value in values:
        try:
            record = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(record, dict):
            return None
        row = [record.get(name) for name in names]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in row):
            return None
        rows.append([float(x) for x in row])
    return np.array(rows, dtype=np.float64)


def test_clean_records_in_any_key_order_with_extra_fields():
    values = [b'{"a": 1, "b": 2.5}', b'{"b": -3e2, "zz": "x", "a": 0}', b'{"a":7,"b":8,"c":[1]}']
    out = FlatJsonDecoder(NAMES).decode(values)
    np.testing.assert_array_equal(out, reference(values))
    assert out.dtype == np.float64 and out.shape == (3, 2)


@pytest.mark.parametrize(
    "values",
    [
        [b'{"a": 1, "b": true}'],  # bool
        [b'{"a": 1, "b": "2"}'],  # string
        [b'{"a": 1, "b": null}'],  # null
        [b'{"a": 1}'],  # missing
        [b'{"a": 1, "b": 1e400}'],  # out of range
        [b'{"a": 1, "b": NaN}'],  # not JSON
        [b"[1, 2]"],  # not an object
        [b'{"a": 1, "b": 2}', None],  # tombstone
        [b'{"a": 1, "b": 2}', b""],  # empty value
        [b' {"a": 1, "b": 2}'],  # leading space: not provably aligned, so not taken
        [b'{"a": 1, "b": 2, "c": {"d": 1}}'],  # nested object
        [b'{"a": 1, "b": 2, "c": "}"}'],  # brace inside a string
        [b'{"a": 1, "b": 2, "c": "\xff\xfe"}'],  # invalid UTF-8 in a skipped field
        [b'{"a": 1, "b": 2, "\xed\xa0\x80": 3}'],  # an encoded surrogate as a key
        [b'{"a": 1, "b": 2, "c": "\\ud800"}'],  # an escaped lone surrogate
        [],
    ],
)
def test_anything_irregular_returns_none(values):
    assert FlatJsonDecoder(NAMES).decode(values) is None


@pytest.mark.parametrize(
    "values",
    [
        [b'{"a": [1', b'2], "b": 3}'],
        [b'{"a": 1, "b": 2}, {"a": 3', b'"b": 4}'],
        [b'{"a": 1, "b": "', b'", "c": 0}'],
        [b'{"a": 1, "b": 2', b'"c": 3}', b'{"a": 1, "b": 2}'],
        [b'{"a": 1, "b": 2}]', b'[{"a": 1, "b": 2}'],
        # Braces inside a string, one per value: joined, these are ONE valid object.
        [b'{"a":1,"b":2,"":"}', b'{"}'],
        [b'{"a":1,"b":2,"s":"}', b'{","a":2}'],
    ],
)
def test_invalid_values_that_join_into_valid_json_are_refused(values):
    # Each value is invalid alone; joined with commas some of these are valid JSON arrays.
    assert reference(values) is None
    assert FlatJsonDecoder(NAMES).decode(values) is None


def test_random_splits_never_misalign():
    """Cut valid record streams at random places: the result is None or the per-value truth."""
    rng = random.Random(7)
    pieces = [
        b'{"a": 1, "b": 2}',
        b'{"b": 3.5, "a": -1}',
        b'{"a": 0, "b": 0, "s": "},{"}',
        b'{"a": 5, "b": 6, "n": {"x": [1, 2]}}',
        b'{"a":1,"b":2}',
    ]
    decoder = FlatJsonDecoder(NAMES)
    taken = 0
    for _ in range(3000):
        stream = b",".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 4)))
        values = [stream[i:j] for i, j in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        values = [v for v in values if v] or [stream]
        out = decoder.decode(values)
        expected = reference(values)
        if out is not None:
            taken += 1
            assert expected is not None, values
            np.testing.assert_array_equal(out, expected)
    assert taken > 50  # the fast path is exercised, not just refused


def test_large_batches_are_decoded_in_chunks_all_or_nothing():
    n = CHUNK_VALUES * 2 + 5
    values = [orjson.dumps({"b": i * 0.5, "a": -i}) for i in range(n)]
    np.testing.assert_array_equal(FlatJsonDecoder(NAMES).decode(values), reference(values))
    values[CHUNK_VALUES + 3] = b'{"a": 1, "b": "x"}'  # one bad value in the second chunk
    assert FlatJsonDecoder(NAMES).decode(values) is None


def test_number_range_is_not_checked_in_skipped_fields():
    # The one documented difference from orjson, which refuses 1e400 anywhere.
    values = [b'{"a": 1, "b": 2, "note": 1e400}']
    np.testing.assert_array_equal(FlatJsonDecoder(NAMES).decode(values), [[1.0, 2.0]])
    assert FlatJsonDecoder(NAMES).decode([b'{"a": 1e400, "b": 2}']) is None


def test_valid_utf8_outside_ascii_is_taken():
    values = ['{"a": 1, "b": 2, "city": "Zürich", "ключ": "значение"}'.encode()]
    np.testing.assert_array_equal(FlatJsonDecoder(NAMES).decode(values), [[1.0, 2.0]])


@pytest.mark.parametrize("names", [['say "hi"', "b"], ["back\\slash"], ["tab\t"], ["a", "a"]])
def test_names_msgspec_cannot_take_always_decline(names):
    decoder = FlatJsonDecoder(names)  # no error: these schemas take the careful path
    assert decoder.decode([orjson.dumps(dict.fromkeys(names, 1))]) is None


def test_field_names_that_are_not_identifiers():
    decoder = FlatJsonDecoder(["temp-c", "rpm total"])
    out = decoder.decode([b'{"temp-c": 1.5, "rpm total": 10}'])
    np.testing.assert_array_equal(out, [[1.5, 10.0]])


def test_mapper_fast_path_matches_the_field_by_field_path():
    shuttle = load_dataset("shuttle", limit=2000)
    mapper = FeatureMapper().fit(shuttle.records)
    values = [orjson.dumps(r) for r in shuttle.records]
    fast = mapper.transform_json(values)
    slow = mapper.transform_batch([orjson.loads(v) for v in values])
    assert fast is not None and not fast.rejected
    np.testing.assert_array_equal(fast.X, slow.X)
    np.testing.assert_array_equal(fast.indices, slow.indices)


def test_mapper_without_an_all_numeric_schema_declines():
    mapper = FeatureMapper().fit([{"t": 1.0, "color": "red"}, {"t": 2.0, "color": "blue"}])
    assert mapper.transform_json([b'{"t": 1.0, "color": "red"}']) is None


@pytest.fixture(scope="module")
def shuttle_detector() -> L2AEDetector:
    return L2AEDetector(epochs=1, progress=False, seed=0).fit(load_dataset("shuttle", limit=3000))


class _Record:
    def __init__(self, value: bytes | None, offset: int) -> None:
        self.value, self.key, self.timestamp = value, None, 1_700_000_000_000 + offset
        self.topic, self.partition, self.offset = "in", 0, offset


def _scores(detector: L2AEDetector, values: list[bytes | None]):
    scorer = BatchScorer(detector, online_update=False)
    return scorer.process(InputBatch([_Record(v, i) for i, v in enumerate(values)]))


def test_scorer_gives_the_same_scores_on_both_paths(shuttle_detector):
    values = [orjson.dumps(r) for r in load_dataset("shuttle", limit=500).records]
    clean = _scores(shuttle_detector, values)
    # One tombstone sends the whole batch down the record-by-record path.
    mixed = _scores(shuttle_detector, [*values, None])
    assert [d.index for d in mixed.dead_letters] == [len(values)]
    np.testing.assert_array_equal(clean.indices, mixed.indices)
    np.testing.assert_allclose(clean.score, mixed.score, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(clean.cluster, mixed.cluster)


def test_scorer_names_each_bad_record_when_the_fast_path_declines(shuttle_detector):
    values = [orjson.dumps(r) for r in load_dataset("shuttle", limit=20).records]
    values[3] = b'{"f1": "hot"}'
    values[7] = b"{not json"
    outcome = _scores(shuttle_detector, values)
    assert [(d.index, d.reason) for d in outcome.dead_letters] == [(3, "type"), (7, "decode")]
    assert len(outcome.indices) == 18
