"""spark_jobs.neighbors (faiss in Spark) against a brute-force numpy reference, and the lookup CLI."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from common import lake as L
from common.config import InputError
from common.models import load_encoder
from common.text import render
from spark_jobs import lookup
from spark_jobs.neighbors import NeighborsConfig, run
from tests.test_embed_catalog import ITEMS, write_catalog
from tests.test_models import export_tiny


def random_unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(lake: str, ids: list[str], vecs: np.ndarray, model_version: str, mode="append", metadata=None) -> None:
    t = pa.table(
        {
            "item_id": ids,
            "embedding": pa.array(list(vecs), pa.list_(pa.float32())),
            "dim": np.full(len(ids), vecs.shape[1], np.int32),
            "model_version": [model_version] * len(ids),
        }
    )
    L.write_arrow(t, lake, "item_embeddings", mode=mode, metadata=metadata or {"model_version": model_version})


def brute_force(vecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obvious reference: full score matrix, self masked, top-k by sort."""
    s = vecs @ vecs.T
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def check_against_reference(lake: str, ids: list[str], vecs: np.ndarray, k: int, model_version: str) -> None:
    got = L.read_pandas(lake, "item_neighbors", filters=[("model_version", "=", model_version)])
    assert len(got) == len(ids) * k
    assert (got["item_id"] != got["neighbor_id"]).all()
    order, scores = brute_force(vecs, k)
    pos = {i: n for n, i in enumerate(ids)}
    for item, g in got.groupby("item_id"):
        g = g.sort_values("rank")
        assert list(g["rank"]) == list(range(1, k + 1))
        p = pos[item]
        assert set(g["neighbor_id"]) == {ids[j] for j in order[p]}, item
        np.testing.assert_allclose(g["score"].to_numpy(), scores[p], atol=1e-5)


def test_flat_and_ivf_match_brute_force(spark, lake):
    ids = [f"i{n:04d}" for n in range(300)]
    vecs = random_unit(300, 16, seed=0)
    write_embeddings(lake, ids, vecs, "rand-1")
    other = random_unit(50, 16, seed=1)
    write_embeddings(lake, ids[:50], other, "rand-2")
    s = run(spark, NeighborsConfig(lake=lake, k=5, model_version="rand-1"))
    assert s["index"] == "flat" and s["items"] == 300
    check_against_reference(lake, ids, vecs, 5, "rand-1")
    # IVF path: searching every list is exhaustive, so it must equal the reference too
    s = run(spark, NeighborsConfig(lake=lake, k=5, model_version="rand-2", flat_max=10, nlist=8, nprobe=8))
    assert s["index"].startswith("ivf")
    check_against_reference(lake, ids[:50], other, 5, "rand-2")
    check_against_reference(lake, ids, vecs, 5, "rand-1")  # the other model's rows are untouched
    run(spark, NeighborsConfig(lake=lake, k=5, model_version="rand-1"))  # re-run: replaced, not duplicated
    check_against_reference(lake, ids, vecs, 5, "rand-1")
    meta = L.commit_info(lake, "item_neighbors")
    assert meta["model_version"] == "rand-1" and meta["k"] == 5 and meta["inputs"]["item_embeddings"] == 1


def test_similar_and_search(spark, lake, tmp_path, capsys):
    write_catalog(lake)
    model_dir, _, _ = export_tiny(tmp_path / "tiny", seed=2)
    enc = load_encoder(model_dir, "cpu")
    by_id = {i[0]: dict(zip(("item_id", "title", "description", "category", "brand"), i)) for i in ITEMS}
    ids = list(by_id)
    vecs = enc.embed([render(by_id[i]) for i in ids])
    write_embeddings(lake, ids, vecs, "tiny-00000002", metadata={"model_version": "tiny-00000002", "models": {"tiny-00000002": model_dir}})
    order, scores = brute_force(vecs, 3)
    target = ids.index("22633")

    # no neighbour table yet: computed on the fly from item_embeddings
    rows, title, version = lookup.similar(lake, "22633", k=3)
    assert version == "tiny-00000002" and rows.attrs["source"].startswith("item_embeddings")
    assert title == "HAND WARMER UNION JACK"
    assert list(rows["neighbor_id"]) == [ids[j] for j in order[target]]
    assert list(rows["title"]) == [by_id[ids[j]]["title"] for j in order[target]]

    run(spark, NeighborsConfig(lake=lake, k=3))
    rows, _, _ = lookup.similar(lake, "22633", k=3)
    assert rows.attrs["source"] == "item_neighbors" and list(rows["neighbor_id"]) == [ids[j] for j in order[target]]
    np.testing.assert_allclose(rows["score"].to_numpy(), scores[target], atol=1e-5)

    with pytest.raises(InputError, match="NOPE"):
        lookup.similar(lake, "NOPE")

    rows, _ = lookup.search(lake, "hand warmer red polka dot", k=4)
    q = enc.embed([render({"title": "hand warmer red polka dot"})])[0]
    want = np.argsort(-(vecs @ q), kind="stable")[:4]
    assert list(rows["neighbor_id"]) == [ids[j] for j in want]

    from prodrep.cli import main

    assert main(["similar", "--lake", lake, "22633", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "HAND WARMER UNION JACK" in out and by_id[ids[order[target][0]]]["title"] in out
    assert main(["search", "--lake", lake, "christmas lights", "--k", "3"]) == 0
    assert "items closest to 'christmas lights'" in capsys.readouterr().out
    assert main(["similar", "--lake", lake, "NOPE"]) == 2
