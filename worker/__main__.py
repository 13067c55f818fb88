"""``python -m worker``: a training worker (what ``ppml worker`` runs)."""

from __future__ import annotations

import argparse
import os

from ppml.config import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="ppml worker")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()
    settings = get_settings()
    from ppml.telemetry import configure_logging

    configure_logging(settings.log_format, args.loglevel.upper())
    from worker.app import celery_app

    pool = "solo" if args.concurrency == 1 else "prefork"
    celery_app.worker_main(
        [
            "worker",
            f"--pool={pool}",
            f"--concurrency={args.concurrency}",
            f"--loglevel={args.loglevel}",
            "-Q",
            settings.worker.queue,
            "-n",
            f"ppml-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )


if __name__ == "__main__":
    main()
