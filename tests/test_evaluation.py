"""The evaluation harness on tiny real Delta lakes where the right answer is known."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from common.config import ConfigError, InputError, build_config
from common.evaluation import baselines as B
from prodrep.evaluate import EvaluateConfig, main, run
from common.evaluation.metrics import recall_at_k
from common.evaluation.probe import category_probe, sample_probe
from common.evaluation.protocol import build_context, evaluate_scores, sample_queries
from common.lake import read_pandas, write_arrow

GROUP = 15
COLD = "A_NEW"
MODEL = "toy-deadbeef"


def _groups():
    a = [f"A{i:02d}" for i in range(GROUP)]
    b = [f"B{i:02d}" for i in range(GROUP)]
    return a, b


def _sessions():
    """Two disjoint item groups; train sessions never mix them; 3 test sessions hold a cold item."""
    rng = np.random.default_rng(42)
    a, b = _groups()
    train, test = [], []
    for g in (a, b):
        train.append(list(g))  # every within-group pair co-occurs at least once
        for _ in range(40):
            train.append(list(rng.choice(g, size=5, replace=False)))
        for _ in range(10):
            test.append(list(rng.choice(g, size=4, replace=False)))
    for _ in range(3):
        test.append([COLD, *rng.choice(a, size=3, replace=False)])
    return train, test


def _write_lake(lake: str, with_model: bool = True) -> None:
    train, test = _sessions()
    rows = [(f"s{i:03d}", s, "train", i) for i, s in enumerate(train)]
    rows += [(f"t{i:03d}", s, "test", 1000 + i) for i, s in enumerate(test)]
    base_us = 1_293_840_000_000_000  # 2011-01-01 UTC
    sessions = pa.table(
        {
            "session_id": [r[0] for r in rows],
            "item_ids": [[str(x) for x in r[1]] for r in rows],
            "start_ts": pa.array([base_us + r[3] * 3_600_000_000 for r in rows], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            "length": [len(r[1]) for r in rows],
            "split": [r[2] for r in rows],
        }
    )
    write_arrow(sessions, lake, "sessions", mode="overwrite", metadata={"job": "test"})
    a, b = _groups()
    words_a = ["kitchen", "apple", "mug", "plate", "spoon"]
    words_b = ["garden", "hose", "rake", "spade", "seed"]
    items = a + b + [COLD]
    titles = [f"red {words_a[i % 5]} kitchen set {x.lower()}" for i, x in enumerate(a)]
    titles += [f"green {words_b[i % 5]} garden tool {x.lower()}" for i, x in enumerate(b)]
    titles += ["red kitchen set new"]
    cats = ["kitchen"] * GROUP + ["garden"] * GROUP + ["kitchen"]
    write_arrow(pa.table({"item_id": items, "title": titles, "category": cats}), lake, "catalog", mode="overwrite")
    if with_model:
        # a "model" that puts each group (cold item included) on its own axis
        vec = [[1.0, 0.0] if x.startswith("A") else [0.0, 1.0] for x in items]
        emb = pa.table(
            {
                "item_id": items,
                "embedding": pa.array(vec, pa.list_(pa.float32())),
                "dim": pa.array([2] * len(items), pa.int32()),
                "model_version": [MODEL] * len(items),
            }
        )
        write_arrow(emb, lake, "item_embeddings", mode="overwrite")


def _cfg(lake: str, tmp_path: Path, **kw) -> EvaluateConfig:
    kw.setdefault("methods", ("popularity", "cooc_count", "cooc_cosine", "tfidf", MODEL))
    return build_config(
        EvaluateConfig, lake=lake, report_dir=str(tmp_path / "report"), json_file=str(tmp_path / "out.json"), progress=False, **kw
    )


def _context(seed: int = 0):
    train, test = _sessions()
    texts = {x: f"text {x}" for s in train + test for x in s}
    return build_context(train, test, [f"t{i:03d}" for i in range(len(test))], texts, seed=seed)


def test_sample_queries_protocol():
    sessions = [["x"], [f"L{i}" for i in range(51)], ["a", "b", "a", "c"]] + [[f"s{j}_{i}" for i in range(8)] for j in range(10)]
    pool = sample_queries(sessions, seed=0, per_session=5, max_queries=1000)
    by_session = {}
    for pos, q, targets in pool:
        by_session.setdefault(pos, []).append(q)
        assert q not in targets and set(targets) | {q} == set(sessions[pos])
    assert 0 not in by_session and 1 not in by_session  # 1 item and 51 items are out of 2..50
    assert sorted(by_session[2]) == ["a", "b", "c"]  # distinct items: 3 (< 5) queries
    assert all(len(by_session[p]) == 5 for p in range(3, 13))
    capped = sample_queries(sessions, seed=0, per_session=5, max_queries=20)
    assert len(capped) == 20 and len({(p, q) for p, q, _ in capped}) == 20
    assert all(c in pool for c in capped)


def test_determinism_same_seed_same_queries_and_numbers():
    c1, c2, c3 = _context(0), _context(0), _context(1)
    assert np.array_equal(c1.queries.query, c2.queries.query)
    assert (c1.queries.targets != c2.queries.targets).nnz == 0
    assert np.array_equal(c1.items, c2.items)
    m1, m2 = B.Cooccurrence(c1, "cosine"), B.Cooccurrence(c2, "cosine")
    h1 = evaluate_scores(c1, m1.score, depth=20, batch_size=7, progress=False)
    h2 = evaluate_scores(c2, m2.score, depth=20, batch_size=64, progress=False)  # batch size is irrelevant
    assert np.array_equal(h1, h2)
    # a different seed draws different queries from the same sessions (sessions of 4 items: query
    # sets are equal, but the cap isn't hit, so compare the drawn order)
    assert not np.array_equal(c1.queries.query, c3.queries.query)


def test_tie_break_order_and_cold_fallback():
    ctx = _context()
    # universe ordered by train popularity desc, then item id
    key = [(-p, i) for p, i in zip(ctx.popularity, ctx.items)]
    assert key == sorted(key)
    cold_rows = np.flatnonzero(ctx.cold)
    assert len(cold_rows) == 3
    cooc = B.Cooccurrence(ctx, "count")
    from common.evaluation.protocol import top_k

    q = ctx.queries.query[cold_rows]
    ranked = top_k(cooc.score(q), q, ctx.is_candidate, 5)
    # a cold query has no co-occurrence: its ranking is the popularity order
    assert ranked.tolist() == [[0, 1, 2, 3, 4]] * 3


def test_cooc_reaches_full_recall_within_group():
    ctx = _context()
    hits = evaluate_scores(ctx, B.Cooccurrence(ctx, "count").score, depth=20, progress=False)
    r20 = recall_at_k(hits, ctx.queries.n_targets, 20)
    has_cold = np.array([ctx.index[COLD] in ctx.queries.targets[i].indices for i in range(len(r20))])
    clean = ~has_cold & ~ctx.cold
    assert clean.sum() == 80
    # the 14 other group members all co-occur with the query, the other group never does
    assert np.all(r20[clean] == 1.0)
    pop = evaluate_scores(ctx, B.Popularity(ctx).score, depth=20, progress=False)
    assert recall_at_k(pop, ctx.queries.n_targets, 20)[clean].mean() < 0.9


def test_harness_on_tiny_lake(lake, tmp_path):
    _write_lake(lake)
    res = run(_cfg(lake, tmp_path))
    ds = res["dataset"]
    # 23 test sessions of 4 distinct items: every item is a query (4 <= 5 per session)
    assert ds["queries"] == 92 and ds["cold_queries"] == 3
    # cold targets: in the 3 cold sessions, each of the 3 warm queries has the cold item as a target
    assert ds["cold_target_share"] == pytest.approx(9 / (92 * 3))
    bc = res["basket_completion"]
    assert set(bc) == {"popularity", "cooc_count", "cooc_cosine", "tfidf", MODEL}
    for m in bc.values():
        assert set(m) == {"recall@10", "recall@20", "ndcg@10", "cold_recall@20", "queries", "cold_queries"}
    # the group-axis model ranks the 15 same-group items (cold one included) first
    assert bc[MODEL]["recall@20"] == 1.0 and bc[MODEL]["cold_recall@20"] == 1.0
    # the cold item's title shares "red kitchen set" with group A only
    assert bc["tfidf"]["cold_recall@20"] == 1.0
    assert bc["cooc_count"]["recall@20"] > bc["popularity"]["recall@20"]
    assert res["probe"]["tfidf"]["accuracy"] == 1.0 and res["probe"]["tfidf"]["classes"] == 2
    assert res["probe"][MODEL]["items"] == 2 * GROUP  # the cold item is in no train session
    assert res["perplexity"] == {}
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out) == {"dataset", "basket_completion", "probe", "perplexity"}
    assert out["basket_completion"] == bc
    rep = tmp_path / "report"
    for f in ("report.md", "metrics.json", "recall_at_k.png", "projection.png"):
        assert (rep / f).stat().st_size > 0, f
    md = (rep / "report.md").read_text()
    assert "| cooc_count |" in md and MODEL in md
    metrics = json.loads((rep / "metrics.json").read_text())
    assert len(metrics["details"]["recall_curves"]["cooc_count"]["overall"]) == 30  # K = 1..(31 candidates - the query)
    proj = metrics["details"]["projection"]  # t-SNE of the model's items, coloured by the catalog's category
    assert (proj["method"], proj["how"], proj["by"], proj["items"]) == (MODEL, "t-SNE", "category", 2 * GROUP)
    assert proj["caption"] in md and "What to look for" in proj["caption"]
    # same config, same lake -> identical numbers
    again = run(_cfg(lake, tmp_path))
    assert again == res


def test_cli_entry_and_errors(lake, tmp_path, capsys):
    with pytest.raises(InputError, match="sessions"):
        run(_cfg(lake, tmp_path))
    _write_lake(lake, with_model=False)
    with pytest.raises(ConfigError, match="unknown method"):
        run(_cfg(lake, tmp_path, methods=("nope",)))
    with pytest.raises(ConfigError, match="pseudo_val_fraction"):
        _cfg(lake, tmp_path, pseudo_val_fraction=1.5)
    rc = main(["--lake", lake, "--report", str(tmp_path / "r2"), "--methods", "popularity,cooc_cosine", "--set", "progress=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "cooc_cosine" in printed and "report.md" in printed
    with pytest.raises(ConfigError, match="eval_split"):
        _cfg(lake, tmp_path, eval_split="train")
    with pytest.raises(InputError, match="0 val sessions.*--val-from"):  # tuning needs a val split
        run(_cfg(lake, tmp_path, eval_split="val"))


def test_eval_split_val_scores_the_val_sessions_only(lake, tmp_path):
    _write_lake(lake, with_model=False)
    sessions = read_pandas(lake, "sessions")
    # relabel the 3 cold-item sessions as val: evaluating val must see exactly them
    is_cold = sessions["item_ids"].map(lambda s: COLD in list(s))
    sessions.loc[is_cold, "split"] = "val"
    write_arrow(pa.Table.from_pandas(sessions, preserve_index=False), lake, "sessions", mode="overwrite")
    val = run(_cfg(lake, tmp_path, eval_split="val", methods=("popularity", "tfidf")))
    test = run(_cfg(lake, tmp_path, methods=("popularity", "tfidf")))
    assert val["dataset"]["eval_split"] == "val" and test["dataset"]["eval_split"] == "test"
    assert val["dataset"]["queries"] == 3 * 4 and val["dataset"]["cold_queries"] == 3
    assert test["dataset"]["queries"] == 20 * 4 and test["dataset"]["cold_queries"] == 0


def test_report_follows_the_configured_cutoffs(lake, tmp_path, capsys):
    # the report and the printed table once read recall@20 / ndcg@10 by name: other cut-offs raised KeyError
    _write_lake(lake, with_model=False)
    res = run(_cfg(lake, tmp_path, methods=("popularity", "cooc_count"), ks=(3, 5), ndcg_k=4))
    assert set(res["basket_completion"]["cooc_count"]) == {"recall@3", "recall@5", "ndcg@4", "cold_recall@5", "queries", "cold_queries"}
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| method | R@3 | R@5 | NDCG@4 | warm R@5 | cold R@3 | cold R@5 | cold NDCG@4 | queries | cold |" in md
    best = max(res["basket_completion"], key=lambda m: res["basket_completion"][m]["recall@5"])
    assert f"Best overall Recall@5: **{best}**" in md and "Best NDCG@4:" in md
    printed = capsys.readouterr().out
    assert "cold R@5" in printed and "NDCG@4" in printed and "cold R@3" not in printed and "R@20" not in printed


def test_probe_sample_is_stratified_seeded_and_bounded():
    rng = np.random.default_rng(0)
    sizes = {f"c{i}": n for i, n in enumerate([400, 200, 100, 60, 40, 12])}  # 812 items
    labels = np.array([c for c, n in sizes.items() for _ in range(n)])
    idx = np.sort(rng.choice(5000, size=len(labels), replace=False))
    labels = labels[rng.permutation(len(labels))]
    got_idx, got_labels, dropped = sample_probe(idx, labels, 200, folds=5, seed=0)
    again = sample_probe(idx, labels, 200, folds=5, seed=0)
    assert np.array_equal(got_idx, again[0]) and np.array_equal(got_labels, again[1])
    assert len(got_idx) <= 200 and np.all(np.diff(got_idx) > 0) and np.isin(got_idx, idx).all()
    pos = {int(i): n for n, i in enumerate(idx)}
    assert [labels[pos[int(i)]] for i in got_idx] == got_labels.tolist()  # each item keeps its own label
    counts = {c: int((got_labels == c).sum()) for c in sizes}
    # stratified: every class keeps its share of 200 (within one), the 12-item class (3 < 5 folds) is dropped
    assert all(abs(counts[c] - 200 * n / 812) <= 1 for c, n in sizes.items() if c != "c5")
    assert counts["c5"] == 0 and dropped == 1
    assert sample_probe(idx, labels, 0)[0] is idx and sample_probe(idx, labels, 5000)[0] is idx


def test_sparse_probe_memory_follows_the_used_columns_not_the_vocabulary():
    """A wide sparse vocabulary (TF-IDF) must not size lbfgs' history: 20 classes x 200,000 columns would
    keep 10 x 2 x 4M float64 (~640 MB); the probe items use 2,000 columns. Same fit as the compact matrix."""
    import tracemalloc

    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    classes, per_class, used, width = 20, 15, 2000, 200_000
    labels = np.repeat([f"c{i:02d}" for i in range(classes)], per_class)
    rows, cols = [], []
    for r in range(len(labels)):
        c = r // per_class
        own = rng.choice(np.arange(c * used // classes, (c + 1) * used // classes), size=4, replace=False)
        for col in [*own, *rng.choice(used, size=2, replace=False)]:  # class words + shared noise
            rows.append(r)
            cols.append(int(col) * (width // used))  # spread over the wide vocabulary
    x = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(labels), width))
    compact = x[:, np.unique(cols)].toarray()
    tracemalloc.start()
    try:
        wide = category_probe(x, labels, folds=5, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, f"probe peak {peak / 1e6:.0f} MB"
    assert wide == category_probe(compact, labels, folds=5, seed=0)
    assert wide["accuracy"] > 0.5  # the class words are learnable


def test_probe_runs_on_the_sample_and_says_so(lake, tmp_path):
    _write_lake(lake, with_model=False)
    res = run(_cfg(lake, tmp_path, methods=("tfidf",), probe_max_items=20))
    assert res["probe"]["tfidf"]["items"] == 20 and res["probe"]["tfidf"]["classes"] == 2
    notes = json.loads((tmp_path / "report" / "metrics.json").read_text())["details"]["notes"]
    assert "category probe: a stratified sample of 20 of 30 items (probe_max_items)" in notes
    with pytest.raises(ConfigError, match="probe_max_items"):
        _cfg(lake, tmp_path, probe_max_items=-1)


def test_item2vec_tiny_deterministic_and_tuned_on_pseudo_val(lake, tmp_path):
    pytest.importorskip("gensim")
    train, _ = _sessions()
    p = B.Item2VecParams(epochs=1)
    v1, x1 = B.fit_item2vec(train, p, seed=0, workers=1, min_count=1, vector_size=8)
    v2, x2 = B.fit_item2vec(train, p, seed=0, workers=1, min_count=1, vector_size=8)
    assert v1 == v2 and np.array_equal(x1, x2)
    _write_lake(lake, with_model=False)
    res = run(
        _cfg(
            lake,
            tmp_path,
            methods=("item2vec_default", "item2vec_tuned"),
            item2vec_epochs=(1,),
            item2vec_ns_exponents=(-0.5, 0.75),
            item2vec_samples=(1e-3,),
            item2vec_workers=1,
            item2vec_min_count=1,
        )
    )
    bc = res["basket_completion"]
    assert set(bc) == {"item2vec_default", "item2vec_tuned"}
    # item2vec cannot place the cold item: cold queries fall back to popularity order
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    i2v = metrics["details"]["item2vec"]
    assert i2v["val_source"].startswith("pseudo-val") and len(i2v["grid"]) == 2
    assert bc["item2vec_tuned"]["cold_queries"] == 3


def test_item2vec_fits_cached_by_session_content(lake, tmp_path):
    """A re-run on unchanged sessions reuses every gensim fit from <lake>/reports/_cache (same numbers);
    changed train sessions miss the cache and are refitted."""
    pytest.importorskip("gensim")
    _write_lake(lake, with_model=False)
    cfg = _cfg(lake, tmp_path, methods=("item2vec_default", "item2vec_tuned"), item2vec_epochs=(1, 2),
               item2vec_ns_exponents=(0.75,), item2vec_workers=1, item2vec_min_count=1)

    def cache_stats() -> dict:
        return json.loads((tmp_path / "report" / "metrics.json").read_text())["details"]["cache"]

    first = run(cfg)
    cold = cache_stats()
    assert cold["hits"] == 0 and cold["misses"] >= 3  # 2 grid points on pseudo-val + the default fit
    assert Path(cold["dir"]).is_relative_to(Path(lake)) and len(list(Path(cold["dir"]).glob("*.npz"))) == cold["misses"]
    again = run(cfg)
    assert cache_stats() == {**cold, "hits": cold["misses"], "misses": 0}
    assert again["basket_completion"] == first["basket_completion"]
    # one more train session: different training sentences, so every fit is new
    sessions = read_pandas(lake, "sessions")
    extra = sessions[sessions["split"] == "train"].head(1).assign(session_id="s_extra")
    write_arrow(pa.Table.from_pandas(pd.concat([sessions, extra], ignore_index=True), preserve_index=False), lake, "sessions", mode="overwrite")
    run(cfg)
    assert cache_stats()["hits"] == 0



def test_item2vec_halving_fits_the_leader_only_at_more_epochs():
    """Halving fits every ns_exponent at the fewest epochs, then more epochs for the leader alone; it
    picks the same point as the full grid when the leader stays ahead (here: one ns, two epochs), and
    a grid point it never fitted cannot be chosen."""
    pytest.importorskip("gensim")
    ctx = _context()
    kw = {"seed": 0, "workers": 1, "min_count": 1}
    grid = B.item2vec_grid((1, 2), (-0.5, 0.75), (1e-3,))
    full, full_rows = B.tune_item2vec(ctx, grid, k=5, search="grid", **kw)
    half, half_rows = B.tune_item2vec(ctx, grid, k=5, search="halving", **kw)
    assert len(full_rows) == 4 and len(half_rows) == 3
    assert [r["epochs"] for r in half_rows] == [1, 1, 2]
    lead = max(half_rows[:2], key=lambda r: r["val_recall@5"])  # ties: the first row
    assert half_rows[2]["ns_exponent"] == lead["ns_exponent"]
    assert {**half.__dict__} in [{k: r[k] for k in ("epochs", "ns_exponent", "sample", "window", "max_items")} for r in half_rows]
    one_ns = B.item2vec_grid((1, 2), (0.75,), (1e-3,))
    assert B.tune_item2vec(ctx, one_ns, k=5, search="halving", **kw)[0] == B.tune_item2vec(ctx, one_ns, k=5, search="grid", **kw)[0]
    assert full in grid
    with pytest.raises(ValueError, match="halving"):
        B.tune_item2vec(ctx, grid, k=5, search="random", **kw)
    # a window in the grid: halving carries the leader's window to more epochs
    windowed = B.item2vec_grid((1, 2), (0.75,), (1e-3,), windows=(0, 1))
    _, rows = B.tune_item2vec(ctx, windowed, k=5, search="halving", **kw)
    assert [r["epochs"] for r in rows] == [1, 1, 2] and rows[2]["window"] == max(rows[:2], key=lambda r: r["val_recall@5"])["window"]


def test_item2vec_window_limits_the_context():
    """window=0 pairs every item of a basket (window = longest session); window=1 only neighbours in the
    shuffled basket, so the fits differ; the label names a finite window only."""
    pytest.importorskip("gensim")
    train, _ = _sessions()
    kw = {"seed": 0, "workers": 1, "min_count": 1, "vector_size": 8}
    whole = B.fit_item2vec(train, B.Item2VecParams(epochs=1), **kw)
    near = B.fit_item2vec(train, B.Item2VecParams(epochs=1, window=1), **kw)
    assert whole[0] == near[0] and not np.allclose(whole[1], near[1])
    assert "window" not in B.Item2VecParams().label() and B.Item2VecParams(window=20).label().endswith("window=20")


def test_item2vec_chunks_split_long_sessions_only():
    """max_items=N splits a sentence of n > N items into ceil(n / N) near-equal consecutive chunks (every
    item kept once, in order); shorter sentences and max_items=0 are left whole; the label names it."""
    sents = [list("abcdefghij"), list("xyz"), list("0123456")]
    assert B.chunked(sents, 0) == sents
    assert B.chunked(sents, 4) == [list("abc"), list("def"), list("ghij"), list("xyz"), list("012"), list("3456")]
    assert B.chunked(sents, 10) == sents
    assert B.Item2VecParams(max_items=100).label().endswith("max_items=100") and "max_items" not in B.Item2VecParams().label()


def test_prefetched_item2vec_fits_are_what_evaluate_reads(lake, tmp_path, caplog):
    """The pipeline's background prefetch fits exactly what ``evaluate`` asks for: after it, a run
    with the same config fits nothing (every item2vec fit a cache hit)."""
    pytest.importorskip("gensim")
    from prodrep.evaluate import prefetch_fits

    _write_lake(lake, with_model=False)
    cfg = _cfg(lake, tmp_path, methods=("popularity", "item2vec_default", "item2vec_tuned"), item2vec_epochs=(1, 2),
               item2vec_ns_exponents=(-0.5, 0.75), item2vec_workers=1, item2vec_min_count=1)  # fmt: skip
    assert prefetch_fits(cfg) == ["item2vec_default", "item2vec_tuned"]
    fitted = len(list((Path(lake) / "reports" / "_cache").glob("*.npz")))
    assert fitted == 1 + 3 + 1  # defaults, halving's 2 + 1 grid points, the tuned fit on all of train
    calls: list[str] = []
    with caplog.at_level(logging.INFO, logger="prodrep.evaluate"):
        res = run(cfg, wait_for_fits=lambda: (calls.append("wait"), logging.getLogger("prodrep.evaluate").info("WAIT")))
    stats = json.loads((tmp_path / "report" / "metrics.json").read_text())["details"]["cache"]
    assert stats["misses"] == 0 and stats["hits"] == fitted
    # one wait, after the other methods were scored and before the item2vec ones; the report keeps its order
    msgs = [r.getMessage() for r in caplog.records]
    at = {m: i for i, m in enumerate(msgs)}
    assert calls == ["wait"] and at["method popularity: building"] < at["WAIT"] < at["method item2vec_default: building"]
    assert list(res["basket_completion"]) == ["popularity", "item2vec_default", "item2vec_tuned"]
    assert prefetch_fits(dataclasses.replace(cfg, cache=False)) == [] and prefetch_fits(dataclasses.replace(cfg, methods=("popularity",))) == []


def test_pipeline_starts_the_prefetch_once_its_inputs_exist():
    from prodrep.pipeline import STAGES, prefetch_start

    assert prefetch_start(list(STAGES)) == 1  # after sessions
    assert prefetch_start(["cooccur", "train-items", "evaluate"]) == -1  # inputs already in the lake
    assert prefetch_start(["ingest", "cooccur", "evaluate"]) == 0
    assert prefetch_start(["ingest", "sessions", "evaluate"]) is None  # nothing to overlap with
    assert prefetch_start(["ingest", "sessions", "cooccur"]) is None and prefetch_start(["evaluate"]) is None


def test_pipeline_stops_spark_and_ray_after_their_last_stages():
    from prodrep.pipeline import RAY_STAGES, SPARK_STAGES, STAGES, release_after

    assert STAGES[release_after(list(STAGES), SPARK_STAGES)] == "neighbors"  # evaluate runs without the JVM
    assert STAGES[release_after(list(STAGES), RAY_STAGES)] == "train-items"
    assert release_after(["ingest", "train-items", "evaluate"], SPARK_STAGES) == 0
    assert release_after(["train-items", "evaluate"], SPARK_STAGES) is None  # Spark never started
    assert release_after(["ingest", "sessions"], SPARK_STAGES) is None  # still needed by the last stage
