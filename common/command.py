"""Running one job from a command line: the same flags, error lines and exit codes whether it is
started as ``prodrep <command>`` (:mod:`prodrep.cli`), ``spark-submit spark_jobs/<job>.py`` or
``python -m ray_train.<job>``. Lives in ``common`` so each job file's thin ``main()`` needs nothing
from the app layer."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from common.config import ConfigError, InputError, JobConfig, add_config_flags, config_from_args


@dataclass(frozen=True)
class Command:
    """One job's command line. Its flags are generated from ``config``
    (:func:`common.config.add_config_flags`; ``required`` fields must be given as flags); ``arguments``
    adds the few that are not config fields (positionals, print-only options); ``run(cfg, args)``
    runs the job on the validated config and prints what it made."""

    config: type[JobConfig]
    run: Callable[[Any, argparse.Namespace], int | None]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    required: tuple[str, ...] = ()

    def configure(self, parser: argparse.ArgumentParser) -> None:
        add_config_flags(parser, self.config, self.required)
        if self.arguments is not None:
            self.arguments(parser)

    def parse(self, args: argparse.Namespace) -> Any:
        """The validated config from parsed flags (precedence: :func:`common.config.config_from_args`)."""
        return config_from_args(self.config, args)

    def __call__(self, args: argparse.Namespace) -> int:
        return int(self.run(self.parse(args), args) or 0)


def configure_logging(verbose: bool = False) -> None:
    """The log format of every prodrep command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def stop_ray() -> None:
    """Disconnect from Ray if this process is connected (a local Ray it started shuts down with its workers)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def exit_process(code: int) -> None:
    """End a command-line run with exactly the job's exit code.

    Why: a job that had committed sometimes exited 134 ("terminate called without an active
    exception"): at interpreter exit, C++ static destructors / finalizers run while native threads
    (delta-rs' tokio runtime, Arrow's thread pools, Spark's py4j callback threads) are still
    joinable, and ``std::terminate`` aborts the process. Everything the job promised is durable by
    now (Delta commits are atomic files, stdout/stderr are flushed below), so we stop Spark and Ray
    cleanly and leave with ``os._exit``, which skips that native teardown.
    """
    if "pyspark" in sys.modules:
        from pyspark.sql import SparkSession

        session = SparkSession.getActiveSession()
        if session is not None:
            session.stop()
    stop_ray()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def job_main(command: Command, prog: str, doc: str | None, argv: list[str] | None = None) -> int:
    """The thin ``main()`` of a job file (``spark-submit spark_jobs/<job>.py ...``,
    ``python -m ray_train.<job> ...``): same flags and error handling as ``prodrep <command>``."""
    configure_logging()
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0])
    command.configure(parser)
    code = run_guarded(command, parser.parse_args(argv))
    if argv is None:  # spark-submit / python -m: end the process with the job's code
        exit_process(code)
    return code


def run_guarded(runner, args) -> int:
    """Run a job, turning user errors into one clear line and a non-zero exit code."""
    try:
        return int(runner(args) or 0)
    except (ConfigError, InputError, FileNotFoundError) as e:
        print(f"prodrep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prodrep: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Raised in Spark's driver-side Python worker, it reaches us wrapped: match it by name.
        text = str(e)
        if "DeltaCommitConflict" in type(e).__name__ or "conflicts with a concurrent writer" in text:
            line = next((ln for ln in text.splitlines() if "conflicts with a concurrent writer" in ln), text)
            print(f"prodrep: error: {line.strip()}", file=sys.stderr)
            return 3
        raise
