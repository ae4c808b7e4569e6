"""How a model scores a (query item, candidate item) pair: the one definition every consumer uses.

Two scorings exist, declared in the export's ``prodrep.json`` (``meta["scoring"]``) and in
``item_embeddings`` (a row's ``candidate`` column):

* ``cosine`` (every kind but ``softmax``): one L2-normalised vector per item; score = ``v_q · v_c``.
* ``dot`` (kind ``softmax``): two vectors per item, a query side (``embedding``) and a candidate side
  (``candidate``); score = ``q_q · c_c``, not symmetric and not bounded. Cosine over one normalised
  vector cannot say "a buys b but b does not buy a", nor keep how often an item is bought; the
  candidate side carries a bias and a popularity term so it can (:class:`SoftmaxHead`).

Both are a plain inner product of what ``item_embeddings`` stores, so a vector index (FAISS inner
product, any ANN store's ``dot``) serves either: index the ``candidate`` column (``embedding`` for
cosine models), query with ``embedding``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

COSINE, DOT = "cosine", "dot"
HEAD_FILE = "softmax_head.npz"
HEAD_ITEMS_FILE = "softmax_items.parquet"


def declared(meta: Mapping[str, Any]) -> str:
    """The scoring an export declares: ``dot`` or ``cosine`` (older exports: cosine)."""
    return str((meta.get("scoring") or {}).get("type", COSINE))


def score(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Scores of queries ``(B, d)`` against candidates ``(N, d)``: ``(B, N)``, for either scoring."""
    return np.asarray(query, dtype=np.float32) @ np.asarray(candidates, dtype=np.float32).T


