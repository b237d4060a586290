"""Decode a batch of flat numeric JSON records straight into a matrix, in C-level passes.

Stream records are usually small flat objects (``{"temp": 21.5, "rpm": 1200, ...}``). Decoding
each into a ``dict`` and then reading the fields back costs more than everything after it, so
for schemas whose fields are all plain numbers the batch is decoded as *one* JSON array by a
typed ``msgspec`` decoder: only the schema's fields are read, each must be a number (``int`` or
``float``; ``bool``, ``str``, ``null`` and missing fields fail), unknown fields are skipped.

Joining values into one array is only sound when the element boundaries of the parse are the
boundaries between the values; otherwise ``b'{"a": [1'`` and ``b'2]}'`` (both invalid) would
join into one valid element. :meth:`FlatJsonDecoder.decode` therefore requires that every
value starts with ``{`` and ends with ``}``, that the batch holds exactly one ``{`` and one
``}`` per value, and that the parse yields exactly one object per value. Each of those objects
needs a ``{`` and a ``}`` of its own outside strings, and there are no others, so no brace
hides in a string: the k-th object opens at the start of the k-th value and closes at its end
(the only ``}`` before the next value). Each value is then a valid object on its own and
element k is value k. Anything else -- nested objects, braces inside strings, surrounding
whitespace, invalid UTF-8, a bad value anywhere -- returns ``None``, and the caller takes the
record-by-record path, which names every bad record.

Both paths accept the same records with one exception, in fields outside the schema only: there
the one-pass decoder checks JSON syntax and UTF-8 but not the range of numbers, so a record
carrying, say, ``"note": 1e400`` next to valid schema fields is scored here, while ``orjson``
(the record-by-record path) refuses the whole value and it is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import msgspec
import numpy as np

_OPEN, _CLOSE = ord("{"), ord("}")
#: Values decoded per pass: a chunk's text and rows stay in the CPU cache (large batches decode
#: about a third slower in one piece).
CHUNK_VALUES = 8192


class FlatJsonDecoder:
    """Decodes batches of JSON objects into a ``float64`` matrix, one column per field.

    Parameters
    ----------
    names
        The fields to read, in column order. Each must hold a JSON number in every record.

    Examples
    --------
    >>> decoder = FlatJsonDecoder(["temp", "rpm"])
    >>> decoder.decode([b'{"temp": 21.5, "rpm": 1200, "site": "a"}', b'{"rpm": 900, "temp": 19}'])
    array([[  21.5, 1200. ],
           [  19. ,  900. ]])

    A batch the fast path cannot prove sound, or with any bad record, gives ``None``:

    >>> decoder.decode([b'{"temp": 21.5, "rpm": 1200}', b'{"temp": "hot", "rpm": 900}']) is None
    True
    >>> decoder.decode([b'{"temp": [1', b'2], "rpm": 3}']) is None
    True
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        if not self.names:
            raise ValueError("FlatJsonDecoder needs at least one field name")
        # Attribute names are positional so that any JSON key (spaces, dashes) can be a field.
        fields = [
            (f"c{index}", float, msgspec.field(name=name)) for index, name in enumerate(self.names)
        ]
        self._decoder: msgspec.json.Decoder | None
        try:
            # Rows hold only floats, so they cannot form reference cycles: keep them out of GC.
            row_type = msgspec.defstruct("FlatRecord", fields, gc=False)
            self._decoder = msgspec.json.Decoder(list[row_type])
        except (TypeError, ValueError):
            # msgspec refuses some names (quotes, backslashes, control characters, repeats):
            # such schemas always take the record-by-record path.
            self._decoder = None
        self._braces_in_names = sum(name.count("{") + name.count("}") for name in self.names)

    def decode(self, values: Sequence[bytes]) -> np.ndarray | None:
        """The ``(len(values), len(names))`` matrix, or ``None`` if the fast path does not apply."""
        n = len(values)
        if n == 0 or self._braces_in_names or self._decoder is None:
            return None
        if n <= CHUNK_VALUES:
            return self._decode_chunk(values)
        out = np.empty((n, len(self.names)), dtype=np.float64)
        for start in range(0, n, CHUNK_VALUES):
            chunk = self._decode_chunk(values[start : start + CHUNK_VALUES])
            if chunk is None:
                return None
            out[start : start + len(chunk)] = chunk
        return out

    def _decode_chunk(self, values: Sequence[bytes]) -> np.ndarray | None:
        n = len(values)
        try:
            body = b",".join(values)
        except TypeError:  # a None value (tombstone)
            return None
        if body.count(b"{") != n or body.count(b"}") != n:
            return None
        if not body.isascii():
            # msgspec does not check the UTF-8 of the strings it skips; the careful path refuses
            # invalid UTF-8 anywhere in a value, and both paths must accept the same records.
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                return None
        lengths = np.fromiter(map(len, values), np.int64, n)
        if not lengths.all():
            return None
        ends = np.cumsum(lengths + 1) - 1  # index of the separator after each value
        starts = ends - lengths
        raw = np.frombuffer(body, dtype=np.uint8)
        if not ((raw[starts] == _OPEN).all() and (raw[ends - 1] == _CLOSE).all()):
            return None
        try:
            rows = self._decoder.decode(b"[" + body + b"]")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        if len(rows) != n:  # braces inside strings: b'{"a":1,"":"}', b'{"}' parse as one object
            return None
        width = len(self.names)
        cells = chain.from_iterable(map(msgspec.structs.astuple, rows))
        return np.fromiter(cells, np.float64, n * width).reshape(n, width)
