"""`flexemr update --redis URL --stream NAME --group G --spec CLUSTER.json`: apply row updates from
a Redis Stream as they come (`flexemr.updates.redis_stream`), until SIGINT or SIGTERM; with
`--metrics-port`, serve the update metrics (lag, rate) on 127.0.0.1 for Prometheus."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry

from flexemr.updates.metrics import UpdateMetrics
from flexemr.updates.redis_stream import StreamConfig, StreamConsumer
from flexemr.updates.serving_updater import ServingUpdater


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis", metavar="URL", help="consume a Redis Stream instead of a file (redis://...)"
    )
    parser.add_argument("--stream", help="with --redis: the stream's key")
    parser.add_argument("--group", help="with --redis: the consumer group (created at the stream's start)")
    parser.add_argument(
        "--consumer",
        default=StreamConfig.consumer,
        help="with --redis: its name; keep it across restarts",
    )
    parser.add_argument(
        "--batch", type=int, default=StreamConfig.batch, help="with --redis: entries applied as one version"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="with --redis: serve /metrics on 127.0.0.1 (0: any port)"
    )


def run_stream(args: argparse.Namespace, serving: Callable[[], ServingUpdater]) -> int:
    """Consume the stream into the servers `serving()`'s updater follows (the serving version's)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s update %(levelname)s: %(message)s")
    if not (args.stream and args.group):
        raise ValueError("--redis needs --stream and --group")
    config = StreamConfig(args.redis, args.stream, args.group, args.consumer, args.batch)
    registry = CollectorRegistry()
    metrics = UpdateMetrics(registry)
    if args.metrics_port is not None:
        server, _ = prometheus_client.start_http_server(args.metrics_port, "127.0.0.1", registry)
        print(f"metrics: http://127.0.0.1:{server.server_port}/metrics", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    updater = serving()
    consumer = StreamConsumer(config, lambda: updater.model, updater.apply, metrics)
    try:
        consumer.ensure_group()
        print(f"consuming {config.stream} as {config.group}/{config.consumer}", flush=True)
        consumer.run(stop)
    finally:
        consumer.close()
        updater.close()
    print(f"stopped: {consumer.applied_entries} entries applied", flush=True)
    return 0
