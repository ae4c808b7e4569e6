"""Every consumer scores by the model's declared scoring (common.scoring): a kind softmax export is
scored by dot product of query and candidate vectors, not symmetric, through embed, neighbors,
lookup and evaluate; cosine models are unchanged.

The references are written out here independently: the softmax head's formula (its docstring) over
text features from the obvious one-batch encoder (tests.test_models.reference), brute-force numpy
``q @ c.T`` for rankings, and hand-computed Recall@1 for the evaluation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from common import lake as L
from common.config import build_config
from common.evaluation import baselines as B
from common.evaluation.metrics import recall_at_k
from common.evaluation.protocol import LOW, build_context, evaluate_scores
from common.models import save_export
from common.schemas import ITEM_EMBEDDINGS
from common.scoring import SoftmaxHead
from common.text import render
from prodrep.evaluate import EvaluateConfig, run as evaluate
from spark_jobs import lookup
from spark_jobs.embed_catalog import EmbedConfig, run as embed
from spark_jobs.neighbors import NeighborsConfig, run as neighbors
from tests.test_embed_catalog import ITEMS, write_catalog
from tests.test_models import export_tiny, reference, tiny_bert, unit

SOFTMAX = "sm-00000001"
TEXT_DIM, D = 32, 3  # tiny BERT hidden size; learned part of the served vectors (served dim = D + 2)
BETA_WARM, BETA_COLD = 0.5, 0.0
rng = np.random.default_rng(7)
A = rng.normal(scale=0.3, size=(TEXT_DIM, D)).astype(np.float32)  # query projection
Bp = rng.normal(scale=0.3, size=(TEXT_DIM, D)).astype(np.float32)  # candidate projection
b = rng.normal(scale=0.3, size=TEXT_DIM).astype(np.float32)  # text bias
# Items with history, by hand: (query id part e, candidate id part u, bias, freq).
# 22633 points at 22632 (e_22633 . u_22632 = 9) but 22632 points nowhere (e = 0): score(a, b) != score(b, a).
# 85123A: a big bias and a big frequency: near the top for cold queries (beta 0), penalised for warm ones.
WARM = {
    "22633": ([3, 0, 0], [0, 0, 0], 0.0, 10),
    "22632": ([0, 0, 0], [3, 0, 0], 0.0, 10),
    "22910": ([0, 3, 0], [0, 0, 3], 0.0, 10),
    "22086": ([0, 0, 3], [0, 3, 0], 0.0, 10),
    "85123A": ([0, 0, 0], [0, 0, 0], 2.0, 1000),
}
BY_ID = {i[0]: dict(zip(("item_id", "title", "description", "category", "brand"), i)) for i in ITEMS}


def head_reference(ids: list[str], t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SoftmaxHead's formula, written out row by row:
    query = [t A + e, 1, beta], candidate = [t B + u, t.b + bias, -log1p(freq)] (cold: e = u = bias = 0, beta_cold, 0)."""
    q, c = [], []
    for i, ti in zip(ids, t):
        e, u, bias, freq = WARM.get(i, ([0, 0, 0], [0, 0, 0], 0.0, None))
        q.append([*(ti @ A + np.array(e)), 1.0, BETA_WARM if i in WARM else BETA_COLD])
        c.append([*(ti @ Bp + np.array(u)), ti @ b + bias, -np.log1p(freq) if freq is not None else 0.0])
    return np.array(q, np.float32), np.array(c, np.float32)


def export_softmax(out_dir) -> tuple[str, object, object]:
    model, tok = tiny_bert(seed=3)
    ids = tuple(WARM)
    head = SoftmaxHead(
        query_proj=A, cand_proj=Bp, text_bias=b, item_ids=ids,
        query_id=np.array([WARM[i][0] for i in ids], np.float32), cand_id=np.array([WARM[i][1] for i in ids], np.float32),
        bias=np.array([WARM[i][2] for i in ids], np.float32), freq=np.array([WARM[i][3] for i in ids], np.int64),
        beta_warm=BETA_WARM, beta_cold=BETA_COLD,
    )  # fmt: skip
    meta = {"kind": "softmax", "model_version": SOFTMAX, "pooling": "mean", "max_length": 64, "dim": D + 2}
    return save_export(out_dir, meta, model=model, tokenizer=tok, head=head), model, tok


