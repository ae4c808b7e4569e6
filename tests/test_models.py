"""common.models: export format, encoder pooling/normalisation/order, id + fusion kinds, MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import InputError
from common.models import (
    ID_EMBEDDINGS_FILE,
    META_FILE,
    cached_encoder,
    load_encoder,
    minilm_path,
    read_meta,
    save_export,
)

TEXTS = [
    "WHITE HANGING HEART T-LIGHT HOLDER",
    "a",
    "",
    "SET OF 20 CHRISTMAS FAIRY LIGHTS WITH A VERY LONG DESCRIPTION OF WARM WHITE LED BULBS ON GREEN WIRE",
    "red retrospot cake stand",
    "JUMBO BAG RED RETROSPOT",
    "christmas lights",
]


def tiny_bert(seed: int = 0, hidden: int = 32):
    """A tiny random BERT with MiniLM's tokenizer (real tokenizer, fast model)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )  # fmt: skip
    return BertModel(cfg).eval(), tok


def export_tiny(out_dir, kind="mlm", pooling="mean", seed=0, **extra):
    model, tok = tiny_bert(seed)
    meta = {"kind": kind, "model_version": f"tiny-{seed:08x}", "pooling": pooling, "max_length": 64, "dim": 32}
    return save_export(out_dir, meta, model=model, tokenizer=tok, **extra), model, tok


def reference(model, tok, texts, pooling="mean", max_length=64):
    """The obvious implementation: one padded batch, no sorting."""
    b = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    if pooling == "cls":
        v = h[:, 0]
    else:
        m = b["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
    return v.numpy()


def unit(x):
    """Rows scaled to unit length; an all-zero row stays zero (as the encoder and lexical block keep it)."""
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


def test_whitening_decorrelates_and_scales_the_fitted_vectors(tmp_path):
    from common.whitening import Whitening

    rng = np.random.default_rng(0)
    # anisotropic: a large shared offset plus correlated directions of very different scale
    x = 5.0 + rng.normal(size=(400, 6)) @ np.diag([10.0, 3.0, 1.0, 0.5, 0.2, 0.1]) @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    w = Whitening.fit(x, eps=0.0)
    z = w.apply(x)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False, bias=True), np.eye(6), atol=1e-3)
    # eps floors each variance at eps x the mean variance: the small directions are not blown up
    floored = np.cov(Whitening.fit(x, eps=0.1).apply(x), rowvar=False, bias=True)
    var = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1]
    np.testing.assert_allclose(np.sort(np.diag(floored))[::-1], var / (var + 0.1 * var.mean()), atol=1e-3)
    # fewer vectors than dimensions: the unseen directions get no weight, nothing is infinite
    few = Whitening.fit(x[:3], eps=0.0)
    assert np.isfinite(few.matrix).all() and np.linalg.matrix_rank(few.matrix) <= 3
    with pytest.raises(ValueError, match="at least 2"):
        Whitening.fit(x[:1])
    w.save(tmp_path)
    back = Whitening.load(tmp_path)
    np.testing.assert_array_equal(back.matrix, w.matrix)
    assert (back.fitted_on, back.eps) == (400, 0.0)


def test_whitened_export_embeds_whitened_pooled_vectors(tmp_path):
    from common.whitening import WHITENING_FILE, Whitening

    model, tok = tiny_bert(0)
    pooled = reference(model, tok, TEXTS)
    w = Whitening.fit(pooled)
    d, model, tok = export_tiny(tmp_path / "m", whitening=w)
    meta = read_meta(d)
    assert meta["whitening"] == {"method": "pca-whitening", "dim": 32, "fitted_on": len(TEXTS), "eps": 0.1}
    got = load_encoder(d, device="cpu").embed(TEXTS, batch_size=3)
    np.testing.assert_allclose(got, unit(w.apply(pooled)), atol=1e-4)
    plain = load_encoder(export_tiny(tmp_path / "plain")[0], device="cpu").embed(TEXTS)
    assert np.abs(got - plain).max() > 0.1  # the whitening changed the vectors
    with pytest.raises(InputError, match="only kind 'mlm' carries a whitening"):
        export_tiny(tmp_path / "f", kind="fusion", whitening=w, lexical=None)
    (Path(d) / WHITENING_FILE).unlink()
    with pytest.raises(InputError, match="whitening.npz is missing"):
        load_encoder(d, device="cpu")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_export_roundtrip_matches_reference(tmp_path, pooling):
    d, model, tok = export_tiny(tmp_path / "m", pooling=pooling)
    meta = json.loads((tmp_path / "m" / META_FILE).read_text())
    assert meta["kind"] == "mlm" and meta["format"] == 1 and meta["normalize"] is True and meta["created_at"]
    enc = load_encoder(d, device="cpu")
    assert enc.dim == 32 and enc.meta["model_version"] == "tiny-00000000"
    # batch_size 2 forces length-sorted batches that differ from the single padded reference batch
    got = enc.embed(TEXTS, batch_size=2)
    want = unit(reference(model, tok, TEXTS, pooling))
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(enc.embed(TEXTS[::-1], batch_size=3), got[::-1], atol=1e-5)


