"""``prodrep`` command line: each subcommand is a thin call into one job module.

A job module exposes a :class:`common.command.Command` (flags generated from its config class, and
the function that runs it). Modules are imported lazily so ``prodrep --help`` is fast and a Ray-only
machine needs no Spark.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from common.command import Command, configure_logging, exit_process, run_guarded

# subcommand -> (module, one-line help); the module's Command is COMMAND unless COMMAND_ATTRS names it
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
    "evaluate": ("prodrep.evaluate", "basket completion, cold start, probe, perplexity vs baselines"),
    "pipeline": ("prodrep.pipeline", "run every stage in order (make demo)"),
}
COMMAND_ATTRS = {"similar": "SIMILAR", "search": "SEARCH"}


def get_command(name: str) -> Command:
    """The :class:`Command` behind ``prodrep <name>`` (imports its module)."""
    module_name = COMMANDS[name][0]
    return getattr(importlib.import_module(module_name), COMMAND_ATTRS.get(name, "COMMAND"))


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``prodrep`` parser. Only ``command``'s module is imported (so one stage's heavy or missing
    dependencies never break another stage's command); the others are listed with their help."""
    parser = argparse.ArgumentParser(prog="prodrep", description="Product representations on Spark + Ray + Delta.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        cmd = get_command(name)
        cmd.configure(p)
        p.set_defaults(_runner=cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prodrep`` console script; returns the process exit code."""
    from_command_line = argv is None  # console script / python -m: end the process (see exit_process)
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    configure_logging(args.verbose)
    code = run_guarded(args._runner, args)
    if from_command_line:
        exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
