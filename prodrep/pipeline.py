"""``prodrep pipeline``: every stage in order, with defaults (this is ``make demo``).

Each stage is the same ``run`` the stage's own command calls; this module only chains them and prints
what each produced. Spark stages share one SparkSession; Ray stages start (or join) one Ray cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from common.command import Command, stop_ray
from common.config import ConfigError, build_config, option
from spark_jobs.ingest import IngestConfig

log = logging.getLogger(__name__)

STAGES = ("ingest", "sessions", "cooccur", "tokenize", "train-mlm", "train-items", "embed", "neighbors", "evaluate")


def _banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _timed(name: str, fn: Callable[[], Any], timings: dict[str, float]) -> Any:
    """Run one stage under a banner; record its wall time in ``timings``."""
    _banner(name)
    t0 = time.perf_counter()
    out = fn()
    timings[name] = time.perf_counter() - t0
    print(f"[{name}] done in {timings[name]:.1f}s", flush=True)
    return out


def format_timings(timings: dict[str, float], total: float) -> str:
    """The per-stage wall-time table printed at the end of the pipeline."""
    lines = ["| stage | seconds | share |", "|---|---:|---:|"]
    for name, s in timings.items():
        lines.append(f"| {name} | {s:.1f} | {s / total:.0%} |" if total > 0 else f"| {name} | {s:.1f} | |")
    lines.append(f"| **total** (incl. start-up) | {total:.1f} | |")
    return "\n".join(lines)


@dataclass(frozen=True)
class PipelineConfig(IngestConfig):
    """``prodrep pipeline`` options: the ingest stage's, plus which stages run and the few settings the
    later stages take from the command line (everything else is each stage's default)."""

    skip: tuple[str, ...] = option((), f"stages to skip, from {','.join(STAGES)}")
    only: tuple[str, ...] = option((), "stages to run; none = all")
    test_from: str | None = option(None, "sessions: first day of the test split (ISO date); online-retail: 2011-10-01")
    val_from: str | None = option(None, "sessions: first day of the val split (ISO date)")
    workers: int | None = option(None, "Ray Train workers; unset = 2")
    gpu: bool = option(False, "train on GPU workers")
    report: str = option("", "evaluation report directory; '' = <lake>/reports/evaluation")

    def validate(self) -> None:
        super().validate()
        unknown = (set(self.skip) | set(self.only)) - set(STAGES)
        if unknown:
            raise ConfigError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")

    def ingest(self) -> IngestConfig:
        """The ingest stage's own config (the fields it shares with this one)."""
        return IngestConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(IngestConfig)})


def run(cfg: PipelineConfig) -> int:
    """Run the wanted stages in order; print each one's output and the stage-time table."""
    wanted = [s for s in STAGES if s not in cfg.skip and (not cfg.only or s in cfg.only)]
    ingest_cfg = cfg.ingest()
    lake = ingest_cfg.lake
    if ingest_cfg.dataset == "online-retail" and cfg.test_from is None:
        cfg = dataclasses.replace(cfg, test_from="2011-10-01")  # the documented evaluation split for this dataset

    from common.progress import install_log_filters
    from common.spark import get_spark

    install_log_filters()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    spark = get_spark("prodrep-pipeline") if any(s in SPARK_STAGES for s in wanted) else None
    prefetch = _STATE["prefetch"] = Prefetch(lake, cfg)
    start_after = prefetch_start(wanted)
    spark_done, ray_done = release_after(wanted, SPARK_STAGES), release_after(wanted, RAY_STAGES)
    try:
        if start_after == -1:
            prefetch.start()
        for i, stage in enumerate(wanted):
            runner = STAGE_RUNNERS[stage]

            _timed(stage, lambda: runner(spark, lake, cfg), timings)
            if i == start_after:
                prefetch.start()
            # the later stages do not need the engine: its idle workers (Spark's Python workers holding the
            # encoder, about 1 GB each; Ray's idle workers, 2 GB at 40k items) were most of evaluate's peak
            if i == spark_done and spark is not None:
                spark.stop()
                spark = None
            if i == ray_done:
                stop_ray()
    finally:
        prefetch.stop()
    total = time.perf_counter() - t0
    _banner("stage times")
    print(format_timings(timings, total))
    print(f"\npipeline finished in {total:.0f}s; lake at {lake}")
    return 0


