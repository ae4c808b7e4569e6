"""spark_jobs.embed_catalog on real Spark + Delta with a tiny real BERT export and an ID model."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from common import lake as L
from common.config import InputError
from common.models import load_encoder, save_export
from common.schemas import ITEM_EMBEDDINGS
from common.text import render, text_hash
from spark_jobs.embed_catalog import EmbedConfig, run
from tests.test_models import export_tiny

ITEMS = [
    ("85123A", "WHITE HANGING HEART T-LIGHT HOLDER", None, "home", None),
    ("71053", "WHITE METAL LANTERN", "a lantern", "home", "acme"),
    ("84406B", "CREAM CUPID HEARTS COAT HANGER", None, None, None),
    ("22633", "HAND WARMER UNION JACK", None, "gifts", None),
    ("22632", "HAND WARMER RED POLKA DOT", None, "gifts", None),
    ("21754", "HOME BUILDING BLOCK WORD", "wooden blocks spelling HOME", "home", None),
    ("22910", "PAPER CHAIN KIT VINTAGE CHRISTMAS", None, "christmas", None),
    ("23084", "RABBIT NIGHT LIGHT", None, "lights", None),
    ("22197", "SMALL POPCORN HOLDER", None, None, None),
    ("84879", "ASSORTED COLOUR BIRD ORNAMENT", None, None, "acme"),
    ("22086", "PAPER CHAIN KIT 50'S CHRISTMAS", None, "christmas", None),
    ("POST", "POSTAGE", None, None, None),
]


def write_catalog(lake: str, items=ITEMS) -> int:
    cols = list(zip(*items))
    table = pa.table(
        {"item_id": cols[0], "title": cols[1], "description": cols[2], "category": cols[3], "brand": cols[4]}
    )
    return L.write_arrow(table, lake, "catalog", mode="overwrite")


def rows(lake: str, version=None, model_version=None):
    filters = [("model_version", "=", model_version)] if model_version else None
    df = L.read_pandas(lake, "item_embeddings", version=version, filters=filters)
    return df.sort_values(["model_version", "item_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d, _, _ = export_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=1)
    return d


def test_udf_matches_encoder(spark, lake, tiny_model):
    write_catalog(lake)
    s = run(spark, EmbedConfig(lake=lake, model=tiny_model, batch_size=4))
    got = rows(lake)
    assert s["rows"] == len(ITEMS) and s["embedded"] == len(ITEMS)
    assert sorted(got["item_id"]) == sorted(i[0] for i in ITEMS)
    assert (got["dim"] == 32).all() and (got["model_version"] == "tiny-00000001").all() and (got["catalog_version"] == 0).all()
    # the obvious reference: render each row and embed in one plain call
    by_id = {i[0]: dict(zip(("item_id", "title", "description", "category", "brand"), i)) for i in ITEMS}
    texts = [render(by_id[i]) for i in got["item_id"]]
    want = load_encoder(tiny_model, "cpu").embed(texts)
    np.testing.assert_allclose(np.stack(got["embedding"].to_numpy()), want, atol=1e-5)
    assert list(got["text_hash"]) == [text_hash(t) for t in texts]
    meta = L.commit_info(lake, "item_embeddings")
    assert meta["model_version"] == "tiny-00000001" and meta["catalog_version"] == 0
    assert meta["models"] == {"tiny-00000001": str(tiny_model)} and meta["inputs"]["catalog"] == 0


def test_incremental_only_changed_rows(spark, lake, tiny_model):
    write_catalog(lake)
    run(spark, EmbedConfig(lake=lake, model=tiny_model))
    before = rows(lake)
    changed = [(i[0], "WARM WHITE FAIRY LIGHTS" if i[0] == "22197" else i[1], *i[2:]) for i in ITEMS]
    changed.append(("99999", "NEW ITEM GLASS STAR", None, None, None))
    changed = [c for c in changed if c[0] != "POST"]  # removed from the catalog
    cat_v = write_catalog(lake, changed)
    s = run(spark, EmbedConfig(lake=lake, model=tiny_model, incremental=True))
    assert (s["embedded"], s["kept"]) == (2, len(ITEMS) - 2)
    after = rows(lake)
    assert sorted(after["item_id"]) == sorted(c[0] for c in changed)
    old = before.set_index("item_id")
    new = after.set_index("item_id")
    for item in new.index:
        same = item in old.index and np.array_equal(old.loc[item, "embedding"], new.loc[item, "embedding"])
        assert same == (item not in ("22197", "99999")), item
        assert new.loc[item, "catalog_version"] == (cat_v if item in ("22197", "99999") else 0)
    fresh = load_encoder(tiny_model, "cpu").embed([render({"title": "WARM WHITE FAIRY LIGHTS"})])[0]
    np.testing.assert_allclose(new.loc["22197", "embedding"], fresh, atol=1e-5)
    # idempotent: nothing changed -> no new commit, same rows
    v = L.table_version(lake, "item_embeddings")
    s2 = run(spark, EmbedConfig(lake=lake, model=tiny_model, incremental=True))
    assert s2["written"] is False and L.table_version(lake, "item_embeddings") == v


def test_model_versions_coexist_and_id_model(spark, lake, tiny_model, tmp_path):
    write_catalog(lake)
    run(spark, EmbedConfig(lake=lake, model=tiny_model))
    a = rows(lake, model_version="tiny-00000001")
    vecs = {"85123A": [3.0, 0.0, 4.0], "22633": [0.0, 5.0, 0.0], "NOT-IN-CATALOG": [1.0, 1.0, 1.0]}
    id_dir = save_export(tmp_path / "idm", {"kind": "id", "model_version": "ids-1", "dim": 3}, item_vectors=vecs)
    run(spark, EmbedConfig(lake=lake, model=id_dir))
    run(spark, EmbedConfig(lake=lake, model=tiny_model))  # full re-run: replaces, never duplicates
    ids = rows(lake, model_version="ids-1").set_index("item_id")
    assert sorted(ids.index) == ["22633", "85123A"]
    np.testing.assert_allclose(ids.loc["85123A", "embedding"], [0.6, 0.0, 0.8], atol=1e-7)
    assert ids["text_hash"].isna().all() and ids["candidate"].isna().all() and (ids["dim"] == 3).all()
    a2 = rows(lake, model_version="tiny-00000001")
    assert len(a2) == len(ITEMS) and list(a2["item_id"]) == list(a["item_id"])
    np.testing.assert_allclose(np.stack(a2["embedding"].to_numpy()), np.stack(a["embedding"].to_numpy()), atol=1e-6)
    assert set(L.commit_info(lake, "item_embeddings")["models"]) == {"tiny-00000001", "ids-1"}


def test_incremental_into_a_table_from_before_the_candidate_column(spark, lake, tiny_model):
    """An existing lake's item_embeddings has no `candidate` column: an incremental embed keeps the old
    rows (their candidate reads as null) and replaces the model's partition under the new schema."""
    from deltalake import write_deltalake

    write_catalog(lake)
    enc = load_encoder(tiny_model, "cpu")
    by_id = {i[0]: dict(zip(("item_id", "title", "description", "category", "brand"), i)) for i in ITEMS}
    ids = [i for i in by_id if i != "POST"]  # POST has no row yet: the one item to embed
    texts = [render(by_id[i]) for i in ids]
    old_schema = pa.schema([f for f in ITEM_EMBEDDINGS.arrow() if f.name != "candidate"])
    old = pa.table({"item_id": ids, "embedding": pa.array(list(enc.embed(texts)), pa.list_(pa.float32())),
                    "dim": pa.array([32] * len(ids), pa.int32()), "model_version": ["tiny-00000001"] * len(ids),
                    "text_hash": [text_hash(t) for t in texts], "catalog_version": pa.array([0] * len(ids), pa.int64())},
                   schema=old_schema)  # fmt: skip
    write_deltalake(L.table_uri(lake, "item_embeddings"), old, partition_by=["model_version"])
    s = run(spark, EmbedConfig(lake=lake, model=tiny_model, incremental=True))
    assert (s["embedded"], s["kept"]) == (1, len(ids))
    got = rows(lake).set_index("item_id")
    assert sorted(got.index) == sorted(by_id) and got["candidate"].isna().all()
    np.testing.assert_allclose(got.loc["POST", "embedding"], enc.embed([render(by_id["POST"])])[0], atol=1e-5)


def test_missing_catalog_is_clear(spark, lake, tiny_model):
    with pytest.raises(InputError, match="catalog"):
        run(spark, EmbedConfig(lake=lake, model=tiny_model))