def test_save_export_validates(tmp_path):
    model, tok = tiny_bert()
    with pytest.raises(InputError, match="model_version"):
        save_export(tmp_path / "a", {"kind": "mlm", "pooling": "mean", "max_length": 8, "dim": 32}, model=model, tokenizer=tok)
    with pytest.raises(InputError, match="hidden_size"):
        save_export(tmp_path / "b", {"kind": "mlm", "model_version": "x", "pooling": "mean", "max_length": 8, "dim": 16}, model=model, tokenizer=tok)
    with pytest.raises(InputError, match="kind"):
        save_export(tmp_path / "c", {"kind": "bogus", "model_version": "x", "pooling": "mean", "max_length": 8, "dim": 32}, model=model, tokenizer=tok)
    with pytest.raises(InputError, match="item_vectors"):
        save_export(tmp_path / "d", {"kind": "id", "model_version": "x", "dim": 4})


def test_read_meta_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_meta(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="prodrep.json"):
        read_meta(tmp_path / "empty")


def test_id_model_lookup(tmp_path):
    vecs = {"a": [3.0, 4.0], "b": [0.0, 2.0]}
    d = save_export(tmp_path / "id", {"kind": "id", "model_version": "ids-0", "dim": 2}, item_vectors=vecs)
    enc = load_encoder(d, device="cpu")
    got = enc.embed_items(["b", "zzz", "a"])
    np.testing.assert_allclose(got, [[0, 1], [0, 0], [0.6, 0.8]], atol=1e-7)
    assert enc.has_vector(["b", "zzz", "a"]).tolist() == [True, False, True]
    with pytest.raises(InputError, match="no text encoder"):
        enc.embed(["x"])


def test_fusion_adds_id_vectors_before_normalising(tmp_path):
    ids = ["known", "other"]
    id_vecs = np.random.default_rng(0).normal(size=(2, 32)).astype(np.float32)
    d, model, tok = export_tiny(tmp_path / "f", kind="fusion", id_embeddings=(ids, id_vecs))
    assert (tmp_path / "f" / ID_EMBEDDINGS_FILE).exists()
    enc = load_encoder(d, device="cpu")
    texts = ["red retrospot cake stand", "JUMBO BAG RED RETROSPOT"]
    got = enc.embed_items(["known", "new-item"], texts, batch_size=1)
    pooled = unit(reference(model, tok, texts))  # the text vector: the normalised pooled output
    np.testing.assert_allclose(got[0], unit(pooled[0] + id_vecs[0]), atol=1e-5)
    np.testing.assert_allclose(got[1], pooled[1], atol=1e-5)  # no history -> pure text vector


def assert_round_trips(lex, d, saved_file: str) -> None:
    """Saved to ``d`` (which then holds ``saved_file``) and loaded back, ``lex`` transforms unchanged."""
    from common.lexical import Lexical

    d.mkdir()
    lex.save(d)
    assert (d / saved_file).exists()
    again = Lexical.load(d)
    new = ["red cake stand for christmas", "zzz unknown words"]
    np.testing.assert_allclose(again.transform(new), lex.transform(new), atol=0)
    assert not again.transform(["zzz"]).any()  # no known term: a zero row, not NaN


