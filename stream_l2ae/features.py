"""Map JSON-like records to float32 feature vectors.

A :class:`Schema` lists the fields of a record: :class:`NumericField` (one standardized value),
:class:`CategoricalField` (one-hot, plus a trailing "unknown" slot) and :class:`ArrayField` (a
fixed-size numeric array such as image pixels, min-max scaled to [0, 1]). A :class:`FeatureMapper`
fits the scaling and turns batches of records into a ``(n, n_features)`` float32 matrix.

Bad records never crash the mapper: :meth:`FeatureMapper.transform` raises a
:class:`~stream_l2ae.errors.RecordError` naming the first bad record, and
:meth:`FeatureMapper.transform_batch` keeps the good rows and reports the bad ones.

The record path is the daemon's hot path, so every field is converted column by column with a
single :func:`numpy.asarray` call; per-value checks only run for a column that fails that fast path.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import ConfigError, NotFittedError, RecordError
from .json_batch import FlatJsonDecoder

__all__ = [
    "ArrayField",
    "BatchResult",
    "CategoricalField",
    "FeatureMapper",
    "NumericField",
    "Rejected",
    "Schema",
]

#: An array with more than this many times its declared number of values is rejected as
#: ``too_large`` (instead of ``shape``) without being converted.
TOO_LARGE_FACTOR = 10

#: ``Schema.infer`` reads the shape of at most this many values of an array field.
_SHAPE_SAMPLE = 1000

_SCHEMA_VERSION = 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Missing:
    """Placeholder for a field absent from a record (``None`` is a legitimate JSON value)."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
_PLAIN_NUMBER_TYPES = frozenset({int, float})
_ARRAY_CONTAINER_TYPES = (list, tuple, np.ndarray)


# --------------------------------------------------------------------------------------------
# Field specs and schema
# --------------------------------------------------------------------------------------------


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"field name must be a non-empty string, got {name!r}")


@dataclass(frozen=True)
class NumericField:
    """A single number, standardized with the fitted mean and standard deviation.

    Accepts ``int`` and ``float`` values (and numpy numbers); ``bool`` is a type error.
    """

    name: str

    def __post_init__(self) -> None:
        _check_name(self.name)

    @property
    def width(self) -> int:
        """Number of columns this field occupies in the feature vector."""
        return 1


@dataclass(frozen=True)
class CategoricalField:
    """A category, one-hot encoded over ``categories`` plus a trailing "unknown" slot.

    Values may be ``str``, ``int`` or ``bool``. Ints are matched by their decimal spelling
    (``3`` matches ``"3"``) and bools by their JSON spelling (``True`` matches ``"true"``).
    A value outside ``categories`` is not an error: it sets the unknown slot.

    Examples
    --------
    >>> field = CategoricalField("color", ("blue", "red"))
    >>> field.width
    3
    """

    name: str
    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_name(self.name)
        categories = tuple(self.categories)
        if not all(isinstance(category, str) for category in categories):
            raise ConfigError(f"categories of field {self.name!r} must be strings: {categories!r}")
        if len(set(categories)) != len(categories):
            raise ConfigError(f"categories of field {self.name!r} contain duplicates")
        object.__setattr__(self, "categories", categories)

    @property
    def width(self) -> int:
        """Number of columns this field occupies: one per category plus the unknown slot."""
        return len(self.categories) + 1

    @cached_property
    def _slot_of(self) -> dict[str, int]:
        return {category: slot for slot, category in enumerate(self.categories)}


@dataclass(frozen=True)
class ArrayField:
    """A fixed-size numeric array (a list or nested list), e.g. image pixels.

    Any nesting with exactly ``prod(shape)`` values is accepted: a flat list of 784 values fits
    ``shape=(28, 28)`` as well as 28 lists of 28. All values of the field share one fitted
    (min, max) range that maps them to [0, 1].

    Examples
    --------
    >>> ArrayField("pixels", (28, 28)).size
    784
    """

    name: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_name(self.name)
        try:
            shape = tuple(int(dim) for dim in self.shape)
        except (TypeError, ValueError):
            raise ConfigError(
                f"shape of field {self.name!r} must be a tuple of ints, got {self.shape!r}"
            ) from None
        if not shape or any(dim < 1 for dim in shape):
            raise ConfigError(
                f"shape of field {self.name!r} must be non-empty and positive, got {shape}"
            )
        object.__setattr__(self, "shape", shape)

    @property
    def size(self) -> int:
        """Number of values in one array."""
        return math.prod(self.shape)

    @property
    def width(self) -> int:
        """Number of columns this field occupies in the feature vector."""
        return self.size


