from __future__ import annotations

import json
import time

import numpy as np
import pytest

from stream_l2ae.errors import ConfigError, NotFittedError, RecordError
from stream_l2ae.features import (
    ArrayField,
    CategoricalField,
    FeatureMapper,
    NumericField,
    Schema,
)

SHUTTLE_FIELDS = [f"f{i}" for i in range(1, 10)]


@pytest.fixture
def tabular_records() -> list[dict]:
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    return [
        {
            "temp": float(rng.normal(20, 5)),
            "count": int(rng.integers(0, 100)),
            "color": colors[i % 3],
        }
        for i in range(200)
    ]


@pytest.fixture
def tabular_mapper(tabular_records) -> FeatureMapper:
    return FeatureMapper().fit(tabular_records)


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(30, 28, 28), dtype=np.uint8)


@pytest.fixture
def image_mapper(images) -> FeatureMapper:
    return FeatureMapper().fit([{"pixels": image.tolist()} for image in images])


def shuttle_like(n: int, seed: int = 0) -> list[dict]:
    table = np.random.default_rng(seed).integers(-50, 150, size=(n, 9)).tolist()
    return [dict(zip(SHUTTLE_FIELDS, row, strict=True)) for row in table]


# ----- schema ----------------------------------------------------------------------------------


def test_infer_kinds_and_order():
    schema = Schema.infer(
        [
            {"a": 1, "b": "x", "c": [[1, 2], [3, 4]], "d": True},
            {"a": 2.5, "b": "y", "c": [[0, 0], [0, 0]], "d": False, "e": None},
        ]
    )
    assert schema.fields == (
        NumericField("a"),
        CategoricalField("b", ("x", "y")),
        ArrayField("c", (2, 2)),
        CategoricalField("d", ("false", "true")),
    )
    assert schema.names == ["a", "b", "c", "d"]
    assert schema.n_features == 1 + 3 + 4 + 3


def test_infer_keeps_most_frequent_categories():
    records = [{"city": city} for city in ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]]
    schema = Schema.infer(records, max_categories=2)
    assert schema.fields == (CategoricalField("city", ("a", "b")),)


def test_infer_majority_kind_wins():
    records = [{"x": i} for i in range(10)] + [{"x": "N/A"}]
    assert Schema.infer(records).fields == (NumericField("x"),)


def test_infer_ignores_non_dicts_and_fails_without_fields():
    assert Schema.infer([5, {"a": 1}]).names == ["a"]
    with pytest.raises(ConfigError):
        Schema.infer([5, "x"])
    with pytest.raises(ConfigError):
        Schema.infer([{"a": None, "b": {"nested": 1}}])
    with pytest.raises(ConfigError):
        Schema.infer([{"a": 1}], max_categories=0)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((NumericField("a"), NumericField("b")), (2,)),
        ((ArrayField("x", (28, 28)),), (1, 28, 28)),
        ((ArrayField("x", (3, 8, 8)),), (3, 8, 8)),
        ((ArrayField("x", (10,)),), (10,)),
        ((ArrayField("x", (2, 2)), NumericField("a")), (5,)),
        ((CategoricalField("c", ("u", "v")),), (3,)),
    ],
)
def test_input_shape(fields, expected):
    assert Schema(fields).input_shape == expected


def test_for_array():
    schema = Schema.for_array((1, 28, 28), name="img")
    assert schema.fields == (ArrayField("img", (1, 28, 28)),)
    assert schema.n_features == 784


@pytest.mark.parametrize(
    "make",
    [
        lambda: Schema(()),
        lambda: Schema((NumericField("a"), NumericField("a"))),
        lambda: Schema(("a",)),
        lambda: NumericField(""),
        lambda: ArrayField("x", (0, 3)),
        lambda: ArrayField("x", ()),
        lambda: CategoricalField("c", ("a", "a")),
        lambda: CategoricalField("c", (1, 2)),
    ],
)
def test_invalid_specs(make):
    with pytest.raises(ConfigError):
        make()


def test_schema_dict_round_trip():
    schema = Schema(
        (NumericField("a"), CategoricalField("b", ("x", "y")), ArrayField("c", (1, 4, 4)))
    )
    data = json.loads(json.dumps(schema.to_dict()))
    assert Schema.from_dict(data) == schema