def test_lexical_block_matches_sklearn_tfidf_and_round_trips(tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    from common.lexical import LEXICAL_FILE, Lexical

    lex = Lexical.fit(TEXTS, max_features=1000)
    want = TfidfVectorizer(sublinear_tf=True).fit_transform(TEXTS).toarray()  # the obvious reference
    assert lex.vocabulary == tuple(TfidfVectorizer().fit(TEXTS).get_feature_names_out())
    np.testing.assert_allclose(lex.transform(TEXTS), want, atol=1e-6)
    assert Lexical.fit(TEXTS, max_features=3).size == 3  # the cap bounds the vector size
    assert_round_trips(lex, tmp_path / "x", LEXICAL_FILE)


def test_projected_lexical_block_is_lsa_of_tfidf_with_a_fixed_size(tmp_path):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    from common.lexical import COMPONENTS_FILE, Lexical

    lex = Lexical.fit(TEXTS, max_features=1000, dim=3, seed=0)
    assert lex.size == 3 and lex.vocab_size > 3 and lex.describe() == {"vocab_size": lex.vocab_size, "dim": 3, "projection": "tfidf-lsa"}
    # the obvious reference: sklearn's TF-IDF -> TruncatedSVD pipeline, rows re-normalised
    x = TfidfVectorizer(sublinear_tf=True).fit_transform(TEXTS)
    want = np.nan_to_num(unit(TruncatedSVD(n_components=3, algorithm="randomized", n_iter=7, random_state=0).fit(x).transform(x)))
    np.testing.assert_allclose(lex.transform(TEXTS), want, atol=1e-5)
    assert_round_trips(lex, tmp_path / "x", COMPONENTS_FILE)
    assert Lexical.fit(TEXTS, max_features=1000, dim=10_000).components is None  # dim >= vocabulary: unprojected
    model, tok = tiny_bert()
    meta = {"kind": "fusion", "model_version": "lsa-0", "pooling": "mean", "max_length": 64, "dim": 32 + 3,
            "lexical": {"dense_weight": 0.6}}  # fmt: skip
    d = save_export(tmp_path / "f", meta, model=model, tokenizer=tok, lexical=lex)
    assert read_meta(d)["lexical"] == {"vocab_size": lex.vocab_size, "dim": 3, "projection": "tfidf-lsa", "dense_weight": 0.6}
    texts = ["red retrospot cake stand", "christmas lights"]
    text_vec = np.hstack([0.6 * unit(reference(model, tok, texts)), 0.8 * lex.transform(texts)])
    np.testing.assert_allclose(load_encoder(d, device="cpu").embed(texts), text_vec, atol=1e-5)


def test_fusion_with_lexical_block_concatenates_weighted_unit_blocks(tmp_path):
    from common.lexical import Lexical

    lex = Lexical.fit(TEXTS, max_features=1000)
    ids = ["known"]
    id_vec = np.random.default_rng(1).normal(size=(1, 32 + lex.size)).astype(np.float32)
    model, tok = tiny_bert()
    meta = {"kind": "fusion", "model_version": "lex-0", "pooling": "mean", "max_length": 64, "dim": 32 + lex.size,
            "lexical": {"dense_weight": 0.6}}  # fmt: skip
    d = save_export(tmp_path / "f", meta, model=model, tokenizer=tok, id_embeddings=(ids, id_vec), lexical=lex)
    assert read_meta(d)["lexical"] == {"vocab_size": lex.size, "dense_weight": 0.6}
    enc = load_encoder(d, device="cpu")
    texts = ["red retrospot cake stand", "christmas lights"]
    text_vec = np.hstack([0.6 * unit(reference(model, tok, texts)), 0.8 * lex.transform(texts)])
    np.testing.assert_allclose(enc.embed(texts), text_vec, atol=1e-5)
    got = enc.embed_items(["known", "cold"], texts)
    np.testing.assert_allclose(got[0], unit(text_vec[0] + id_vec[0]), atol=1e-5)
    np.testing.assert_allclose(got[1], text_vec[1], atol=1e-5)
    with pytest.raises(InputError, match="dense_weight"):  # the mix the block was trained with is required
        save_export(tmp_path / "h", {**meta, "lexical": None}, model=model, tokenizer=tok, lexical=lex)
    with pytest.raises(InputError, match="hidden_size"):  # dim must count the lexical block
        save_export(tmp_path / "g", {**meta, "dim": 32}, model=model, tokenizer=tok, lexical=lex)


def test_minilm_bare_dir():
    meta = read_meta(minilm_path())
    assert (meta["kind"], meta["pooling"], meta["dim"], meta["max_length"]) == ("pretrained", "mean", 384, 256)
    enc = cached_encoder(minilm_path(), "cpu")
    assert cached_encoder(minilm_path(), "cpu") is enc  # loaded once per process
    q, near, far = enc.embed(["christmas lights", "SET OF 20 CHRISTMAS FAIRY LIGHTS", "CERAMIC TEA CUP AND SAUCER"])
    assert float(q @ near) > float(q @ far) + 0.2
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path()).eval()
    np.testing.assert_allclose(enc.embed(TEXTS, batch_size=3), unit(reference(model, tok, TEXTS, max_length=256)), atol=1e-5)


def test_model_uri_is_downloaded_once_per_content(tmp_path, monkeypatch):
    """A model given as a URI (here file://) is copied into the per-machine cache, keyed by content:
    the same export maps to the same dir, a changed export to a new one."""
    from common.models import local_model_dir

    src = tmp_path / "export"
    src.mkdir()
    (src / "config.json").write_text('{"hidden_size": 8}')
    (src / "weights.bin").write_bytes(b"0123")
    monkeypatch.setenv("PRODREP_MODEL_CACHE", str(tmp_path / "cache"))
    first = local_model_dir(src.as_uri())
    assert Path(first).parent == tmp_path / "cache" and (Path(first) / "weights.bin").read_bytes() == b"0123"
    assert local_model_dir(src.as_uri()) == first
    (src / "weights.bin").write_bytes(b"01234")
    assert local_model_dir(src.as_uri()) != first
    assert local_model_dir(str(src)) == str(src)  # a plain path is used where it is
