"""``stream-l2ae retrain``: registered through the ``stream_l2ae.commands`` entry point."""

from __future__ import annotations

import argparse


def cmd_retrain(args: argparse.Namespace) -> int:
    from .job import retrain, watch_drift
    from .settings import load_retrain_settings

    kafka = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else None
    settings = load_retrain_settings(
        args.config,
        input_topics=args.topics,
        data=args.data,
        model_dir=args.model_dir,
        last_n=args.last_n,
        since_s=args.since,
        margin=args.margin,
        kafka=kafka,
    )
    if args.on_drift:
        watch_drift(settings, progress=not args.quiet)
        return 0
    retrain(settings, progress=not args.quiet)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="train on the newest window, gate, publish a new version")
    p.add_argument("--config", help="TOML config file ([retrain], [kafka], [model], [detector])")
    p.add_argument("--bootstrap-servers")
    p.add_argument("--topics", help="comma-separated input topics")
    p.add_argument("--data", help="train on this file (JSONL/NPZ) instead of the topics")
    p.add_argument("--model-dir")
    p.add_argument("--last-n", type=int, help="newest N records of the topics")
    p.add_argument("--since", type=float, help="records newer than this many seconds")
    p.add_argument("--margin", type=float, help="how much worse a candidate may be")
    p.add_argument(
        "--on-drift",
        action="store_true",
        help="run until stopped, retraining when a daemon reports drift",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_retrain)