@pytest.mark.parametrize(
    "data",
    [
        None,
        {},
        {"fields": [{"type": "weird", "name": "a"}]},
        {"fields": [{"type": "array", "name": "a"}]},
        {"fields": [{"type": "numeric", "name": "a"}], "version": 99},
        {"fields": ["a"]},
    ],
)
def test_schema_from_dict_rejects_malformed(data):
    with pytest.raises(ConfigError):
        Schema.from_dict(data)


# ----- fitting and scaling -----------------------------------------------------------------------


def test_numeric_fields_are_standardized(tabular_records, tabular_mapper):
    X = tabular_mapper.transform(tabular_records)
    assert X.dtype == np.float32
    assert X.shape == (200, tabular_mapper.schema.n_features)
    np.testing.assert_allclose(X[:, :2].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(X[:, :2].std(axis=0), 1, atol=1e-4)


def test_constant_column_gets_unit_scale():
    mapper = FeatureMapper().fit([{"a": 5, "b": i} for i in range(10)])
    X = mapper.transform([{"a": 5, "b": 0}, {"a": 7, "b": 0}])
    assert np.isfinite(X).all()
    assert X[:, 0].tolist() == [0.0, 2.0]


def test_array_fields_are_min_max_scaled(images, image_mapper):
    X = image_mapper.transform([{"pixels": image.tolist()} for image in images])
    assert X.shape == (30, 784)
    assert X.min() == 0.0 and X.max() == 1.0
    low, high = images.min(), images.max()
    np.testing.assert_allclose(X[0], (images[0].ravel() - low) / (high - low), rtol=1e-6)


def test_categorical_one_hot_with_unknown_slot():
    schema = Schema((CategoricalField("c", ("1", "a", "true")),))
    mapper = FeatureMapper(schema).fit([{"c": "a"}])
    X = mapper.transform([{"c": "a"}, {"c": 1}, {"c": True}, {"c": "never seen"}, {"c": False}])
    assert X.tolist() == [
        [0, 1, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 1],
        [0, 0, 0, 1],
    ]


def test_extra_fields_are_ignored(tabular_records, tabular_mapper):
    extended = [{**record, "extra": "whatever"} for record in tabular_records[:5]]
    np.testing.assert_array_equal(
        tabular_mapper.transform(extended), tabular_mapper.transform(tabular_records[:5])
    )


def test_numpy_scalars_are_accepted(tabular_mapper):
    record = {"temp": np.float32(20.0), "count": np.int64(3), "color": "red"}
    plain = {"temp": 20.0, "count": 3, "color": "red"}
    np.testing.assert_array_equal(
        tabular_mapper.transform([record]), tabular_mapper.transform([plain])
    )


def test_mapper_dict_round_trip(tabular_records, tabular_mapper, images, image_mapper):
    for mapper, records in [
        (tabular_mapper, tabular_records),
        (image_mapper, [{"pixels": image.tolist()} for image in images]),
    ]:
        restored = FeatureMapper.from_dict(json.loads(json.dumps(mapper.to_dict())))
        assert restored.schema == mapper.schema
        np.testing.assert_array_equal(restored.transform(records), mapper.transform(records))


@pytest.mark.parametrize(
    "data",
    [
        {"schema": {"fields": [{"type": "numeric", "name": "a"}]}, "scaling": {}},
        {"schema": {"fields": [{"type": "numeric", "name": "a"}]}, "scaling": {"a": {"mean": 0}}},
        {
            "schema": {"fields": [{"type": "numeric", "name": "a"}]},
            "scaling": {"a": {"mean": 0, "std": 0}},
        },
        {"schema": {"fields": [{"type": "numeric", "name": "a"}]}},
    ],
)
def test_mapper_from_dict_rejects_malformed(data):
    with pytest.raises(ConfigError):
        FeatureMapper.from_dict(data)


def test_not_fitted():
    with pytest.raises(NotFittedError):
        FeatureMapper().transform([{"a": 1}])
    with pytest.raises(NotFittedError):
        FeatureMapper(Schema.for_array((2,))).transform_array(np.zeros((1, 2)))
    with pytest.raises(NotFittedError):
        FeatureMapper().to_dict()


def test_fit_rejects_bad_records_unless_skipped():
    records = [{"a": 1.0}, {"a": "bad"}, {"a": 3.0}]
    with pytest.raises(RecordError, match="record 1"):
        FeatureMapper().fit(records)
    mapper = FeatureMapper().fit(records, skip_invalid=True)
    assert mapper.to_dict()["scaling"]["a"] == {"mean": 2.0, "std": 1.0}
    with pytest.raises(ConfigError):
        FeatureMapper(mapper.schema).fit([{"a": "bad"}], skip_invalid=True)


def test_fit_transform_accepts_generators():
    X = FeatureMapper().fit_transform({"a": float(i)} for i in range(4))
    assert X.shape == (4, 1)


def test_empty_batch(tabular_mapper):
    assert tabular_mapper.transform([]).shape == (0, tabular_mapper.schema.n_features)
    batch = tabular_mapper.transform_batch([])
    assert batch.X.shape == (0, tabular_mapper.schema.n_features)
    assert batch.indices.tolist() == [] and batch.rejected == []


# ----- malformed records -------------------------------------------------------------------------

GOOD = {"temp": 20.0, "count": 3, "color": "red"}
GOOD_IMAGE = np.zeros((28, 28), dtype=int).tolist()


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"count": 3, "color": "red"}, "temp", "missing"),
        ({**GOOD, "temp": None}, "temp", "missing"),
        ({**GOOD, "temp": "20"}, "temp", "type"),
        ({**GOOD, "temp": True}, "temp", "type"),
        ({**GOOD, "temp": [1.0]}, "temp", "type"),
        ({**GOOD, "temp": {"v": 1}}, "temp", "type"),
        ({**GOOD, "temp": float("nan")}, "temp", "nan"),
        ({**GOOD, "temp": float("inf")}, "temp", "nan"),
        ({**GOOD, "count": -float("inf")}, "count", "nan"),
        ({**GOOD, "count": 10**400}, "count", "nan"),
        ({**GOOD, "count": 1e300}, "count", "nan"),  # overflows float32 once scaled
        ({"temp": 20.0, "count": 3}, "color", "missing"),
        ({**GOOD, "color": 1.5}, "color", "type"),
        ({**GOOD, "color": ["red"]}, "color", "type"),
        ({"temp": "x", "count": None}, "temp", "type"),  # first bad field in schema order
        ([1, 2, 3], None, "not_a_record"),
        ("a string", None, "not_a_record"),
        (None, None, "not_a_record"),
    ],
)
def test_malformed_tabular_record(tabular_mapper, record, field, reason):
    batch = tabular_mapper.transform_batch([GOOD, record])
    assert batch.indices.tolist() == [0]
    [rejected] = batch.rejected
    assert (rejected.index, rejected.error.field, rejected.error.reason) == (1, field, reason)
    with pytest.raises(RecordError) as excinfo:
        tabular_mapper.transform([GOOD, record])
    assert excinfo.value.field == field
    assert excinfo.value.reason == reason
    assert "record 1" in str(excinfo.value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "missing"),
        (7, "type"),
        ("pixels", "type"),
        ({"a": 1}, "type"),
        (list(range(783)), "shape"),
        (list(range(785)), "shape"),
        ([[0] * 28] * 27 + [[0] * 27], "shape"),  # ragged nesting
        ([[0] * 28] * 27, "shape"),
        ([0] * (784 * 11), "too_large"),
        ([[0] * 784] * 11, "too_large"),
        ([["a"] * 28] * 28, "type"),
        ([[0] * 28] * 27 + [[0] * 27 + [None]], "type"),
        ([[0.0] * 28] * 27 + [[0.0] * 27 + [float("nan")]], "nan"),
        ([[0.0] * 28] * 27 + [[0.0] * 27 + [float("inf")]], "nan"),
    ],
)
def test_malformed_array_record(image_mapper, value, reason):
    records = [{"pixels": GOOD_IMAGE}, {"pixels": value}, {"pixels": GOOD_IMAGE}]
    batch = image_mapper.transform_batch(records)
    assert batch.indices.tolist() == [0, 2]
    [rejected] = batch.rejected
    assert (rejected.index, rejected.error.field, rejected.error.reason) == (1, "pixels", reason)


