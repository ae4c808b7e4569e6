"""``prodrep pipeline``: every stage in order, with defaults (this is ``make demo``).

Each stage is the same ``run`` the stage's own command calls; this module only chains them and prints
what each produced. Spark stages share one SparkSession; Ray stages start (or join) one Ray cluster.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from typing import Any, Callable

from common.config import build_config, parse_overrides

log = logging.getLogger(__name__)

STAGES = ("ingest", "sessions", "cooccur", "tokenize", "train-mlm", "train-items", "embed", "neighbors", "evaluate")


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _timed(name: str, fn: Callable[[], Any]) -> Any:
    _banner(name)
    t0 = time.perf_counter()
    out = fn()
    print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
    return out


def configure_parser(p: argparse.ArgumentParser) -> None:
    from spark_jobs.ingest import configure_parser as ingest_flags

    ingest_flags(p)
    p.add_argument("--skip", default="", help=f"comma list of stages to skip: {','.join(STAGES)}")
    p.add_argument("--only", default="", help="comma list of stages to run (default: all)")
    p.add_argument("--test-from", default=None, help="sessions: first day of the test split (ISO date)")
    p.add_argument("--val-from", default=None, help="sessions: first day of the val split (ISO date)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="train on GPU workers")
    p.add_argument("--report", default=None, help="evaluation report directory (default <lake>/reports/latest)")


def run_from_args(args: argparse.Namespace) -> int:
    from spark_jobs.ingest import config_from_args as ingest_config

    skip = {s for s in args.skip.split(",") if s}
    only = {s for s in args.only.split(",") if s}
    unknown = (skip | only) - set(STAGES)
    if unknown:
        from common.config import ConfigError

        raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
    wanted = [s for s in STAGES if s not in skip and (not only or s in only)]
    ingest_cfg = ingest_config(args)
    lake = ingest_cfg.lake
    if ingest_cfg.dataset == "online-retail" and args.test_from is None:
        args.test_from = "2011-10-01"  # the documented evaluation split for this dataset

    from common.spark import get_spark

    t0 = time.perf_counter()
    spark = get_spark("prodrep-pipeline") if any(s in wanted for s in ("ingest", "sessions", "cooccur", "tokenize", "embed", "neighbors")) else None
    if "ingest" in wanted:
        from spark_jobs import ingest

        summary = _timed("ingest", lambda: ingest.run(spark, ingest_cfg))
        print(ingest.format_summary(summary))
    for stage in wanted[1:] if wanted and wanted[0] == "ingest" else wanted:
        runner = STAGE_RUNNERS.get(stage)
        if runner is None:
            log.warning("stage %s is not available in this build; skipping", stage)
            continue
        _timed(stage, lambda: runner(spark, lake, args))
    print(f"\npipeline finished in {time.perf_counter() - t0:.0f}s; lake at {lake}")
    return 0


# Stage runners: (spark, lake, args) -> None; each prints what the demo shows for its stage.
STAGE_RUNNERS: dict[str, Callable[[Any, str, argparse.Namespace], None]] = {}
