"""``stream-l2ae serve``, ``produce`` and the streaming ``demo``: the Kafka subcommands.

They are registered through the ``stream_l2ae.commands`` entry point, so the library's CLI
offers them without ever importing Kafka itself.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stream_l2ae.datasets import load_dataset

log = logging.getLogger("stream_l2ae.consumers")


def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon import ScoringDaemon
    from .settings import load_serve_settings

    kafka = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else None
    settings = load_serve_settings(
        args.config,
        input_topics=args.topics,
        group_id=args.group,
        model_dir=args.model_dir,
        checkpoint_dir=args.checkpoint_dir,
        metrics_port=args.metrics_port,
        batch_size=args.batch_size,
        alerts_topic=args.alerts_topic,
        scores_topic=args.scores_topic,
        dead_letter_topic=args.dead_letter_topic,
        replica_id=args.replica_id,
        threshold=args.threshold,
        kafka=kafka,
    )
    if not args.verbose:
        logging.getLogger("stream_l2ae").setLevel(logging.INFO)
    daemon = ScoringDaemon(settings)
    daemon.install_signal_handlers()
    return daemon.run()


def cmd_produce(args: argparse.Namespace) -> int:
    from .kafka_io import ensure_topics
    from .produce import produce_dataset

    data = load_dataset(args.data, label_field=args.label_field)
    settings = {"bootstrap_servers": args.bootstrap_servers}
    if args.partitions:
        ensure_topics(settings, {args.topic: args.partitions})
    sent = produce_dataset(
        settings,
        data,
        args.topic,
        rate=args.rate,
        limit=args.limit,
        offset=args.offset,
        progress=not args.quiet,
    )
    print(f"sent {sent:,} records to {args.topic}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.offline:
        from stream_l2ae.demo import run_offline_demo

        run_offline_demo(epochs=args.epochs, alert_rate=args.alert_rate, progress=not args.quiet)
        return 0
    from .demo import run_streaming_demo

    run_streaming_demo(
        bootstrap_servers=args.bootstrap_servers,
        bundle=args.bundle,
        epochs=args.epochs,
        alert_rate=args.alert_rate,
        rate=args.rate,
        train_fraction=args.train_fraction,
        progress=not args.quiet,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the scoring daemon on Kafka topics")
    p.add_argument("--config", help="TOML config file ([serve] and [kafka] tables)")
    p.add_argument("--bootstrap-servers", help="Kafka brokers, host:port[,host:port]")
    p.add_argument("--topics", help="comma-separated input topics")
    p.add_argument("--group", help="consumer group id")
    p.add_argument("--model-dir", help="model root holding versions/ and LATEST")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--metrics-port", type=int, help="0 picks a free port")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--alerts-topic")
    p.add_argument("--scores-topic", help="also publish every score here")
    p.add_argument("--dead-letter-topic")
    p.add_argument("--replica-id")
    p.add_argument("--threshold", choices=("bundle", "streaming", "spot"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("produce", help="replay a data set into a Kafka topic")
    p.add_argument("--data", required=True, help="shuttle, mnist, digits, a .jsonl or an .npz")
    p.add_argument("--topic", required=True)
    p.add_argument("--bootstrap-servers", default="localhost:9092")
    p.add_argument("--rate", type=float, help="records per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, help="send at most N records")
    p.add_argument("--offset", type=int, default=0, help="skip the first N records")
    p.add_argument("--partitions", type=int, help="create the topic with N partitions first")
    p.add_argument("--label-field")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_produce)

    demo = sub.choices.get("demo")
    if demo is not None:
        demo.add_argument("--bootstrap-servers", help="use this Kafka instead of Tansu")
        demo.add_argument("--bundle", help="use this model instead of training one")
        demo.add_argument("--rate", type=float, help="replay rate, records/s (default: max)")
        demo.add_argument("--train-fraction", type=float, default=0.4)
        demo.set_defaults(func=cmd_demo)
