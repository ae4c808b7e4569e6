"""``prodrep`` command line: each subcommand is a thin call into one job module.

A job module exposes ``configure_parser(parser)`` (adds its flags) and ``run_from_args(args) -> int``.
Modules are imported lazily so ``prodrep --help`` is fast and a Ray-only machine needs no Spark.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from common.config import ConfigError, InputError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("spark_jobs.ingest", "validate raw events + catalog into Delta (bad rows -> quarantine)"),
    "sessions": ("spark_jobs.sessions", "events -> sessions with train/val/test splits"),
    "cooccur": ("spark_jobs.cooccurrence", "train sessions -> item-item co-occurrence matrix"),
    "tokenize": ("spark_jobs.tokenize_text", "catalog text -> tokenizer + tokenized text shards"),
    "train-mlm": ("ray_train.mlm", "masked-language-model pretraining on Ray Train"),
    "train-items": ("ray_train.items", "item embeddings (id | fusion) on Ray Train"),
    "embed": ("spark_jobs.embed_catalog", "embed the whole catalog with a Spark UDF"),
    "neighbors": ("spark_jobs.neighbors", "top-K nearest neighbours for every item (faiss)"),
    "similar": ("spark_jobs.lookup", "print the most similar items to an item id"),
    "search": ("spark_jobs.lookup", "print the items closest to a free-text query"),
    "evaluate": ("common.evaluation.cli", "basket completion, cold start, probe, perplexity vs baselines"),
    "pipeline": ("common.pipeline", "run every stage in order (make demo)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``prodrep`` parser. Only ``command``'s module is imported (so one stage's heavy or missing
    dependencies never break another stage's command); the others are listed with their help."""
    parser = argparse.ArgumentParser(prog="prodrep", description="Product representations on Spark + Ray + Delta.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        module = importlib.import_module(module_name)
        key = name.replace("-", "_")
        configure = getattr(module, f"configure_{key}_parser", None) or module.configure_parser
        configure(p)
        runner = getattr(module, f"run_{key}_from_args", None) or module.run_from_args
        p.set_defaults(_runner=runner)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prodrep`` console script; returns the process exit code."""
    from_command_line = argv is None  # console script / python -m: end the process (see exit_process)
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    code = run_guarded(args._runner, args)
    if from_command_line:
        exit_process(code)
    return code


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
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def job_main(module_name: str, prog: str, argv: list[str] | None = None) -> int:
    """The thin ``main()`` of a job file (``spark-submit spark_jobs/<job>.py ...``,
    ``python -m ray_train.<job> ...``): same flags and error handling as ``prodrep <command>``."""
    module = importlib.import_module(module_name)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog=prog, description=(module.__doc__ or "").strip().splitlines()[0])
    module.configure_parser(parser)
    code = run_guarded(module.run_from_args, parser.parse_args(argv))
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


if __name__ == "__main__":
    sys.exit(main())
