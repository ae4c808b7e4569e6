"""Data helpers for text training on Ray: reading ``text_shards``, length bucketing / packing, padding
and the MLM masking collator.

Everything except :func:`read_text_splits` works without Ray (plain lists / NumPy / torch), so the
same code runs inside Ray Train workers, in :func:`ray_train.mlm.masked_perplexity`, in tests and in
the GPU benchmark.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from common.config import InputError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data
    import torch

log = logging.getLogger(__name__)

TABLE = "text_shards"
COLUMNS = ["input_ids", "n_tokens", "split", "empty_text"]
MIN_TOKENS = 3  # [CLS] x [SEP]: fewer tokens leave nothing to mask


# ------------------------------------------------------------------------------------- lake + tokenizer
@dataclass(frozen=True)
class ShardsInfo:
    """What ``text_shards``' commit metadata says about the tokenizer that produced it."""

    version: int
    tokenizer_dir: str
    tokenizer_hash: str | None
    vocab_size: int
    max_length: int
    template: str | None = None  # the item-text template the texts were rendered with


def shards_info(lake: str, version: int | None = None) -> ShardsInfo:
    """Read the tokenizer facts recorded with ``text_shards`` (latest version by default)."""
    from common import lake as lk

    dt_version = version if version is not None else lk.table_version(lake, TABLE)
    if dt_version is None:
        lk.delta_table(lake, TABLE)  # raises the clear "run the stage first" error
    meta = lk.commit_info(lake, TABLE, dt_version)
    missing = [k for k in ("tokenizer_dir", "vocab_size", "max_length") if meta.get(k) in (None, "")]
    if missing:
        raise InputError(
            f"{lk.table_uri(lake, TABLE)} (version {dt_version}): commit metadata lacks {missing}; "
            f"rebuild it with `prodrep tokenize --lake {lake}`"
        )
    tok_dir = str(meta["tokenizer_dir"])
    if not lk.is_remote(tok_dir) and not Path(tok_dir).is_absolute():
        tok_dir = f"{lk.root(lake)}/{tok_dir}"  # recorded relative to the lake root
    return ShardsInfo(
        version=int(dt_version),
        tokenizer_dir=tok_dir,
        tokenizer_hash=meta.get("tokenizer_hash"),
        vocab_size=int(meta["vocab_size"]),
        max_length=int(meta["max_length"]),
        template=meta.get("template") or meta.get("text_template"),
    )


def load_tokenizer(tokenizer_dir: str) -> Any:
    """The HF fast tokenizer saved by the tokenize job (or any HF model dir)."""
    from transformers import AutoTokenizer

    if not Path(tokenizer_dir).is_dir():
        raise InputError(f"tokenizer directory {tokenizer_dir} not found: re-run `prodrep tokenize` for this lake")
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _keep_rows(batch: Any, split: str) -> Any:
    """pyarrow batch -> rows of ``split`` that have something to mask."""
    import pyarrow.compute as pc

    mask = pc.and_(
        pc.and_(pc.equal(batch["split"], split), pc.invert(batch["empty_text"])),
        pc.greater_equal(batch["n_tokens"], MIN_TOKENS),
    )
    return batch.filter(mask).select(["input_ids", "n_tokens"])


def read_text_splits(lake: str, version: int | None = None, splits: Sequence[str] = ("train", "val")) -> dict[str, "ray.data.Dataset"]:
    """Ray Datasets of ``text_shards`` rows (input_ids, n_tokens) per split, pinned to one version.

    Empty texts and rows with fewer than 3 tokens are dropped (nothing to mask).
    """
    from common.lake import read_ray

    ds = read_ray(lake, TABLE, version=version, columns=COLUMNS)
    return {
        s: ds.map_batches(_keep_rows, fn_kwargs={"split": s}, batch_format="pyarrow", zero_copy_batch=True)
        for s in splits
    }


