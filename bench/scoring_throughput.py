"""Scoring throughput of the L2AEDetector on the CPU, against river's HalfSpaceTrees.

What is measured
----------------
All figures are records per second on the CPU, over river's Shuttle stream (49,097 records,
``f1`` .. ``f9``), in one run so that they share the machine's state:

* ``ours: full path`` -- ``detector.score_batch(records)`` on batches of record dicts
  (``--batch-size``, 1024 by default): feature mapping, encoder, cosine score against the
  centroids and the threshold, everything the consumer daemon does per batch.
* ``ours: from JSON bytes`` -- ``detector.score_json(values)`` on the same batches as JSON-encoded
  bytes, as they come off Kafka: the daemon's path, decoding included (river's figures start
  from decoded dicts).
* ``ours: model path`` -- ``detector.embed(X)`` then ``detector.score_embeddings(z)`` on batches
  of a feature array built beforehand: the torch part alone.
* ``ours: full path, batch 1`` -- ``score_batch([record])`` one record at a time
  (``--latency-records`` of them): the per-event cost, for comparison with river's ``score_one``.

Each of our figures is taken with torch's default number of intra-op threads and again with
``torch.set_num_threads(1)`` (a single-core figure).

The baseline is river's ``anomaly.HalfSpaceTrees`` with default parameters, with a
``preprocessing.MinMaxScaler`` in front as river's documentation recommends, and without it
(HalfSpaceTrees then assumes every feature lies in [0, 1], which Shuttle's do not):

* ``learn_one`` over the first ``--river-records`` records, on a fresh model each pass;
* ``score_one`` over the same records, with a model that has learned them (a HalfSpaceTrees
  model returns 0 without looking at the record until its first window is full, so scoring a
  fresh model would flatter river).

A prequential stream pays both, so its rate is ``1 / (1/score + 1/learn)``.

Every workload gets ``--warmup`` untimed passes, then ``--repeats`` timed passes, taken in
rounds (one pass of every workload per round) so that a burst of load from other processes
hits ours and river's figures alike; the table gives the best and the median pass. The headline
ratio is our full path (median) over river's scaled ``score_one`` (median); the goal is at
least 20x. A stage breakdown of the full path (feature mapping, encoder, scoring, threshold) in
microseconds per record, for each thread count, closes the report.

How to run
----------
::

    python bench/scoring_throughput.py                      # train a quick model, then measure
    python bench/scoring_throughput.py --model models/shuttle --json runs/throughput.json

The detector is trained with the default configuration for Shuttle-sized records (the small
dense network), on the CPU with one torch thread, on the first ``--train-records`` records for
``--epochs`` epochs (2 by default: accuracy does not matter for timing). The run takes about a
minute on an idle two-core machine. Run it on an idle one: when other processes keep the cores
busy, torch's multi-threaded figures collapse (the script warns when the load average is high).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from stream_l2ae import __version__
from stream_l2ae.datasets import load_dataset
from stream_l2ae.detector import L2AEDetector

Record = dict[str, Any]

#: The goal stated in the issue: our full path at least this many times river's ``score_one``.
GOAL_RATIO = 20.0

FULL_PATH = "ours: full path (score_batch)"
MODEL_PATH = "ours: model path (embed+score)"
JSON_PATH = "ours: from JSON bytes (score_json)"
BATCH_OF_ONE = "ours: full path, batch 1"

#: Passes of the stage breakdown (best one kept).
STAGE_PASSES = 3


@dataclass
class Workload:
    """One timed workload: ``run_pass`` handles ``n_records`` records once.

    ``threads`` is the torch thread count to set before each pass (``None``: not a torch
    workload). ``seconds`` collects the wall-clock time of each timed pass.
    """

    name: str
    n_records: int
    batch_size: int | None
    threads: int | None
    run_pass: Callable[[], object]
    seconds: list[float] = field(default_factory=list)

    @property
    def best_rate(self) -> float:
        return self.n_records / min(self.seconds)

    @property
    def median_rate(self) -> float:
        return self.n_records / statistics.median(self.seconds)

    def time_pass(self) -> float:
        if self.threads is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
            _ = torch.ones(256, 256) @ torch.ones(256, 256)  # resize the thread pool, untimed
        gc.collect()
        started = time.perf_counter()
        self.run_pass()
        return time.perf_counter() - started

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_records": self.n_records,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "seconds": self.seconds,
            "best_records_per_s": self.best_rate,
            "median_records_per_s": self.median_rate,
        }


def run_rounds(workloads: list[Workload], *, repeats: int, warmup: int) -> None:
    """``warmup`` untimed then ``repeats`` timed rounds, each one pass of every workload."""
    for round_index in range(warmup + repeats):
        for workload in workloads:
            seconds = workload.time_pass()
            if round_index >= warmup:
                workload.seconds.append(seconds)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------
# Our detector
# --------------------------------------------------------------------------------------------


def get_detector(records: list[Record], args: argparse.Namespace) -> L2AEDetector:
    """Load ``--model`` on the CPU, or train a detector with the default Shuttle configuration."""
    if args.model is not None:
        print(f"loading model {args.model}")
        return L2AEDetector.load(args.model, device="cpu")
    train = records[: args.train_records] if args.train_records else records
    print(f"training a detector on {len(train):,} records, {args.epochs} epoch(s), CPU ...")
    started = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: on a loaded machine, multi-threaded torch can take ten times longer to train
    # this small network; the thread count does not change the trained model's scoring cost.
    torch.set_num_threads(1)
    try:
        detector = L2AEDetector(epochs=args.epochs, device="cpu", progress=False).fit(train)
    finally:
        torch.set_num_threads(threads)
    print(f"  trained in {time.perf_counter() - started:.1f} s")
    return detector


def our_workloads(
    detector: L2AEDetector, records: list[Record], args: argparse.Namespace, threads: int
) -> list[Workload]:
    """Full path, model path and batch-1 scoring of our detector with ``threads`` threads."""
    batches = chunks(records, args.batch_size)
    X, _, _ = detector.features(records)
    feature_batches = chunks(X, args.batch_size)
    single = records[: args.latency_records]
    value_batches = chunks([orjson.dumps(record) for record in records], args.batch_size)

    def full_path() -> None:
        for batch in batches:
            detector.score_batch(batch)

    def json_path() -> None:
        for batch in value_batches:
            if detector.score_json(batch) is None:
                raise RuntimeError("the one-pass JSON path declined clean Shuttle records")

    def model_path() -> None:
        for batch in feature_batches:
            detector.score_embeddings(detector.embed(batch))

    def batch_of_one() -> None:
        for record in single:
            detector.score_batch([record])

    workloads = [
        Workload(FULL_PATH, len(records), args.batch_size, threads, full_path),
        Workload(JSON_PATH, len(records), args.batch_size, threads, json_path),
        Workload(MODEL_PATH, len(X), args.batch_size, threads, model_path),
    ]
    if single:
        workloads.append(Workload(BATCH_OF_ONE, len(single), 1, threads, batch_of_one))
    return workloads


def stage_breakdown(
    detector: L2AEDetector, records: list[Record], batch_size: int, threads: int, repeats: int
) -> dict[str, float]:
    """Microseconds per record in each stage of ``score_batch`` (best of ``repeats`` passes)."""
    torch.set_num_threads(threads)
    stages = ("features", "embed", "score", "threshold")
    best = dict.fromkeys(stages, float("inf"))
    batches = chunks(records, batch_size)
    threshold = detector.threshold.value
    for _ in range(repeats):
        totals = dict.fromkeys(stages, 0.0)
        for batch in batches:
            t0 = time.perf_counter()
            X, _, _ = detector.features(batch)
            t1 = time.perf_counter()
            z = detector.embed(X)
            t2 = time.perf_counter()
            scores = detector.score_embeddings(z)
            t3 = time.perf_counter()
            _ = scores.score > threshold
            t4 = time.perf_counter()
            totals["features"] += t1 - t0
            totals["embed"] += t2 - t1
            totals["score"] += t3 - t2
            totals["threshold"] += t4 - t3
        best = {stage: min(best[stage], totals[stage]) for stage in stages}
    return {stage: 1e6 * seconds / len(records) for stage, seconds in best.items()}


# --------------------------------------------------------------------------------------------
# river baseline
# --------------------------------------------------------------------------------------------


def river_label(scaled: bool) -> str:
    return "river: HST" + (" + MinMaxScaler" if scaled else " (no scaler)")


def make_river_model(scaled: bool) -> Any:
    from river import anomaly, preprocessing

    model = anomaly.HalfSpaceTrees()
    return preprocessing.MinMaxScaler() | model if scaled else model


def river_workloads(records: list[Record], *, scaled: bool) -> list[Workload]:
    """``score_one`` on a model that has learned ``records``, and ``learn_one`` from scratch."""
    trained = make_river_model(scaled)
    for record in records:
        trained.learn_one(record)

    def score_pass() -> None:
        for record in records:
            trained.score_one(record)

    def learn_pass() -> None:
        model = make_river_model(scaled)
        for record in records:
            model.learn_one(record)

    label = river_label(scaled)
    return [
        Workload(f"{label} score_one", len(records), None, None, score_pass),
        Workload(f"{label} learn_one", len(records), None, None, learn_pass),
    ]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on a Unix
        return None


def machine_info(default_threads: int) -> dict[str, Any]:
    import river

    try:
        usable_cpus: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "torch": torch.__version__,
        "torch_default_threads": default_threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "river": river.__version__,
        "stream_l2ae": __version__,
    }


def find(workloads: list[Workload], name: str, threads: int | None = None) -> Workload:
    return next(w for w in workloads if w.name == name and w.threads == threads)


def ratios(workloads: list[Workload], thread_counts: Sequence[int]) -> list[dict[str, Any]]:
    """Our full path over each river figure, median over median and best over best."""
    rows = []
    for scaled in (True, False):
        score = find(workloads, f"{river_label(scaled)} score_one")
        learn = find(workloads, f"{river_label(scaled)} learn_one")
        baselines = {
            "score_one": (score.median_rate, score.best_rate),
            "prequential": (
                1.0 / (1.0 / score.median_rate + 1.0 / learn.median_rate),
                1.0 / (1.0 / score.best_rate + 1.0 / learn.best_rate),
            ),
        }
        for kind, (river_median, river_best) in baselines.items():
            for threads in thread_counts:
                ours = find(workloads, FULL_PATH, threads)
                rows.append(
                    {
                        "threads": threads,
                        "scaled": scaled,
                        "river_kind": kind,
                        "river_median_records_per_s": river_median,
                        "river_best_records_per_s": river_best,
                        "median_ratio": ours.median_rate / river_median,
                        "best_ratio": ours.best_rate / river_best,
                    }
                )
    return rows


def print_report(
    workloads: list[Workload],
    rows: list[dict[str, Any]],
    stages: dict[int, dict[str, float]],
    args: argparse.Namespace,
) -> None:
    header = (
        f"{'workload':<42} {'threads':>7} {'batch':>6} {'records':>8} "
        f"{'best/s':>11} {'median/s':>11}"
    )
    print()
    print(header)
    print("-" * len(header))
    for w in workloads:
        threads = "-" if w.threads is None else str(w.threads)
        batch = "-" if w.batch_size is None else str(w.batch_size)
        print(
            f"{w.name:<42} {threads:>7} {batch:>6} {w.n_records:>8,} "
            f"{w.best_rate:>11,.0f} {w.median_rate:>11,.0f}"
        )

    for threads, per_stage in stages.items():
        print()
        total_us = sum(per_stage.values())
        print(f"full path by stage, batch {args.batch_size}, {threads} thread(s), best pass:")
        for stage, us in per_stage.items():
            print(f"  {stage:<10} {us:8.3f} us/record {100 * us / total_us:6.1f} %")

    print()
    header = f"{'ours (full path) / river':<54} {'river/s':>9} {'median':>8} {'best':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        label = (
            f"{row['threads']} thread(s) / "
            f"{river_label(row['scaled']).removeprefix('river: ')} {row['river_kind']}"
        )
        print(
            f"{label:<54} {row['river_median_records_per_s']:>9,.0f} "
            f"{row['median_ratio']:>7.1f}x {row['best_ratio']:>7.1f}x"
        )

    print()
    for row in rows:
        if row["scaled"] and row["river_kind"] == "score_one":
            verdict = "meets" if row["median_ratio"] >= GOAL_RATIO else "is below"
            print(
                f"full path with {row['threads']} thread(s) vs HST + MinMaxScaler score_one: "
                f"{row['median_ratio']:.1f}x (median), which {verdict} the "
                f"{GOAL_RATIO:.0f}x goal"
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, help="score with this model bundle instead of training one"
    )
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument(
        "--train-records",
        type=int,
        default=10_000,
        help="train on the first N records (0: all; default 10000)",
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="scoring batch (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument(
        "--latency-records",
        type=int,
        default=1000,
        help="records scored one at a time for the batch-1 figure (0: skip; default 1000)",
    )
    parser.add_argument(
        "--river-records",
        type=int,
        default=20_000,
        help="records for the river baseline (default 20000)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "repeats", "river_records"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("warmup", "latency_records"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if 0 < args.train_records < 10 or args.train_records < 0:
        parser.error("--train-records must be 0 (all) or >= 10 (one record per cluster)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    default_threads = torch.get_num_threads()
    thread_counts = sorted({default_threads, 1}, reverse=True)
    load_before = load_average()

    records = load_dataset("shuttle").records
    print(f"Shuttle: {len(records):,} records; torch threads by default: {default_threads}")
    if load_before is not None and load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_before[0]} on {os.cpu_count()} CPUs: other processes "
            "compete for the cores; figures (multi-threaded ones most) will be low and noisy"
        )
    detector = get_detector(records, args)

    workloads: list[Workload] = []
    for threads in thread_counts:
        workloads += our_workloads(detector, records, args, threads)
    river_records = records[: args.river_records]
    for scaled in (True, False):
        workloads += river_workloads(river_records, scaled=scaled)
    print(f"timing {len(workloads)} workloads, {args.warmup} + {args.repeats} rounds ...")
    run_rounds(workloads, repeats=args.repeats, warmup=args.warmup)
    stages = {
        threads: stage_breakdown(detector, records, args.batch_size, threads, STAGE_PASSES)
        for threads in thread_counts
    }
    torch.set_num_threads(default_threads)

    rows = ratios(workloads, thread_counts)
    print_report(workloads, rows, stages, args)
    elapsed = time.perf_counter() - started
    load_after = load_average()
    print(f"total run time {elapsed:.1f} s; load average before {load_before}, after {load_after}")

    if args.json is not None:
        report = {
            "machine": {
                **machine_info(default_threads),
                "load_average_before": load_before,
                "load_average_after": load_after,
            },
            "settings": {
                key: str(value) if isinstance(value, Path) else value
                for key, value in vars(args).items()
            },
            "n_records": len(records),
            "detector": {
                "config": detector.config.to_dict(),
                "model_config": detector.model.config.to_dict(),
            },
            "workloads": [w.to_dict() for w in workloads],
            "stage_us_per_record": {str(threads): v for threads, v in stages.items()},
            "ratios": rows,
            "goal_ratio": GOAL_RATIO,
            "seconds": elapsed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