def top(q: np.ndarray, c: np.ndarray, k: int, exclude_self: bool = True) -> np.ndarray:
    """The obvious reference ranking: full score matrix, self masked, argsort."""
    s = q @ c.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_softmax_model_through_embed_neighbors_and_lookup(spark, lake, tmp_path):
    write_catalog(lake)
    sm_dir, model, tok = export_softmax(tmp_path / "sm")
    cos_dir, _, _ = export_tiny(tmp_path / "cos", seed=1)
    embed(spark, EmbedConfig(lake=lake, model=sm_dir, batch_size=4))
    assert L.commit_info(lake, "item_embeddings")["scoring"]["type"] == "dot"
    embed(spark, EmbedConfig(lake=lake, model=cos_dir))
    assert L.commit_info(lake, "item_embeddings")["scoring"] == {"type": "cosine"}

    # embed: the softmax model's query side in `embedding`, its candidate side in `candidate`
    got = L.read_pandas(lake, "item_embeddings").sort_values("item_id")
    cos = got[got["model_version"] == "tiny-00000001"]
    assert len(cos) == len(ITEMS) and cos["candidate"].isna().all()
    sm = got[got["model_version"] == SOFTMAX]
    ids = sm["item_id"].tolist()
    assert sorted(ids) == sorted(BY_ID) and (sm["dim"] == D + 2).all()
    t = unit(reference(model, tok, [render(BY_ID[i]) for i in ids]))
    q, c = head_reference(ids, t)
    np.testing.assert_allclose(np.stack(sm["embedding"].to_numpy()), q, atol=1e-4)
    np.testing.assert_allclose(np.stack(sm["candidate"].to_numpy()), c, atol=1e-4)

    # the fixture is asymmetric where it matters: 22633's best is 22632, not the other way round, and
    # a cosine of the query side alone would rank differently
    order = top(q, c, 3)
    pos = {i: n for n, i in enumerate(ids)}
    assert ids[order[pos["22633"], 0]] == "22632" and ids[order[pos["22632"], 0]] != "22633"
    assert not np.array_equal(order, top(unit(q), unit(q), 3))

    # lookup before neighbors: scored on the fly from item_embeddings
    rows, _, _ = lookup.similar(lake, "22633", k=3, model_version=SOFTMAX)
    assert rows.attrs["source"].startswith("item_embeddings")
    assert list(rows["neighbor_id"]) == [ids[j] for j in order[pos["22633"]]]

    # neighbors: top-k over candidates != q of embedding[q] . candidate[c]
    s = neighbors(spark, NeighborsConfig(lake=lake, k=3, model_version=SOFTMAX))
    assert s["scoring"] == "dot" and L.commit_info(lake, "item_neighbors")["scoring"] == {"type": "dot"}
    nb = L.read_pandas(lake, "item_neighbors", filters=[("model_version", "=", SOFTMAX)])
    assert len(nb) == 3 * len(ids)
    scores = q @ c.T
    for item, g in nb.groupby("item_id"):
        g = g.sort_values("rank")
        p = pos[item]
        assert list(g["neighbor_id"]) == [ids[j] for j in order[p]], item
        np.testing.assert_allclose(g["score"].to_numpy(), scores[p, order[p]], atol=1e-4)
    rows, _, _ = lookup.similar(lake, "22632", k=3, model_version=SOFTMAX)
    assert rows.attrs["source"] == "item_neighbors" and list(rows["neighbor_id"]) == [ids[j] for j in order[pos["22632"]]]

    # search: the text is a cold item's query side against every candidate vector
    text = render({"title": "hand warmer red polka dot"})
    tq = unit(reference(model, tok, [text]))[0]
    qv = np.array([*(tq @ A), 1.0, BETA_COLD], np.float32)
    want = np.argsort(-(c @ qv), kind="stable")[:4]
    rows, _ = lookup.search(lake, "hand warmer red polka dot", k=4, model_version=SOFTMAX)
    assert list(rows["neighbor_id"]) == [ids[j] for j in want]
    assert rows["neighbor_id"][0] == "85123A"  # popular, unpenalised for a cold query (beta_cold = 0)
    np.testing.assert_allclose(rows["score"].to_numpy(), (c @ qv)[want], atol=1e-4)


# ------------------------------------------------------------------------------------------ evaluate
# X and Y are bought together; by their query sides X sits next to Z, so cosine gets Recall@1 = 0,
# while the candidate sides make X point at Y and Y at X: dot gets Recall@1 = 1. W has no vector, nor
# have the fillers (there so the report's Recall@20 has 20 candidates to rank).
QUERY = {"X": [1.0, 0.0], "Y": [0.0, 1.0], "Z": [0.9, 0.1]}
CANDIDATE = {"X": [0.0, 1.0], "Y": [1.0, 0.0], "Z": [0.0, 0.0]}
TRAIN = [["W", "X", "Y", "Z"]] * 5 + [[f"F{i:02d}" for i in range(20)]]
TEST = [["X", "Y"]]