@pytest.mark.parametrize(
    "value",
    [
        list(range(784)),
        np.arange(784).reshape(1, 28, 28).tolist(),
        np.arange(784.0).reshape(28, 28),
    ],
)
def test_array_accepts_any_nesting_with_the_right_size(image_mapper, value):
    expected = image_mapper.transform([{"pixels": np.arange(784).reshape(28, 28).tolist()}])
    np.testing.assert_array_equal(image_mapper.transform([{"pixels": value}]), expected)


def test_array_row_fallback_matches_fast_path(image_mapper, images):
    records = [{"pixels": image.tolist()} for image in images]
    fast = image_mapper.transform(records)
    mixed = [*records, {"pixels": [1, 2]}]  # one bad row forces the per-row path
    batch = image_mapper.transform_batch(mixed)
    np.testing.assert_array_equal(batch.X, fast)
    assert [r.index for r in batch.rejected] == [len(records)]


def test_transform_batch_keeps_good_rows_in_order(tabular_records, tabular_mapper):
    records = list(tabular_records[:10])
    records[2] = {**records[2], "temp": float("nan")}
    records[5] = "not a record"
    records[9] = {"color": "red"}
    batch = tabular_mapper.transform_batch(records)
    good = [0, 1, 3, 4, 6, 7, 8]
    assert batch.indices.tolist() == good
    np.testing.assert_array_equal(batch.X, tabular_mapper.transform([records[i] for i in good]))
    assert [(r.index, r.error.field, r.error.reason) for r in batch.rejected] == [
        (2, "temp", "nan"),
        (5, None, "not_a_record"),
        (9, "temp", "missing"),
    ]
    with pytest.raises(RecordError, match="record 2"):
        tabular_mapper.transform(records)


