"""The one SparkSession factory.

Jobs never build a session themselves: entry points (CLI, ``main()`` under spark-submit, tests) call
:func:`get_spark`. Under spark-submit the master and resources come from the submit command; locally we
default to ``local[2]`` with settings that suit one small machine.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

# faiss' loader logs "ModuleNotFoundError('faiss.swigfaiss_avx512')" at INFO when it falls back to its
# AVX2 build: expected on most CPUs, alarming in job logs (prodrep's jobs log at INFO).
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

LOCAL_DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.shuffle.partitions": "8",
    "spark.default.parallelism": "4",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.adaptive.enabled": "true",
    "spark.python.worker.reuse": "true",
    "spark.sql.ansi.enabled": "false",
}

# Applied under spark-submit too, unless the submit command / spark-defaults set them: partition counts
# follow the data (AQE merges small shuffle partitions by size, not down to default parallelism only),
# so a 4k-row catalog is not written as 200 files. ANSI mode (Spark 4's default) is left as it is.
CLUSTER_DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.adaptive.coalescePartitions.enabled": "true",
    "spark.sql.adaptive.coalescePartitions.parallelismFirst": "false",
    "spark.sql.adaptive.advisoryPartitionSizeInBytes": "32m",
    # jobs persist() intermediate DataFrames: without this AQE keeps the 200 shuffle partitions under a cache
    "spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": "true",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def get_spark(app_name: str = "prodrep", master: str | None = None, conf: Mapping[str, str] | None = None):
    """Return the active SparkSession, creating it (and registering the Delta data source) if needed.

    ``master`` defaults to ``$PRODREP_SPARK_MASTER`` or ``local[2]`` when not launched by spark-submit.
    ``spark.driver.memory`` defaults to ``$PRODREP_DRIVER_MEMORY`` or 4g (it must be set before the JVM
    starts, so it is only honoured for a new session).
    """
    # Executors must run the same interpreter (and venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        from common.delta_source import register

        register(active)
        return active

    builder = SparkSession.builder.appName(app_name)
    launched_by_submit = "spark.master" in os.environ.get("PYSPARK_SUBMIT_ARGS", "") or os.environ.get(
        "SPARK_ENV_LOADED"
    )
    local = bool(master or not launched_by_submit)
    if local:
        builder = builder.master(master or os.environ.get("PRODREP_SPARK_MASTER", "local[2]"))
        builder = builder.config("spark.driver.memory", os.environ.get("PRODREP_DRIVER_MEMORY", "4g"))
        for k, v in LOCAL_DEFAULTS.items():
            builder = builder.config(k, v)
    # The console progress bar redraws in place: live on a terminal, hundreds of lines in a log file
    # (also under spark-submit; an explicit ``conf`` entry still wins).
    from common.progress import interactive

    builder = builder.config("spark.ui.showConsoleProgress", "true" if interactive() else "false")
    for k, v in (conf or {}).items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    if not local:
        submitted = spark.sparkContext.getConf()
        for k, v in CLUSTER_DEFAULTS.items():
            if not submitted.contains(k) and k not in (conf or {}):
                spark.conf.set(k, v)
    spark.sparkContext.setLogLevel(os.environ.get("PRODREP_SPARK_LOG_LEVEL", "WARN"))
    from common.delta_source import register

    register(spark)
    return spark