def test_dense_method_scores_query_against_candidate_vectors():
    ctx = build_context(TRAIN, TEST, ["t0"], {})
    ids = list(QUERY)
    dot = B.dense_from_mapping("sm", ctx, ids, np.array([QUERY[i] for i in ids]), np.array([CANDIDATE[i] for i in ids]))
    cos = B.dense_from_mapping("cos", ctx, ids, np.array([QUERY[i] for i in ids]))
    q = np.array([ctx.index[i] for i in ("X", "Y", "Z")])
    s = dot.score(q)
    for r, a in enumerate(("X", "Y", "Z")):
        for j in ("X", "Y", "Z"):
            assert s[r, ctx.index[j]] == pytest.approx(np.dot(QUERY[a], CANDIDATE[j]))
    assert (s[:, ctx.index["W"]] == LOW).all()
    assert s[0, ctx.index["X"]] != s[2, ctx.index["Z"]] or s[0, ctx.index["Z"]] != s[2, ctx.index["X"]]  # rows: X, Y, Z
    assert s[2, ctx.index["X"]] == pytest.approx(0.1) and s[0, ctx.index["Z"]] == 0.0  # score(Z, X) != score(X, Z)
    assert dot.info["scoring"] == "dot" and "scoring" not in cos.info
    np.testing.assert_allclose(dot.vectors[q], [QUERY[i] for i in ("X", "Y", "Z")])  # the probe's vectors: query side
    for m, want in ((dot, 1.0), (cos, 0.0)):
        hits = evaluate_scores(ctx, m.score, depth=1, progress=False)
        assert recall_at_k(hits, ctx.queries.n_targets, 1).mean() == want, m.name


def _eval_lake(lake: str) -> None:
    rows = [(f"s{i}", s, "train") for i, s in enumerate(TRAIN)] + [(f"t{i}", s, "test") for i, s in enumerate(TEST)]
    sessions = pa.table({"session_id": [r[0] for r in rows], "item_ids": [r[1] for r in rows],
                         "length": [len(r[1]) for r in rows], "split": [r[2] for r in rows]})  # fmt: skip
    L.write_arrow(sessions, lake, "sessions", mode="overwrite")


def _embedding_rows(model_version: str, candidates: bool) -> list[dict]:
    return [dict(item_id=i, embedding=v, candidate=CANDIDATE[i] if candidates else None, dim=2, model_version=model_version)
            for i, v in QUERY.items()]  # fmt: skip


def test_evaluate_ranks_an_asymmetric_model_by_dot_and_reads_old_tables(lake, tmp_path):
    from deltalake import write_deltalake

    _eval_lake(lake)
    # an item_embeddings table from before the `candidate` column: cosine models still evaluate
    old = pa.schema([f for f in ITEM_EMBEDDINGS.arrow() if f.name in ("item_id", "embedding", "dim", "model_version")])
    rows = [{k: r[k] for k in old.names} for r in _embedding_rows("cos-1", False)]
    write_deltalake(L.table_uri(lake, "item_embeddings"), pa.Table.from_pylist(rows, schema=old), partition_by=["model_version"])

    def cfg(*methods: str) -> EvaluateConfig:
        return build_config(EvaluateConfig, lake=lake, report_dir=str(tmp_path / "report"), methods=methods, ks=(1, 20),
                            curve_max_k=20, probe_min_sessions=1, progress=False)  # fmt: skip

    assert evaluate(cfg("cos-1"))["basket_completion"]["cos-1"]["recall@1"] == 0.0
    L.write_arrow(pa.Table.from_pylist(_embedding_rows("sm-1", True)), lake, "item_embeddings", mode="append")
    bc = evaluate(cfg("cos-1", "sm-1"))["basket_completion"]
    assert bc["sm-1"]["recall@1"] == 1.0 and bc["cos-1"]["recall@1"] == 0.0
    details = json.loads((tmp_path / "report" / "metrics.json").read_text())["details"]
    assert details["basket_completion"]["sm-1"]["info"]["scoring"] == "dot"
    assert (tmp_path / "report" / "projection.png").stat().st_size > 0
