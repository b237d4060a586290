"""Replay a data set into a topic: ``stream-l2ae produce``.

Each record is sent as a JSON object, keyed by its index in the data set, with its label (when
the data set has labels) in a ``label`` header, so that anyone can feed a stream and score the
results against the truth.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
from tqdm.auto import tqdm

from stream_l2ae.datasets import Dataset

from .kafka_io import make_producer

LABEL_HEADER = "label"
SEND_CHUNK = 1000


def encoded_records(data: Dataset, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """JSON bytes of each record; array rows become records the way ``fit_array`` names them."""
    stop = len(data) if stop is None else stop
    if data.records is not None:
        for record in data.records[start:stop]:
            yield orjson.dumps(record)
        return
    X = data.X[start:stop]
    if X.ndim == 2:
        names = [f"x{i}" for i in range(X.shape[1])]
        for row in X.tolist():
            yield orjson.dumps(dict(zip(names, row, strict=True)))
    else:
        for row in X:
            yield orjson.dumps({"x": row.tolist()})


def produce_dataset(
    kafka_settings: dict[str, Any],
    data: Dataset,
    topic: str,
    *,
    rate: float | None = None,
    limit: int | None = None,
    offset: int = 0,
    progress: bool = True,
    producer=None,
) -> int:
    """Send ``data[offset:offset + limit]`` to ``topic`` at ``rate`` records/s (default: as fast
    as possible); returns the number of records sent (the producer is flushed before return)."""
    stop = len(data) if limit is None else min(len(data), offset + limit)
    own_producer = producer is None
    producer = producer or make_producer(kafka_settings)
    labels = data.y
    sent = 0
    started = time.perf_counter()
    try:
        with tqdm(total=stop - offset, unit="rec", disable=not progress, desc=topic) as bar:
            for index, value in enumerate(encoded_records(data, offset, stop), start=offset):
                headers = []
                if labels is not None:
                    headers.append((LABEL_HEADER, str(np.asarray(labels[index]).item()).encode()))
                producer.send(topic, key=str(index).encode(), value=value, headers=headers)
                sent += 1
                if sent % SEND_CHUNK == 0:
                    bar.update(SEND_CHUNK)
                    if rate:
                        ahead = sent / rate - (time.perf_counter() - started)
                        if ahead > 0:
                            time.sleep(ahead)
            producer.flush()
            bar.update(sent % SEND_CHUNK)
    finally:
        if own_producer:
            producer.close()
    return sent
