"""The ``stream-l2ae`` command line: train, evaluate, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import load_config
from .datasets import BUILTIN_DATASETS, Dataset, load_dataset
from .detector import DetectorConfig, L2AEDetector
from .device import configure_threads
from .errors import StreamL2AEError
from .evaluation import (
    average_precision,
    clustering_accuracy,
    plot_report,
    precision_recall_at,
    roc_auc,
)
from .training import is_main_process

log = logging.getLogger("stream_l2ae")

SCORING_BATCH = 8192


def _detector_config(args: argparse.Namespace) -> DetectorConfig:
    settings = dict(load_config(getattr(args, "config", None))["detector"])
    flags = {
        "epochs": args.epochs,
        "n_clusters": args.clusters,
        "alert_rate": args.alert_rate,
        "seed": args.seed,
        "device": args.device,
    }
    settings.update({k: v for k, v in flags.items() if v is not None})
    if args.no_robust:
        settings["robust"] = False
    if args.no_l2:
        settings["l2_normalize"] = False
    return DetectorConfig.from_dict(settings)


def _label_kind(y: np.ndarray | None) -> str | None:
    if y is None or len(y) == 0:
        return None
    classes = set(np.unique(y).tolist())
    if classes == {0, 1}:
        return "anomaly"
    return "class" if len(classes) > 2 else None


def _score_dataset(detector: L2AEDetector, data: Dataset) -> dict[str, Any]:
    """Score ``data`` in batches; returns aligned arrays and the rejected records."""
    scores, clusters, indices, rejected = [], [], [], []
    n = len(data)
    for start in range(0, n, SCORING_BATCH):
        stop = min(start + SCORING_BATCH, n)
        chunk = data.records[start:stop] if data.records is not None else data.X[start:stop]
        result = detector.score_batch(chunk)
        scores.append(result.score)
        clusters.append(result.cluster)
        indices.append(result.indices + start)
        rejected += [(r.index + start, r.error) for r in result.rejected]
    return {
        "score": np.concatenate(scores) if scores else np.empty(0),
        "cluster": np.concatenate(clusters) if clusters else np.empty(0, int),
        "indices": np.concatenate(indices) if indices else np.empty(0, int),
        "rejected": rejected,
    }


def evaluate_detector(
    detector: L2AEDetector, data: Dataset, report: str | Path | None = None
) -> dict[str, Any]:
    """Metrics of ``detector`` on ``data``: the object ``stream-l2ae evaluate --json`` prints."""
    started = time.perf_counter()
    scored = _score_dataset(detector, data)
    seconds = time.perf_counter() - started
    score, cluster = scored["score"], scored["cluster"]
    threshold = float(detector.threshold.value)
    alerts = score > threshold
    out: dict[str, Any] = {
        "model_version": getattr(detector, "version", None),
        "data": data.name,
        "n": len(data),
        "n_scored": int(len(score)),
        "n_rejected": len(scored["rejected"]),
        "rejected_reasons": dict(Counter(err.reason for _, err in scored["rejected"])),
        "threshold": threshold,
        "n_alerts": int(alerts.sum()),
        "alert_rate": float(alerts.mean()) if len(score) else 0.0,
        "score_quantiles": {str(q): float(np.quantile(score, q)) for q in (0.5, 0.9, 0.99)}
        if len(score)
        else {},
        "records_per_second": len(data) / max(seconds, 1e-9),
    }
    y = data.y[scored["indices"]] if data.y is not None else None
    kind = _label_kind(y)
    if kind == "anomaly":
        out["auc"] = roc_auc(y, score)
        out["average_precision"] = average_precision(y, score)
        precision, recall = precision_recall_at(y, alerts)
        out["precision"], out["recall"] = precision, recall
    elif kind == "class":
        out["clustering_acc"] = clustering_accuracy(y, cluster)
    if report is not None:
        plot_report(
            report,
            scores=score,
            threshold=threshold,
            cluster_labels=cluster,
            y_true=y if kind == "anomaly" else None,
            title=f"stream-l2ae {out['model_version']} on {data.name}",
        )
        out["report"] = str(report)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    config = _detector_config(args)
    data = load_dataset(args.data, label_field=args.label_field, limit=args.limit)
    print(f"training on {data.name}: {len(data):,} records", file=sys.stderr)
    detector = L2AEDetector(config, progress=not args.quiet).fit(data)
    if not is_main_process():
        return 0  # another rank of a torchrun job: rank 0 saves the same model
    metrics: dict[str, Any] = {}
    if _label_kind(data.y) == "anomaly":
        # Labels are only reported on, never used by fit.
        metrics["training_auc"] = roc_auc(data.y, detector.score_samples(data))
    out = args.out or load_config(args.config)["model"]["dir"]
    bundle = detector.save(
        out,
        metadata={"data": data.description, "metrics": metrics},
        keep=args.keep if args.keep is not None else load_config(args.config)["model"]["keep"],
    )
    report = detector.training_report_
    summary = {
        "version": bundle.version,
        "path": str(bundle.path),
        "n_records": report["n_records"],
        "n_suspects": report.get("n_suspects"),
        "threshold": report["threshold"],
        "seconds": round(report["seconds"], 1),
        "device": report["device"],
        **metrics,
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    detector = L2AEDetector.load(args.model, device=args.device or "auto")
    data = load_dataset(args.data, label_field=args.label_field, limit=args.limit)
    result = evaluate_detector(detector, data, report=args.report)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.offline:
        print(
            "the streaming demo needs the `consumers` package (pip install -e .); "
            "run `stream-l2ae demo --offline` for the in-process one",
            file=sys.stderr,
        )
        return 2
    from .demo import run_offline_demo

    run_offline_demo(epochs=args.epochs, alert_rate=args.alert_rate, progress=not args.quiet)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .paper import run_paper_benchmark

    run_paper_benchmark(
        epochs=args.epochs,
        json_path=args.json,
        train_limit=args.train_limit,
        digits=[int(d) for d in args.digits.split(",")] if args.digits else None,
        anomaly_model=args.anomaly_model,
        device=args.device or "auto",
        progress=not args.quiet,
        tables=tuple(args.tables.split(",")),
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """``stream-l2ae models list|show|rollback``: inspect a model directory, move ``LATEST``."""
    from .registry import describe_versions, format_table, rollback, show_version

    root = args.dir or load_config(args.config)["model"]["dir"]
    if args.models == "list":
        rows = describe_versions(root)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif rows:
            print(format_table(rows))
        else:
            print(f"no model versions in {root}", file=sys.stderr)
    elif args.models == "show":
        print(json.dumps(show_version(root, args.version), indent=2))
    else:
        from .bundle import latest_version

        before = latest_version(root)
        after = rollback(root, to=args.to)
        note = " (unchanged)" if after == before else ""
        print(f"LATEST: {before} -> {after}{note}")
    return 0


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, help="training epochs (default 20)")
    p.add_argument("--clusters", type=int, help="k of k-means (default 10)")
    p.add_argument("--alert-rate", type=float, help="target share of alerts (default 0.01)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-robust", action="store_true", help="one pass, as in the paper")
    p.add_argument("--no-l2", action="store_true", help="turn the l2 normalization off")


def build_parser() -> argparse.ArgumentParser:
    sources = ", ".join(BUILTIN_DATASETS)
    parser = argparse.ArgumentParser(
        prog="stream-l2ae",
        description="Unsupervised anomaly detection with l2-normalized auto-encoder embeddings.",
    )
    parser.add_argument("--version", action="version", version=f"stream-l2ae {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True)
    data_help = f"built-in data set ({sources}), a .jsonl file of records, or an .npz with X [y]"

    p = sub.add_parser("train", help="train a model and save it as a new bundle version")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", help="model directory (default: [model] dir of the config)")
    p.add_argument("--config", help="TOML config file (see README)")
    p.add_argument("--label-field", help="field holding labels, removed before training")
    p.add_argument("--limit", type=int, help="use the first N records only")
    p.add_argument("--keep", type=int, help="number of model versions to keep")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_training_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a data set with a model and print metrics")
    p.add_argument("--model", required=True, help="bundle directory or model root (LATEST)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--label-field", help="field holding labels")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", help="write a PNG report (ROC, score histogram, clusters)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="train on Shuttle and score the rest of it as a stream")
    p.add_argument("--offline", action="store_true", help="no Kafka: score in process")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--alert-rate", type=float, default=0.05)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("paper", help="reproduce the paper's MNIST tables")
    b.add_argument("--epochs", type=int, default=2)
    b.add_argument("--json", help="write the results to this JSON file")
    b.add_argument("--train-limit", type=int, help="train on the first N images only")
    b.add_argument("--digits", help="comma-separated anomaly digits (default all ten)")
    b.add_argument("--anomaly-model", choices=("conv", "dense"), default="conv")
    b.add_argument("--tables", default="clustering,anomaly", help="tables to reproduce")
    b.add_argument("--device")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    p = sub.add_parser("models", help="list, inspect and roll back the versions of a model dir")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", help="model directory (default: [model] dir of the config)")
    where.add_argument("--config", help="TOML config file (see README)")
    models = p.add_subparsers(dest="models", required=True)
    m = models.add_parser("list", parents=[where], help="one line per version, LATEST marked")
    m.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    m = models.add_parser("show", parents=[where], help="print a version's manifest as JSON")
    m.add_argument("version", nargs="?", help="version name (default: the one LATEST names)")
    m = models.add_parser(
        "rollback", parents=[where], help="point LATEST at the previous (or a named) version"
    )
    m.add_argument("--to", help="version to put in service (default: the one before LATEST)")
    p.set_defaults(func=cmd_models)
    _add_plugin_commands(sub)
    return parser


#: Packages that build on the library (the Kafka daemon, the retraining job) add subcommands
#: through this entry-point group, so that the library itself never imports them.
COMMAND_ENTRY_POINTS = "stream_l2ae.commands"


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=COMMAND_ENTRY_POINTS):
        try:
            register = entry_point.load()
        except ImportError as exc:
            log.debug("command plugin %s unavailable: %s", entry_point.name, exc)
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        configure_threads(args.threads)
        return args.func(args)
    except StreamL2AEError as exc:
        print(f"stream-l2ae: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stream-l2ae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