# ----- ndarray fast path -------------------------------------------------------------------------


def test_array_fast_path_matches_record_path(images, image_mapper):
    mapper = FeatureMapper(image_mapper.schema).fit_array(images)
    assert mapper.to_dict() == image_mapper.to_dict()
    expected = image_mapper.transform([{"pixels": image.tolist()} for image in images])
    for X in (images, images[:, None], images.reshape(30, 784), images.astype(np.float64)):
        np.testing.assert_allclose(mapper.transform_array(X), expected, rtol=1e-6)
    assert mapper.output_shape(30) == (30, 1, 28, 28)
    assert mapper.transform_array(images).reshape(mapper.output_shape(30)).shape == (
        30,
        1,
        28,
        28,
    )


def test_fit_array_infers_schema():
    images = np.zeros((4, 1, 8, 8), dtype=np.float32)
    mapper = FeatureMapper().fit_array(images)
    assert mapper.schema == Schema.for_array((1, 8, 8))
    assert mapper.schema.input_shape == (1, 8, 8)
    table = np.arange(12.0).reshape(4, 3)
    tabular = FeatureMapper().fit_array(table)
    assert tabular.schema.names == ["x0", "x1", "x2"]
    np.testing.assert_allclose(tabular.transform_array(table).mean(axis=0), 0, atol=1e-6)


def test_numeric_fast_path_matches_record_path():
    records = shuttle_like(500)
    table = np.array([[record[name] for name in SHUTTLE_FIELDS] for record in records])
    from_records = FeatureMapper().fit(records)
    from_array = FeatureMapper(from_records.schema).fit_array(table)
    np.testing.assert_allclose(
        from_array.transform_array(table), from_records.transform(records), rtol=1e-6
    )


def test_array_fast_path_errors(tabular_mapper, image_mapper):
    with pytest.raises(ConfigError, match="categorical"):
        tabular_mapper.transform_array(np.zeros((2, 5)))
    with pytest.raises(ConfigError, match="shape"):
        image_mapper.transform_array(np.zeros((2, 27, 28)))
    with pytest.raises(ConfigError, match="numeric"):
        image_mapper.transform_array(np.full((2, 784), "a"))
    bad = np.zeros((3, 28, 28))
    bad[2, 5, 5] = np.nan
    with pytest.raises(RecordError, match="row 2") as excinfo:
        image_mapper.transform_array(bad)
    assert (excinfo.value.field, excinfo.value.reason) == ("pixels", "nan")
    with pytest.raises(ConfigError):
        FeatureMapper().fit_array(np.zeros(5))


# ----- performance -------------------------------------------------------------------------------


def test_transform_batch_is_fast():
    records = shuttle_like(50_000)
    mapper = FeatureMapper().fit(records[:1000])
    best = float("inf")
    for _ in range(3):  # best of three: shared CI machines are noisy
        start = time.perf_counter()
        batch = mapper.transform_batch(records)
        best = min(best, time.perf_counter() - start)
    assert batch.X.shape == (50_000, 9)
    assert best < 0.5, f"transform_batch of 50k records took {best:.3f}s"