COMMAND = Command(PipelineConfig, lambda cfg, _args: run(cfg))


INPUT_STAGES = ("ingest", "sessions")  # the stages writing what evaluate's gensim fits read
SPARK_STAGES = ("ingest", "sessions", "cooccur", "tokenize", "embed", "neighbors")
RAY_STAGES = ("train-mlm", "train-items")


def release_after(wanted: Sequence[str], engine_stages: Sequence[str]) -> int | None:
    """Index of the stage in ``wanted`` after which the engine that ``engine_stages`` use can stop: the
    last of them, when a stage that does not use it still follows (None: needed to the end, or never)."""
    last = max((i for i, s in enumerate(wanted) if s in engine_stages), default=None)
    return last if last is not None and last < len(wanted) - 1 else None


def prefetch_start(wanted: Sequence[str]) -> int | None:
    """Index of the stage in ``wanted`` after which :class:`Prefetch` starts (-1: before the first),
    or None: no ``evaluate``, or no stage left to overlap with between the inputs and it."""
    if "evaluate" not in wanted:
        return None
    ready = max((i for i, s in enumerate(wanted) if s in INPUT_STAGES), default=-1)
    return ready if wanted.index("evaluate") > ready + 1 else None


class Prefetch:
    """The evaluation's gensim fits, run in a background process while the later stages train.

    They read only ``sessions`` and ``catalog`` and are the slowest part of ``evaluate`` (item2vec
    defaults, tuning grid, tuned fit), so the pipeline starts :func:`prodrep.evaluate.prefetch_main`
    as soon as the stages writing those tables are done (:func:`prefetch_start`); it runs at the lowest
    CPU priority, so it fills the cores that Spark and Ray start-up, I/O and driver work leave idle,
    and caches its fits. ``evaluate`` scores every other method first (mostly single-threaded, so
    the fits keep a core), waits for it only then, and reads the fits from the cache. Nothing starts
    when the fit cache is off."""

    def __init__(self, lake: str, cfg: PipelineConfig) -> None:
        self.lake, self.cfg = lake, cfg
        self.proc: Any = None
        self.t0 = 0.0

    def start(self) -> None:
        eval_cfg = _evaluate_config(self.lake, self.cfg)
        if not eval_cfg.cache:
            return
        import multiprocessing

        from prodrep.evaluate import prefetch_main

        # spawn, not fork: the parent holds a JVM gateway and Ray threads that must not be copied
        self.proc = multiprocessing.get_context("spawn").Process(target=prefetch_main, args=(eval_cfg,), name="evaluate-prefetch",
                                                                 daemon=True)  # fmt: skip
        self.proc.start()
        self.t0 = time.perf_counter()
        print(f"(evaluate's item2vec fits started in the background, pid {self.proc.pid}; evaluate reads them from its cache)",
              flush=True)  # fmt: skip

    def wait(self) -> None:
        """Block until the background fits are done (``evaluate`` refits whatever they did not finish)."""
        if self.proc is None:
            return
        self.proc.join()
        print(f"(background item2vec fits: exit code {self.proc.exitcode}, {time.perf_counter() - self.t0:.0f}s after start)",
              flush=True)  # fmt: skip
        self.proc = None

    def stop(self) -> None:
        """Terminate a still-running prefetch (the pipeline failed or ended before ``evaluate``)."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout=10)
        self.proc = None


# ------------------------------------------------------------------------------------- stage runners
# Each: (spark, lake, cfg) -> None, printing what the demo shows for its stage. Models trained by the
# pipeline are remembered in _STATE so later stages (embed, evaluate) apply them.
_STATE: dict[str, Any] = {"models": {}}  # + "prefetch": this run's Prefetch
# trained by train-items, the main model last. `id` (behaviour-only SGNS) is not trained here any more:
# on Online Retail test it reached Recall@20 0.111, below gensim item2vec (0.139) and far below softmax
# (0.180), which also has ID parts; `prodrep train-items --kind id` still trains it (README "Models").
ITEM_KINDS = ("softmax",)
DEMO_ITEMS = ("WHITE HANGING HEART T-LIGHT HOLDER", "REGENCY CAKESTAND 3 TIER", "JUMBO BAG RED RETROSPOT")


def _ingest(spark, lake: str, cfg: PipelineConfig) -> None:
    from spark_jobs import ingest

    print(ingest.format_summary(ingest.run(spark, cfg.ingest())))


def _sessions(spark, lake: str, cfg: PipelineConfig) -> None:
    from spark_jobs import sessions

    cfg = build_config(sessions.SessionsConfig, None, lake=lake, test_from=cfg.test_from, val_from=cfg.val_from,
                       val_fraction=0.0 if cfg.test_from and not cfg.val_from else None)
    print(sessions.format_summary(sessions.run(spark, cfg)))


def _cooccur(spark, lake: str, cfg: PipelineConfig) -> None:
    from spark_jobs import cooccurrence

    cfg = build_config(cooccurrence.CooccurrenceConfig, None, lake=lake)
    print(cooccurrence.format_summary(cooccurrence.run(spark, cfg)))
    for query in DEMO_ITEMS[:1]:
        try:
            print(cooccurrence.format_top(cooccurrence.top_cooccurring(spark, lake, query, k=5), query))
        except Exception as e:  # an item missing from a user's own dataset is not a failure
            print(f"(no co-occurrence for {query!r}: {e})")


def _tokenize(spark, lake: str, cfg: PipelineConfig) -> None:
    from spark_jobs import tokenize_text as tokenize

    cfg = build_config(tokenize.TokenizeConfig, None, lake=lake)
    print(tokenize.format_summary(tokenize.run(spark, cfg)))


def _train_mlm(spark, lake: str, cfg: PipelineConfig) -> None:
    from ray_train import mlm

    cfg = build_config(mlm.MLMConfig, None, lake=lake, preset="small", max_steps=200, run_name="mlm-demo",
                       restart=True, workers=cfg.workers or 2, gpu=cfg.gpu or None)
    res = mlm.run(cfg)
    print(mlm.format_result(res))
    _STATE["models"]["mlm"] = res["model_dir"]


def _train_items(spark, lake: str, cfg: PipelineConfig) -> None:
    from ray_train import items

    # softmax is the pipeline's model (above every baseline on val, README "Models"); id and fusion stay
    # kinds of their own (bench/bench_items.py), not trained here
    for kind in ITEM_KINDS:
        cfg = build_config(items.ItemsConfig, None, lake=lake, kind=kind, run_name=f"items-{kind}",
                           workers=cfg.workers or 2, gpu=cfg.gpu or None, epochs=3 if kind == "id" else None)
        res = items.run(cfg)
        print(items.format_result(res))
        _STATE["models"][kind] = res["model_dir"]
        # its neighbours are shown by the neighbors stage, from the table (embedding the catalog here
        # for a preview would repeat the embed stage's work on the driver)


def _cold_example(model_dir: str, lake: str) -> str | None:
    """Title of a catalog item the model has no behaviour vector for (never in a train session)."""
    import pyarrow.parquet as pq

    from common.lake import read_pandas
    from common.models import ID_EMBEDDINGS_FILE
    from common.scoring import HEAD_ITEMS_FILE

    cat = read_pandas(lake, "catalog", columns=["item_id", "title"]).sort_values("item_id", kind="stable")
    # the ids alone (fusion's ID vectors / softmax's items with history): no need to load the encoder
    paths = [Path(model_dir) / f for f in (ID_EMBEDDINGS_FILE, HEAD_ITEMS_FILE) if (Path(model_dir) / f).exists()]
    warm = pq.read_table(paths[0], columns=["item_id"]).column(0).to_pylist() if paths else []
    cold = cat[~cat["item_id"].astype(str).isin(set(warm)) & (cat["title"].str.split().str.len() >= 3)]
    return None if cold.empty else str(cold["title"].iloc[0])


def _model_dirs(lake: str) -> list[str]:
    """Models trained in this run, else every exported model in the lake."""
    if _STATE["models"]:
        return list(_STATE["models"].values())
    from common import lake as L

    root = Path(L.artefact_dir(lake, "models"))
    return sorted(str(p.parent) for p in root.glob("*/prodrep.json"))


def _embed(spark, lake: str, cfg: PipelineConfig) -> None:
    from spark_jobs import embed_catalog

    # the main model last: the latest embedding write is what `neighbors` and `similar` use by default
    dirs = sorted(_model_dirs(lake), key=lambda d: ITEM_KINDS[-1] in Path(d).name)
    for model_dir in dirs:
        cfg = build_config(embed_catalog.EmbedConfig, None, lake=lake, model=model_dir)
        print(embed_catalog.format_summary(embed_catalog.run(spark, cfg)))


def _neighbors(spark, lake: str, cfg: PipelineConfig) -> None:
    from spark_jobs import lookup, neighbors

    cfg = build_config(neighbors.NeighborsConfig, None, lake=lake)
    summary = neighbors.run(spark, cfg)
    print(neighbors.format_summary(summary) if hasattr(neighbors, "format_summary") else summary)
    from common import lake as L

    catalog = L.read_pandas(lake, "catalog", columns=["item_id", "title"])
    main_model = next((d for d in _model_dirs(lake) if Path(d).name == f"items-{ITEM_KINDS[-1]}"), None)
    cold = _cold_example(main_model, lake) if main_model else None
    for title in (*DEMO_ITEMS, *([cold] if cold else [])):
        match = catalog[catalog.title == title]
        if match.empty:
            continue
        rows, query_title, version = lookup.similar(lake, match.item_id.iloc[0], k=5)
        note = "; cold: no train history, neighbours from its text alone" if title == cold else ""
        print(f"\nprodrep similar {match.item_id.iloc[0]}  ({query_title}; model {version}{note})")
        print(lookup.format_rows(rows))
    rows, version = lookup.search(lake, "christmas lights", k=5)
    print(f'\nprodrep search "christmas lights"  (model {version})')
    print(lookup.format_rows(rows))


def _evaluate(spark, lake: str, cfg: PipelineConfig) -> None:
    from prodrep import evaluate as evaluation

    # waits for the background item2vec fits only when it reaches them (its time includes that wait)
    evaluation.run(_evaluate_config(lake, cfg), wait_for_fits=_STATE["prefetch"].wait if "prefetch" in _STATE else None)


def _evaluate_config(lake: str, cfg: PipelineConfig) -> Any:
    """The evaluate stage's config (the background prefetch must fit exactly what it will ask for)."""
    from prodrep import evaluate as evaluation

    return build_config(evaluation.EvaluateConfig, None, lake=lake, report_dir=cfg.report)


STAGE_RUNNERS: dict[str, Callable[[Any, str, PipelineConfig], None]] = {
    "ingest": _ingest,
    "sessions": _sessions,
    "cooccur": _cooccur,
    "tokenize": _tokenize,
    "train-mlm": _train_mlm,
    "train-items": _train_items,
    "embed": _embed,
    "neighbors": _neighbors,
    "evaluate": _evaluate,
}