@dataclass(frozen=True)
class SoftmaxHead:
    """Serving head of kind ``softmax`` over an item's frozen text features ``t`` (``(D,)``).

    For an item with history (``item_ids``) and without (cold: text only)::

        query     = [t A + e_i,  1,  beta_warm,  sqrt(gamma) t P]        (cold: [t A, 1, beta_cold, ...])
        candidate = [t B + u_j,  t·b + b_j,  -log1p(freq_j),  sqrt(gamma) t P]   (cold: [t B, t·b, 0, ...])

    so ``query · candidate = q_i·c_j + t_j·b + b_j - beta·log1p(freq_j) + gamma (t_i P)·(t_j P)``:
    the model's logit for "j is bought with i" (trained with a full softmax over the catalog), minus
    a popularity penalty whose strength depends on whether the query has history, plus a text-match
    term (``P``: the top principal directions of the train items' text features, so the term is the
    text similarity in ``k`` dimensions). ``beta`` and ``gamma`` are chosen on val, like RP3beta's
    beta: the low-rank logit alone blurs exact lexical matches that a shopper's basket often holds.
    """

    query_proj: np.ndarray  # (D, d) A
    cand_proj: np.ndarray  # (D, d) B
    text_bias: np.ndarray  # (D,) b
    item_ids: tuple[str, ...]  # items with history
    query_id: np.ndarray  # (n, d) e
    cand_id: np.ndarray  # (n, d) u
    bias: np.ndarray  # (n,) b_j
    freq: np.ndarray  # (n,) train sessions holding the item
    beta_warm: float
    beta_cold: float
    text_basis: np.ndarray | None = None  # (D, k) P of the text-match term; None = no term
    gamma: float = 0.0

    @property
    def text_dim(self) -> int:
        return int(self.query_proj.shape[0])

    @property
    def match_dim(self) -> int:
        return 0 if self.text_basis is None else int(self.text_basis.shape[1])

    @property
    def dim(self) -> int:
        """Length of the served query / candidate vectors."""
        return int(self.query_proj.shape[1]) + 2 + self.match_dim

    @cached_property
    def index(self) -> dict[str, int]:
        """item id -> row of the per-item parts (built once; embed calls :meth:`vectors` per batch)."""
        return {i: n for n, i in enumerate(self.item_ids)}

    def _rows(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        index = self.index
        rows = np.fromiter((index.get(str(i), -1) for i in item_ids), dtype=np.int64, count=len(item_ids))
        return rows, rows >= 0

    def vectors(self, item_ids: Sequence[str], text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query, candidate) vectors ``(n, dim)`` of items with text features ``text`` ``(n, D)``."""
        text = np.asarray(text, dtype=np.float32)
        if text.shape[1] != self.text_dim:
            raise ValueError(f"text features have {text.shape[1]} columns, the softmax head expects {self.text_dim}")
        rows, known = self._rows(item_ids)
        r = rows[known]
        n = len(item_ids)
        d = self.query_proj.shape[1]
        q = np.zeros((n, self.dim), np.float32)
        c = np.zeros((n, self.dim), np.float32)
        q[:, :d] = text @ self.query_proj
        c[:, :d] = text @ self.cand_proj
        q[known, :d] += self.query_id[r]
        c[known, :d] += self.cand_id[r]
        q[:, d] = 1.0
        q[:, d + 1] = np.where(known, self.beta_warm, self.beta_cold)
        c[:, d] = text @ self.text_bias
        c[known, d] += self.bias[r]
        c[known, d + 1] = -np.log1p(self.freq[r].astype(np.float64)).astype(np.float32)
        if self.text_basis is not None:
            q[:, d + 2 :] = c[:, d + 2 :] = np.sqrt(self.gamma) * (text @ self.text_basis)
        return q, c

    def describe(self) -> dict[str, Any]:
        """``meta["scoring"]`` of an export with this head."""
        return {"type": DOT, "head": "softmax", "beta_warm": float(self.beta_warm), "beta_cold": float(self.beta_cold),
                "gamma": float(self.gamma), "text_match_dim": self.match_dim, "text_dim": self.text_dim,
                "items_with_history": len(self.item_ids),
                "formula": "embedding[q] . candidate[c] = q_q.c_c + t_c.b + b_c - beta(q) * log1p(freq_c) + gamma * (t_q P).(t_c P)"}  # fmt: skip

    def save(self, model_dir: str | os.PathLike) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = Path(model_dir)
        np.savez(p / HEAD_FILE, query_proj=self.query_proj.astype(np.float32), cand_proj=self.cand_proj.astype(np.float32),
                 text_bias=self.text_bias.astype(np.float32), betas=np.array([self.beta_warm, self.beta_cold]),
                 gamma=np.array(self.gamma), text_basis=np.zeros((self.text_dim, 0), np.float32) if self.text_basis is None
                 else self.text_basis.astype(np.float32))  # fmt: skip
        d = self.query_id.shape[1]

        def lists(m: np.ndarray) -> pa.Array:
            flat = pa.array(np.ascontiguousarray(m, np.float32).reshape(-1))
            return pa.ListArray.from_arrays(pa.array(np.arange(0, (len(m) + 1) * d, d, dtype=np.int32)), flat)

        pq.write_table(pa.table({"item_id": pa.array(list(self.item_ids), pa.string()), "query_id": lists(self.query_id),
                                 "cand_id": lists(self.cand_id), "bias": pa.array(self.bias.astype(np.float32)),
                                 "freq": pa.array(self.freq.astype(np.int64))}), p / HEAD_ITEMS_FILE)  # fmt: skip

    @classmethod
    def load(cls, model_dir: str | os.PathLike, beta_warm: float | None = None, beta_cold: float | None = None) -> SoftmaxHead:
        """The saved head; ``beta_*`` override the trained defaults (e.g. to re-tune them on val)."""
        import pyarrow.parquet as pq

        p = Path(model_dir)
        for f in (HEAD_FILE, HEAD_ITEMS_FILE):
            if not (p / f).exists():
                raise FileNotFoundError(f"{p / f} missing: a kind 'softmax' export needs it (re-export the model)")
        z = np.load(p / HEAD_FILE)
        t = pq.read_table(p / HEAD_ITEMS_FILE)
        d = int(z["query_proj"].shape[1])
        n = t.num_rows

        def mat(col: str) -> np.ndarray:
            flat = t.column(col).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            return np.asarray(flat, np.float32).reshape(n, d)

        bw, bc = (float(x) for x in z["betas"])
        basis = z["text_basis"] if "text_basis" in z.files and z["text_basis"].shape[1] else None
        return cls(z["query_proj"], z["cand_proj"], z["text_bias"], tuple(str(i) for i in t.column("item_id").to_pylist()),
                   mat("query_id"), mat("cand_id"), t.column("bias").to_numpy().astype(np.float32),
                   t.column("freq").to_numpy().astype(np.int64),
                   bw if beta_warm is None else float(beta_warm), bc if beta_cold is None else float(beta_cold),
                   basis, float(z["gamma"]) if "gamma" in z.files else 0.0)  # fmt: skip
