"""Console output that reads well both live and in a log file.

On a terminal, progress bars redraw in place; in a file (CI, ``spark-submit`` logs, ``make demo > log``)
every redraw would be a new line, so there they are off and each stage prints one line per step
instead. Also filters Ray-internal warnings that tell the user nothing (see :data:`NOISE`).
"""

from __future__ import annotations

import logging
import sys
import time

# (logger name, message prefix) of warnings that say nothing actionable. Ray Train's placement-group
# cleaner polls the State API, which lives in the dashboard; local mode runs without the dashboard (it
# costs memory and a CPU on a small machine), so every poll warns -- harmless: the cleaner only frees a
# crashed controller's resources, and a local Ray dies with the driver anyway.
NOISE: tuple[tuple[str, str], ...] = (
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner", "Failed to query Ray Train Controller actor state"),
    # once per Ray process: says how to turn on what we turned off on purpose (not a terminal)
    ("ray.data._internal.progress", "Progress bars disabled"),
    # Ray Train echoes every ray.train.report() of every rank in full; the trainers log their own
    # one-line summary per epoch / eval on rank 0 (this logger is named after its file by Ray)
    ("file:ray.train.v2._internal.execution.context", "Reporting training result"),
    ("ray.data._internal.datasource.parquet_datasource", "Estimated parquet"),
    # Ray Data logs three lines per dataset run (start, plan, finished); the "finished" one, with its
    # time, is the one line per step a log needs
    ("ray.data._internal.execution.streaming_executor", "Starting execution of Dataset"),
    ("ray.data._internal.execution.streaming_executor", "Execution plan of Dataset"),
    # py4j logs this on the root logger, with a traceback, when a callback connection to Spark's
    # gateway was reset (Ray's start-up beside a live SparkSession does it); nothing is lost
    ("", "Exception while sending command"),
)
# (category, message regex) of Python warnings with nothing to act on:
# - torch's autograd-aware all_gather (InfoNCE needs the gradient through the gather) is deprecated in
#   favour of a private API; it still works in the pinned torch, and the warning repeats every batch;
# - Ray Data's own internals pass a deprecated option (exclude_resources) to themselves.
WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"torch\.distributed\.nn\.functional\.all_gather is deprecated"),
    (Warning, r"`ExecutionOptions\.exclude_resources` is deprecated"),
)


def interactive() -> bool:
    """Whether stderr is a terminal (live progress bars make sense)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def tqdm_disable(enabled: bool = True) -> bool | None:
    """tqdm's ``disable`` argument: ``True`` when off, else ``None`` = "off unless a terminal"."""
    return True if not enabled else None


class _DropNoise(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _logger_name(name: str) -> str:
    """``file:<module>`` names the logger a module created with ``getLogger(__file__)``."""
    if not name.startswith("file:"):
        return name
    import importlib.util

    spec = importlib.util.find_spec(name[5:])
    return spec.origin if spec is not None and spec.origin else name[5:]


def install_log_filters() -> None:
    """Drop the :data:`NOISE` warnings in this process (idempotent). Also used as Ray's
    ``worker_process_setup_hook``, since the warnings are raised inside Ray's own actors."""
    import warnings

    for category, message in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # py4j logs every closed callback connection at INFO, with a traceback when Spark's gateway has
    # already gone (e.g. while Ray starts beside it): nothing for the user
    logging.getLogger("py4j").setLevel(logging.WARNING)
    for name, prefix in NOISE:
        logger = logging.getLogger(_logger_name(name))
        if not any(isinstance(f, _DropNoise) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropNoise(prefix))


def configure_ray_output() -> None:
    """Ray Data progress bars only on a terminal; in a log, Ray Data's one-line-per-dataset summaries remain."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = interactive()
    install_log_filters()


class Heartbeat:
    """Progress of a loop inside a Spark or Ray worker as log lines: at most one every ``every_s``
    seconds, plus the ones forced at milestones (an eval, an epoch's end). A worker's output reaches
    the user line by line, so a redrawing bar there is one line per redraw whether or not the driver
    has a terminal. Silent when not ``enabled`` (e.g. every rank but 0)."""

    def __init__(self, logger: logging.Logger, every_s: float = 30.0, enabled: bool = True) -> None:
        self.logger, self.every_s, self.enabled = logger, every_s, enabled
        self._last = time.perf_counter()

    def beat(self, msg: str, *args: object, force: bool = False) -> bool:
        """Log ``msg % args`` if forced or ``every_s`` has passed since the last line; True if logged."""
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < self.every_s):
            return False
        self.logger.info(msg, *args)
        self._last = now
        return True