def arrow_to_seqs(column: Any) -> list[np.ndarray]:
    """A pyarrow list<int> column (Array or ChunkedArray) -> list of int64 arrays, without per-row Python."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out: list[np.ndarray] = []
    for ch in chunks:
        if len(ch) == 0:
            continue
        offsets = ch.offsets.to_numpy()
        values = ch.values.to_numpy(zero_copy_only=False).astype(np.int64)
        base = offsets[0]
        out.extend(np.split(values[offsets[0] - base : offsets[-1] - base], offsets[1:-1] - base))
    return out


# ---------------------------------------------------------------------------------- batching/bucketing
def bucket_batches(
    seqs: Iterable[np.ndarray],
    batch_size: int,
    rng: np.random.Generator,
    bucket_batches_n: int = 50,
) -> Iterator[list[np.ndarray]]:
    """Length bucketing: fill a buffer of ``bucket_batches_n * batch_size`` sequences, sort it by
    length, cut it into batches of similar length and yield them in shuffled order.

    Padding then costs little (each batch is padded to its own longest row). Buffers hold a fixed
    number of rows, so two workers fed equally many rows yield equally many batches (DDP needs that).
    """
    cap = max(1, bucket_batches_n) * batch_size

    def flush(buf: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
        order = sorted(range(len(buf)), key=lambda i: len(buf[i]))
        batches = [[buf[i] for i in order[j : j + batch_size]] for j in range(0, len(order), batch_size)]
        for k in rng.permutation(len(batches)):
            yield batches[k]

    buf: list[np.ndarray] = []
    for s in seqs:
        buf.append(s)
        if len(buf) == cap:
            yield from flush(buf)
            buf = []
    if buf:
        yield from flush(buf)


def pack_sequences(seqs: Iterable[np.ndarray], max_length: int) -> Iterator[np.ndarray]:
    """Greedy packing: concatenate consecutive ``[CLS] ... [SEP]`` sequences into windows of at most
    ``max_length`` tokens (RoBERTa-style "full sentences"), so no compute goes to padding.

    A sequence never straddles two windows; one longer than ``max_length`` is truncated.
    """
    cur: list[np.ndarray] = []
    n = 0
    for s in seqs:
        s = s[:max_length]
        if n + len(s) > max_length and cur:
            yield np.concatenate(cur)
            cur, n = [], 0
        cur.append(s)
        n += len(s)
    if cur:
        yield np.concatenate(cur)


def pad_batch(seqs: Sequence[np.ndarray], pad_id: int, multiple_of: int = 8) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Right-pad to the batch's longest row (rounded up to ``multiple_of`` for tensor-core friendly
    shapes and few distinct shapes under torch.compile) -> (input_ids int64, attention_mask int64)."""
    import torch

    longest = max(len(s) for s in seqs)
    width = -(-longest // multiple_of) * multiple_of if multiple_of > 1 else longest
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    att = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        att[i, : len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(att)


# ------------------------------------------------------------------------------------------ masking
@dataclass(frozen=True)
class SpecialTokens:
    """Token facts masking needs: ids that are never masked, [MASK], pad, and which ids continue a word."""

    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    vocab_size: int  # size of the tokenizer's vocabulary (random replacements are drawn below it)
    continuation: np.ndarray | None = None  # bool per id: WordPiece "##" piece (for whole-word masking)

    @classmethod
    def from_tokenizer(cls, tok: Any) -> "SpecialTokens":
        vocab = tok.get_vocab()
        if tok.mask_token_id is None or tok.pad_token_id is None:
            raise InputError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no [MASK]/[PAD] token: MLM needs both")
        cont = np.zeros(max(vocab.values()) + 1, dtype=bool)
        for t, i in vocab.items():
            cont[i] = t.startswith("##")
        return cls(
            pad_id=int(tok.pad_token_id),
            mask_id=int(tok.mask_token_id),
            special_ids=tuple(sorted({int(i) for i in tok.all_special_ids})),
            vocab_size=len(tok),
            continuation=cont,
        )


@dataclass(frozen=True)
class MaskingCollator:
    """Dynamic BERT masking: each eligible token is selected with probability ``rate``; selected
    tokens become [MASK] (``mask_frac``), a random token (``random_frac``) or stay unchanged (rest).
    Special and pad tokens are never selected. ``whole_word`` selects WordPiece words as units
    (a word's "##" pieces follow its first piece).

    Called with a list of token-id arrays and a ``torch.Generator``; returns input_ids,
    attention_mask and labels (-100 where not selected).
    """

    tokens: SpecialTokens
    rate: float = 0.15
    mask_frac: float = 0.8
    random_frac: float = 0.1
    whole_word: bool = False
    pad_multiple: int = 8

    def __call__(self, seqs: Sequence[np.ndarray], generator: "torch.Generator") -> dict[str, "torch.Tensor"]:
        ids, att = pad_batch(seqs, self.tokens.pad_id, self.pad_multiple)
        masked, labels = self.mask(ids, generator)
        return {"input_ids": masked, "attention_mask": att, "labels": labels}

    def mask(self, ids: "torch.Tensor", generator: "torch.Generator") -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        special = torch.isin(ids, torch.tensor(self.tokens.special_ids + (self.tokens.pad_id,), dtype=ids.dtype))
        draw = torch.rand(ids.shape, generator=generator)
        if self.whole_word and self.tokens.continuation is not None:
            cont_table = torch.from_numpy(self.tokens.continuation)
            cont = cont_table[ids.clamp(max=len(cont_table) - 1)] & ~special
            starts = ~cont  # a word starts at every non-continuation token (specials start "words" too)
            draw = torch.gather(draw, 1, _first_index(starts))  # every piece takes its first piece's draw
        selected = (draw < self.rate) & ~special
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        action = torch.rand(ids.shape, generator=generator)
        to_mask = selected & (action < self.mask_frac)
        to_random = selected & (action >= self.mask_frac) & (action < self.mask_frac + self.random_frac)
        out = torch.where(to_mask, torch.full_like(ids, self.tokens.mask_id), ids)
        random_ids = torch.randint(0, self.tokens.vocab_size, ids.shape, generator=generator, dtype=ids.dtype)
        out = torch.where(to_random, random_ids, out)
        return out, labels


def _first_index(starts: "torch.Tensor") -> "torch.Tensor":
    """For each position, the column index of the first token of its word (running max of start positions)."""
    import torch

    pos = torch.arange(starts.shape[1]).expand_as(starts)
    return torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values


def fixed_masked_batches(
    seqs: Sequence[np.ndarray], collator: MaskingCollator, batch_size: int, seed: int = 0
) -> list[dict[str, "torch.Tensor"]]:
    """Deterministically masked batches (for perplexity): length-sorted, masked with a generator
    seeded by ``seed`` -- the same sequences and seed always give the same masks."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [collator([seqs[i] for i in order[j : j + batch_size]], gen) for j in range(0, len(order), batch_size)]