Field = NumericField | CategoricalField | ArrayField


@dataclass(frozen=True)
class Schema:
    """The ordered fields of a record; fixes the layout of the feature vector.

    Parameters
    ----------
    fields
        Field specs in feature-vector order. Names must be unique.

    Examples
    --------
    >>> schema = Schema.infer([{"temp": 21.5, "color": "red", "ok": True}])
    >>> [type(f).__name__ for f in schema.fields]
    ['NumericField', 'CategoricalField', 'CategoricalField']
    >>> schema.n_features, schema.input_shape
    (5, (5,))
    >>> Schema.from_dict(schema.to_dict()) == schema
    True
    >>> Schema.for_array((28, 28)).input_shape
    (1, 28, 28)
    """

    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        fields = tuple(self.fields)
        if not fields:
            raise ConfigError("a schema needs at least one field")
        for spec in fields:
            if not isinstance(spec, NumericField | CategoricalField | ArrayField):
                raise ConfigError(f"not a field spec: {spec!r}")
        names = [spec.name for spec in fields]
        duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
        if duplicates:
            raise ConfigError(f"duplicate field names in schema: {duplicates}")
        object.__setattr__(self, "fields", fields)

    @property
    def names(self) -> list[str]:
        """Field names in order."""
        return [spec.name for spec in self.fields]

    @property
    def n_features(self) -> int:
        """Length of the flattened feature vector."""
        return sum(spec.width for spec in self.fields)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample as the model wants it.

        ``(C, H, W)`` for a schema made of a single 2-D (``(1, H, W)``) or 3-D array field, so the
        model can pick a convolutional network; ``(n_features,)`` otherwise.
        """
        if len(self.fields) == 1 and isinstance(self.fields[0], ArrayField):
            shape = self.fields[0].shape
            if len(shape) == 2:
                return (1, *shape)
            if len(shape) == 3:
                return shape
        return (self.n_features,)

    @classmethod
    def for_array(cls, shape: Sequence[int], name: str = "x") -> Schema:
        """Schema of array-only data: a single :class:`ArrayField`."""
        return cls((ArrayField(name, tuple(shape)),))

    @classmethod
    def infer(cls, records: Iterable[Any], max_categories: int = 50) -> Schema:
        """Infer a schema from sample records.

        Each field takes the kind most of its values have: ``int``/``float`` -> numeric,
        ``str``/``bool`` -> categorical, list -> array with the most common observed shape.
        Fields appear in the order they are first seen. ``None`` values, values of other types and
        non-dict records are ignored. A categorical field keeps its ``max_categories`` most
        frequent values (sorted); rarer ones will land in the unknown slot.

        Raises
        ------
        ConfigError
            No field could be inferred (e.g. no dict records), or ``max_categories < 1``.
        """
        if isinstance(max_categories, bool) or not isinstance(max_categories, int):
            raise ConfigError(f"max_categories must be an int, got {max_categories!r}")
        if max_categories < 1:
            raise ConfigError(f"max_categories must be >= 1, got {max_categories}")
        dicts = [record for record in records if isinstance(record, dict)]
        names: dict[Any, None] = {}
        for record in dicts:
            names.update(dict.fromkeys(record))
        fields: list[Field] = []
        for name in names:
            if isinstance(name, str) and name:
                spec = _infer_field(name, [r.get(name) for r in dicts], max_categories)
                if spec is not None:
                    fields.append(spec)
        if not fields:
            raise ConfigError(
                f"cannot infer a schema: no usable fields in {len(dicts)} dict record(s)"
            )
        return cls(tuple(fields))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation; inverse of :meth:`from_dict`."""
        return {"version": _SCHEMA_VERSION, "fields": [_field_to_dict(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schema:
        """Rebuild a schema from :meth:`to_dict` output. Raises ``ConfigError`` if malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("fields"), list):
            raise ConfigError("schema dict must have a 'fields' list")
        version = data.get("version", _SCHEMA_VERSION)
        if version != _SCHEMA_VERSION:
            raise ConfigError(f"unsupported schema version {version!r}; expected {_SCHEMA_VERSION}")
        return cls(tuple(_field_from_dict(item) for item in data["fields"]))


def _field_to_dict(spec: Field) -> dict[str, Any]:
    if isinstance(spec, NumericField):
        return {"type": "numeric", "name": spec.name}
    if isinstance(spec, CategoricalField):
        return {"type": "categorical", "name": spec.name, "categories": list(spec.categories)}
    return {"type": "array", "name": spec.name, "shape": list(spec.shape)}


def _field_from_dict(item: Any) -> Field:
    if not isinstance(item, dict):
        raise ConfigError(f"field entry must be a dict, got {item!r}")
    kind, name = item.get("type"), item.get("name")
    try:
        if kind == "numeric":
            return NumericField(name)
        if kind == "categorical":
            return CategoricalField(name, tuple(item["categories"]))
        if kind == "array":
            return ArrayField(name, tuple(item["shape"]))
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"malformed {kind} field entry {item!r}: {exc!r}") from None
    raise ConfigError(
        f"unknown field type {kind!r} in {item!r}; expected 'numeric', 'categorical' or 'array'"
    )


def _value_kind(value: Any) -> str | None:
    if isinstance(value, bool | np.bool_ | str):
        return "categorical"
    if isinstance(value, int | float | np.integer | np.floating):
        return "numeric"
    if isinstance(value, _ARRAY_CONTAINER_TYPES):
        return "array"
    return None


def _infer_field(name: str, values: list[Any], max_categories: int) -> Field | None:
    if set(map(type, values)) <= {int, float, type(None)}:
        return NumericField(name) if any(v is not None for v in values) else None
    kinds = Counter(kind for kind in map(_value_kind, values) if kind is not None)
    if not kinds:
        return None
    priority = {"array": 0, "categorical": 1, "numeric": 2}
    kind = min(kinds, key=lambda k: (-kinds[k], priority[k]))
    if kind == "numeric":
        return NumericField(name)
    if kind == "categorical":
        counts = Counter(
            key for key in map(_category_key, values) if key is not None and key is not _MISSING
        )
        kept = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_categories]
        return CategoricalField(name, tuple(sorted(category for category, _ in kept)))
    array_values = [v for v in values if isinstance(v, _ARRAY_CONTAINER_TYPES)]
    shapes = Counter(
        shape for shape in map(_numeric_array_shape, array_values[:_SHAPE_SAMPLE]) if shape
    )
    if not shapes:
        return None
    return ArrayField(name, shapes.most_common(1)[0][0])


def _numeric_array_shape(value: Any) -> tuple[int, ...] | None:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    if array.dtype.kind not in "iuf" or array.size == 0:
        return None
    return array.shape


# --------------------------------------------------------------------------------------------
# Column extraction: one list of raw values per field -> (column, {row: error})
# --------------------------------------------------------------------------------------------


def _category_key(value: Any) -> str | None | _Missing:
    """Spelling of a categorical value; ``None`` for a wrong type, ``_MISSING`` for absent/null."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if value is None or value is _MISSING:
        return _MISSING
    return None


def _missing_error(name: str, value: Any) -> RecordError:
    detail = "field is missing" if value is _MISSING else "value is null"
    return RecordError(name, "missing", detail)


def _to_number(name: str, value: Any) -> float | RecordError:
    if value is _MISSING or value is None:
        return _missing_error(name, value)
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        return RecordError(name, "type", f"expected a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:
        return RecordError(name, "nan", "value is too large for a float (infinite)")
    if math.isnan(number):
        return RecordError(name, "nan", "value is NaN")
    if math.isinf(number):
        return RecordError(name, "nan", "value is infinite")
    return number


def _numeric_column(spec: NumericField, values: list[Any]) -> tuple[np.ndarray, dict]:
    errors: dict[int, RecordError] = {}
    if not set(map(type, values)) <= _PLAIN_NUMBER_TYPES:
        # Check only the values that are not plain int/float, then convert the rest in one go.
        values = list(values)
        for row in [r for r, v in enumerate(values) if type(v) not in _PLAIN_NUMBER_TYPES]:
            number = _to_number(spec.name, values[row])
            if isinstance(number, RecordError):
                errors[row] = number
                number = 0.0
            values[row] = number
    try:
        column = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an int beyond float64: convert value by value
        column = np.zeros(len(values), dtype=np.float64)
        for row, value in enumerate(values):
            number = _to_number(spec.name, value)
            if isinstance(number, RecordError):
                errors[row] = number
            else:
                column[row] = number
        return column, errors
    finite = np.isfinite(column)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite)
        errors.update({int(row): _to_number(spec.name, values[row]) for row in bad_rows})
        column[bad_rows] = 0.0
    return column, errors


def _categorical_column(spec: CategoricalField, values: list[Any]) -> tuple[np.ndarray, dict]:
    slot_of, unknown = spec._slot_of, len(spec.categories)
    if set(map(type, values)) <= {str}:
        return np.asarray([slot_of.get(v, unknown) for v in values], dtype=np.intp), {}
    slots = np.zeros(len(values), dtype=np.intp)
    errors = {}
    for row, value in enumerate(values):
        key = _category_key(value)
        if key is _MISSING:
            errors[row] = _missing_error(spec.name, value)
        elif key is None:
            errors[row] = RecordError(
                spec.name, "type", f"expected a str, int or bool, got {type(value).__name__}"
            )
        else:
            slots[row] = slot_of.get(key, unknown)
    return slots, errors


def _array_row(spec: ArrayField, value: Any) -> np.ndarray | RecordError:
    """Convert one array value to a flat float32 vector, or say why it cannot be."""
    name, size = spec.name, spec.size
    if value is _MISSING or value is None:
        return _missing_error(name, value)
    if not isinstance(value, _ARRAY_CONTAINER_TYPES):
        return RecordError(name, "type", f"expected a list of numbers, got {type(value).__name__}")
    limit = TOO_LARGE_FACTOR * size
    count = value.size if isinstance(value, np.ndarray) else len(value)
    if count > limit:  # cheap guard before converting a huge list
        return RecordError(name, "too_large", f"{count} values, expected {size}")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return RecordError(name, "shape", f"ragged nesting, expected shape {spec.shape}")
    if array.dtype.kind not in "iuf":
        return RecordError(name, "type", f"array values must be numbers (got dtype {array.dtype})")
    if array.size > limit:
        return RecordError(name, "too_large", f"{array.size} values, expected {size}")
    if array.size != size:
        return RecordError(
            name, "shape", f"{array.size} values (shape {array.shape}), expected {spec.shape}"
        )
    with np.errstate(over="ignore"):
        flat = array.reshape(size).astype(np.float32)
    if not np.isfinite(flat).all():
        return RecordError(name, "nan", "array contains NaN or infinite values")
    return flat


def _array_column(spec: ArrayField, values: list[Any]) -> tuple[np.ndarray, dict]:
    n, size = len(values), spec.size
    try:
        stacked = np.asarray(values)
    except (ValueError, TypeError):  # ragged or mixed: check row by row
        stacked = None
    if (
        stacked is not None
        and stacked.dtype.kind in "iuf"
        and stacked.ndim >= 2
        and math.prod(stacked.shape[1:]) == size
    ):
        with np.errstate(over="ignore"):
            block = stacked.reshape(n, size).astype(np.float32, copy=False)
        if stacked.dtype.kind != "f":
            return block, {}
        bad_rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        errors = {int(row): _array_row(spec, values[row]) for row in bad_rows}
        block[bad_rows] = 0.0
        return block, errors
    block = np.zeros((n, size), dtype=np.float32)
    errors = {}
    for row, value in enumerate(values):
        converted = _array_row(spec, value)
        if isinstance(converted, RecordError):
            errors[row] = converted
        else:
            block[row] = converted
    return block, errors


_EXTRACTORS = {
    NumericField: _numeric_column,
    CategoricalField: _categorical_column,
    ArrayField: _array_column,
}


# --------------------------------------------------------------------------------------------
# Mapper
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rejected:
    """A record :meth:`FeatureMapper.transform_batch` could not map."""

    index: int
    error: RecordError


@dataclass
class BatchResult:
    """Output of :meth:`FeatureMapper.transform_batch`.

    Attributes
    ----------
    X
        Feature rows of the good records, float32, shape ``(len(indices), n_features)``.
    indices
        Original positions of the good records, in order.
    rejected
        One entry per bad record, sorted by index.
    """

    X: np.ndarray
    indices: np.ndarray
    rejected: list[Rejected]


def _shift_and_divisor(spec: Field, params: tuple[float, float]) -> tuple[float, float]:
    """``(x - shift) / divisor`` scales a value of ``spec`` given its fitted parameters."""
    if isinstance(spec, NumericField):
        return params  # (mean, std), std already floored
    low, high = params
    return low, (high - low if high > low else 1.0)


def _scale_column(
    spec: Field, column: np.ndarray, params: tuple[float, float], errors: dict[int, RecordError]
) -> np.ndarray:
    """Scale a raw column to float32; a numeric value that overflows float32 becomes an error."""
    shift, divisor = _shift_and_divisor(spec, params)
    if isinstance(spec, ArrayField):
        column -= np.float32(shift)
        column *= np.float32(1.0 / divisor)
        return column
    with np.errstate(over="ignore"):
        scaled = ((column - shift) / divisor).astype(np.float32)
    for row in np.flatnonzero(~np.isfinite(scaled)):
        errors.setdefault(int(row), RecordError(spec.name, "nan", "value overflows when scaled"))
    return scaled


def _with_index(error: RecordError, index: int) -> RecordError:
    return RecordError(error.field, error.reason, f"{error.detail} (record {index})")


def _std_or_one(std: float, mean: float) -> float:
    """The fitted std, or 1.0 for a (near-)constant column, as scikit-learn does."""
    return std if std > 1e-12 * max(1.0, abs(mean)) else 1.0


class FeatureMapper:
    """Turn records into scaled float32 feature vectors (scikit-learn style).

    Numeric fields are standardized with the fitted mean and std (a constant column keeps scale
    1); array fields are min-max scaled with one fitted (min, max) per field, so training values
    land in [0, 1] (later values outside the fitted range are not clipped); categorical fields are
    one-hot encoded. Extra fields in a record are ignored.

    Parameters
    ----------
    schema
        The record layout; inferred by :meth:`fit` (or :meth:`fit_array`) when ``None``.

    Examples
    --------
    >>> records = [{"temp": 20.0, "color": "red"}, {"temp": 22.0, "color": "blue"}]
    >>> mapper = FeatureMapper().fit(records)
    >>> mapper.schema.n_features  # temp + blue, red, unknown
    4
    >>> mapper.transform([{"temp": 23.0, "color": "green"}])
    array([[2., 0., 0., 1.]], dtype=float32)
    >>> batch = mapper.transform_batch([{"temp": 21.0, "color": "red"}, {"temp": "hot"}, 5])
    >>> batch.X.shape, batch.indices.tolist()
    ((1, 4), [0])
    >>> [(r.index, r.error.field, r.error.reason) for r in batch.rejected]
    [(1, 'temp', 'type'), (2, None, 'not_a_record')]

    Streams such as river's Shuttle data set work the same way:

    >>> from itertools import islice
    >>> from river.datasets import Shuttle
    >>> shuttle = [x for x, _ in islice(Shuttle(), 1000)]
    >>> mapper = FeatureMapper().fit(shuttle)
    >>> mapper.schema.names[:3], mapper.schema.input_shape
    (['f1', 'f2', 'f3'], (9,))
    >>> X = mapper.transform(shuttle)
    >>> X.dtype, X.shape, bool(abs(X.mean()) < 1e-5)
    (dtype('float32'), (1000, 9), True)
    >>> restored = FeatureMapper.from_dict(mapper.to_dict())
    >>> bool((restored.transform(shuttle) == X).all())
    True
    """

    def __init__(self, schema: Schema | None = None) -> None:
        if schema is not None and not isinstance(schema, Schema):
            raise ConfigError(f"schema must be a Schema or None, got {type(schema).__name__}")
        self.schema = schema
        # field name -> (mean, std) for numeric fields, (min, max) for array fields
        self._scaling: dict[str, tuple[float, float]] | None = None
        self._json_decoder: FlatJsonDecoder | None = None

    def __repr__(self) -> str:
        fields = "None" if self.schema is None else f"{len(self.schema.fields)} fields"
        return f"FeatureMapper(schema={fields}, fitted={self.is_fitted})"

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`fit_array` / :meth:`from_dict`) has run."""
        return self._scaling is not None

    def output_shape(self, n: int) -> tuple[int, ...]:
        """Shape the model wants for ``n`` samples: ``(n, *schema.input_shape)``.

        ``transform`` returns ``(n, n_features)``; reshape its output to this.
        """
        return (n, *self._require_schema().input_shape)

    # ----- records ----------------------------------------------------------------------------

    def fit(self, records: Iterable[Any], *, skip_invalid: bool = False) -> FeatureMapper:
        """Infer the schema if needed and fit the scaling on ``records``.

        Raises a :class:`RecordError` for the first bad record unless ``skip_invalid`` is set,
        in which case bad records are left out of the fit.
        """
        records = _as_sequence(records)
        if self.schema is None:
            self.schema = Schema.infer(records)
        indices, columns, rejected = self._extract(records, scaling=None)
        if rejected and not skip_invalid:
            raise _with_index(rejected[0].error, rejected[0].index)
        if len(indices) == 0:
            raise ConfigError("cannot fit a FeatureMapper on zero valid records")
        scaling = {}
        for spec, column in zip(self.schema.fields, columns, strict=True):
            if isinstance(spec, NumericField):
                mean, std = float(column.mean()), float(column.std())
                scaling[spec.name] = (mean, _std_or_one(std, mean))
            elif isinstance(spec, ArrayField):
                scaling[spec.name] = (float(column.min()), float(column.max()))
        self._scaling = scaling
        return self

    def transform(self, records: Iterable[Any]) -> np.ndarray:
        """Map records to a float32 matrix of shape ``(n, n_features)``.

        Raises
        ------
        RecordError
            For the first bad record; its detail ends with ``(record <index>)``.
        """
        batch = self.transform_batch(records)
        if batch.rejected:
            first = batch.rejected[0]
            raise _with_index(first.error, first.index)
        return batch.X

    def fit_transform(self, records: Iterable[Any]) -> np.ndarray:
        """``fit(records)`` then ``transform(records)``."""
        records = _as_sequence(records)
        return self.fit(records).transform(records)

    def transform_batch(self, records: Iterable[Any]) -> BatchResult:
        """Map the good records and report the bad ones; never raises for a bad record.

        Each bad record is reported once, with the error of its first bad field in schema order:
        ``not_a_record`` (not a dict), ``missing`` (absent or null), ``type`` (e.g. a str or bool
        for a numeric field, a float for a categorical one), ``nan`` (NaN, infinite, or too large
        for float32 once scaled), ``shape`` (wrong number of array values or ragged nesting) or
        ``too_large`` (more than ``TOO_LARGE_FACTOR`` times the declared array size).
        """
        schema, scaling = self._require_fitted()
        records = _as_sequence(records)
        if all(isinstance(spec, NumericField) for spec in schema.fields):
            fast = self._transform_numeric_fast(records, schema, scaling)
            if fast is not None:
                return fast
        indices, columns, rejected = self._extract(records, scaling=scaling)
        out = np.empty((len(indices), schema.n_features), dtype=np.float32)
        start = 0
        for spec, column in zip(schema.fields, columns, strict=True):
            stop = start + spec.width
            if isinstance(spec, CategoricalField):
                out[:, start:stop] = 0.0
                out[np.arange(len(indices)), start + column] = 1.0
            elif isinstance(spec, NumericField):
                out[:, start] = column
            else:
                out[:, start:stop] = column
            start = stop
        return BatchResult(out, indices, rejected)

    @staticmethod
    def _transform_numeric_fast(
        records: Sequence[Any], schema: Schema, scaling: dict[str, tuple[float, float]]
    ) -> BatchResult | None:
        """All-numeric schemas: one C-level pass when every record is clean, else ``None``.

        Any irregularity (a missing field, a non-dict, a string, NaN, overflow) sends the batch
        to the field-by-field path, which finds and names the bad records. One leniency: a JSON
        ``true``/``false`` mixed into otherwise numeric values is read as 1/0 here.
        """
        names = schema.names
        getter = operator.itemgetter(*names)
        try:
            rows = [getter(record) for record in records]
        except (KeyError, TypeError, IndexError, AttributeError):
            return None
        if len(names) == 1:
            rows = [(value,) for value in rows]
        try:
            values = np.array(rows) if rows else np.empty((0, len(names)))
        except (TypeError, ValueError):
            return None
        if values.dtype.kind not in "if" or values.shape != (len(records), len(names)):
            return None
        return _scaled_numeric_batch(values, names, scaling)

    def transform_json(self, values: Sequence[bytes]) -> BatchResult | None:
        """Map a batch of raw JSON values in one pass; ``None`` when the fast path does not apply.

        For all-numeric schemas only, and only when every value is a flat JSON object whose
        schema fields are all numbers (see :mod:`stream_l2ae.json_batch`). A ``None`` means:
        decode the values and call :meth:`transform_batch`, which names each bad record.

        Examples
        --------
        >>> mapper = FeatureMapper().fit([{"temp": 20.0}, {"temp": 22.0}])
        >>> mapper.transform_json([b'{"temp": 23}', b'{"temp": 21, "site": "b"}']).X
        array([[2.],
               [0.]], dtype=float32)
        >>> mapper.transform_json([b'{"temp": 23}', b'{"temp": null}']) is None
        True
        """
        schema, scaling = self._require_fitted()
        if not all(isinstance(spec, NumericField) for spec in schema.fields):
            return None
        names = tuple(schema.names)
        decoder = self._json_decoder
        if decoder is None or decoder.names != names:
            decoder = self._json_decoder = FlatJsonDecoder(names)
        matrix = decoder.decode(values)
        if matrix is None:
            return None
        return _scaled_numeric_batch(matrix, names, scaling)

    def _extract(
        self, records: Sequence[Any], scaling: dict[str, tuple[float, float]] | None
    ) -> tuple[np.ndarray, list[np.ndarray], list[Rejected]]:
        """Convert ``records`` field by field (scaled when ``scaling`` is given).

        Returns the original indices of the good records, one column per field restricted to
        those records, and the rejected records (first error in field order).
        """
        schema = self._require_schema()
        errors: dict[int, RecordError] = {}
        positions = np.arange(len(records))
        dicts = records
        if not all(isinstance(record, dict) for record in records):
            is_dict = np.fromiter(
                (isinstance(record, dict) for record in records), dtype=bool, count=len(records)
            )
            for index in np.flatnonzero(~is_dict):
                kind = type(records[index]).__name__
                errors[int(index)] = RecordError(
                    None, "not_a_record", f"expected a JSON object, got {kind}"
                )
            positions = positions[is_dict]
            dicts = [records[index] for index in positions]
        bad = np.zeros(len(dicts), dtype=bool)
        columns = []
        for spec in schema.fields:
            name = spec.name
            column, field_errors = _EXTRACTORS[type(spec)](
                spec, [r.get(name, _MISSING) for r in dicts]
            )
            if scaling is not None and name in scaling:
                column = _scale_column(spec, column, scaling[name], field_errors)
            for row, error in field_errors.items():
                if not bad[row]:
                    bad[row] = True
                    errors[int(positions[row])] = error
            columns.append(column)
        if bad.any():
            good = ~bad
            positions = positions[good]
            columns = [column[good] for column in columns]
        rejected = [Rejected(index, errors[index]) for index in sorted(errors)]
        return positions, columns, rejected

    # ----- ndarray fast path --------------------------------------------------------------------

    def fit_array(self, X: np.ndarray) -> FeatureMapper:
        """Fit on an ndarray: ``(n, *shape)`` or ``(n, n_features)``.

        Works for schemas without categorical fields (array-only data, or numeric tabular data with
        columns in field order). Without a schema, ``X`` of shape ``(n, d)`` becomes ``d`` numeric
        fields ``x0 .. x{d-1}`` and ``X`` with 3+ dims becomes ``Schema.for_array(X.shape[1:])``.
        """
        X = np.asarray(X)
        if self.schema is None:
            self.schema = _schema_for_ndarray(X)
        flat = self._flatten(X)
        if len(flat) == 0:
            raise ConfigError("cannot fit a FeatureMapper on zero rows")
        scaling = {}
        for spec, start, stop in self._layout():
            block = flat[:, start:stop]
            if isinstance(spec, NumericField):
                column = block[:, 0].astype(np.float64)
                mean, std = float(column.mean()), float(column.std())
                scaling[spec.name] = (mean, _std_or_one(std, mean))
            else:
                scaling[spec.name] = (float(block.min()), float(block.max()))
        self._scaling = scaling
        return self

    def transform_array(self, X: np.ndarray) -> np.ndarray:
        """Scale an ndarray (see :meth:`fit_array`) to float32 of shape ``(n, n_features)``."""
        _, scaling = self._require_fitted()
        flat = self._flatten(np.asarray(X))
        out = np.empty(flat.shape, dtype=np.float32)
        for spec, start, stop in self._layout():
            shift, divisor = _shift_and_divisor(spec, scaling[spec.name])
            if isinstance(spec, NumericField):
                with np.errstate(over="ignore"):
                    out[:, start] = (flat[:, start].astype(np.float64) - shift) / divisor
                overflow = np.flatnonzero(~np.isfinite(out[:, start]))
                if len(overflow):
                    raise RecordError(spec.name, "nan", f"row {overflow[0]}: overflows when scaled")
            else:
                block = out[:, start:stop]
                block[...] = flat[:, start:stop]
                block -= np.float32(shift)
                block *= np.float32(1.0 / divisor)
        return out

    def _flatten(self, X: np.ndarray) -> np.ndarray:
        """Validate ``X`` for the ndarray path and view it as ``(n, n_features)``."""
        schema = self._require_schema()
        categorical = [f.name for f in schema.fields if isinstance(f, CategoricalField)]
        if categorical:
            raise ConfigError(f"the ndarray path does not support categorical fields {categorical}")
        if X.ndim < 2 or math.prod(X.shape[1:]) != schema.n_features:
            raise ConfigError(
                f"X must have shape (n, {schema.n_features}) or (n, *{schema.input_shape}), "
                f"got {X.shape}"
            )
        if X.dtype.kind not in "biuf":
            raise ConfigError(f"X must be numeric, got dtype {X.dtype}")
        flat = X.reshape(len(X), schema.n_features)
        if flat.dtype.kind == "f":
            finite = np.isfinite(flat)
            if not finite.all():
                row, column = np.argwhere(~finite)[0]
                spec = next(spec for spec, start, stop in self._layout() if start <= column < stop)
                raise RecordError(spec.name, "nan", f"row {row}: NaN or infinite value")
        return flat

    def _layout(self) -> list[tuple[Field, int, int]]:
        layout, start = [], 0
        for spec in self._require_schema().fields:
            layout.append((spec, start, start + spec.width))
            start += spec.width
        return layout

    # ----- state ---------------------------------------------------------------------------------

    def _require_schema(self) -> Schema:
        if self.schema is None:
            raise NotFittedError("FeatureMapper has no schema yet; call fit() first")
        return self.schema

    def _require_fitted(self) -> tuple[Schema, dict[str, tuple[float, float]]]:
        if self.schema is None or self._scaling is None:
            raise NotFittedError("FeatureMapper is not fitted; call fit() or fit_array() first")
        return self.schema, self._scaling

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe state (schema and scaling parameters); inverse of :meth:`from_dict`."""
        schema, scaling = self._require_fitted()
        params = {}
        for spec in schema.fields:
            if isinstance(spec, NumericField):
                mean, std = scaling[spec.name]
                params[spec.name] = {"mean": mean, "std": std}
            elif isinstance(spec, ArrayField):
                low, high = scaling[spec.name]
                params[spec.name] = {"min": low, "max": high}
        return {"schema": schema.to_dict(), "scaling": params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureMapper:
        """Rebuild a fitted mapper from :meth:`to_dict` output. Raises ``ConfigError``."""
        if not isinstance(data, dict) or not isinstance(data.get("scaling"), dict):
            raise ConfigError("feature mapper dict must have 'schema' and 'scaling' entries")
        mapper = cls(Schema.from_dict(data.get("schema")))
        params, scaling = data["scaling"], {}
        for spec in mapper.schema.fields:
            if isinstance(spec, CategoricalField):
                continue
            keys = ("mean", "std") if isinstance(spec, NumericField) else ("min", "max")
            entry = params.get(spec.name)
            try:
                first, second = (float(entry[key]) for key in keys)
            except (KeyError, TypeError, ValueError):
                raise ConfigError(
                    f"scaling for field {spec.name!r} must be a dict with {keys}, got {entry!r}"
                ) from None
            if not (math.isfinite(first) and math.isfinite(second)):
                raise ConfigError(f"scaling for field {spec.name!r} is not finite: {entry!r}")
            if isinstance(spec, NumericField) and second <= 0:
                raise ConfigError(f"std of field {spec.name!r} must be > 0, got {second}")
            scaling[spec.name] = (first, second)
        mapper._scaling = scaling
        return mapper


def _scaled_numeric_batch(
    values: np.ndarray, names: Sequence[str], scaling: dict[str, tuple[float, float]]
) -> BatchResult | None:
    """Standardize a clean numeric matrix; ``None`` if a value overflows float32 once scaled."""
    shift = np.array([scaling[name][0] for name in names])
    divisor = np.array([scaling[name][1] for name in names])
    with np.errstate(over="ignore", invalid="ignore"):
        out = ((values - shift) / divisor).astype(np.float32)
    if not np.isfinite(out).all():
        return None
    return BatchResult(out, np.arange(len(values)), [])


def _as_sequence(records: Iterable[Any]) -> Sequence[Any]:
    if isinstance(records, list | tuple):
        return records
    if isinstance(records, dict | str | bytes):
        raise ConfigError(
            f"expected a sequence of records, got a single {type(records).__name__}; "
            "wrap one record in a list"
        )
    return list(records)


def _schema_for_ndarray(X: np.ndarray) -> Schema:
    if X.ndim < 2:
        raise ConfigError(f"X must have at least 2 dimensions (n, ...), got shape {X.shape}")
    if X.ndim == 2:
        return Schema(tuple(NumericField(f"x{column}") for column in range(X.shape[1])))
    return Schema.for_array(X.shape[1:])
