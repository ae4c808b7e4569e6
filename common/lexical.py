"""The lexical block of a fusion item vector: TF-IDF over the item text, beside the dense encoder.

A fusion model's *text vector* for an item is ``[w * dense, sqrt(1 - w^2) * lexical]``: the
L2-normalised pooled encoder output and the L2-normalised TF-IDF vector, so the cosine of two text
vectors is ``w^2 cos(dense) + (1 - w^2) cos(tfidf)``. Product titles are short and full of exact
tokens (colours, sizes, product-line names) that a small sentence encoder blurs; on Online Retail's
val split the lexical block lifted Recall@20 of cold queries from 0.124 to 0.151 and of all queries
from 0.164 to 0.173 (see ``bench/results/items.md``).

The vocabulary and IDF weights are fitted once (scikit-learn's ``TfidfVectorizer``, sublinear tf) on
the training items' text, saved in the export as ``lexical.json``, and re-applied unchanged at
inference, so an item embedded later in a Spark UDF gets exactly the vector training would give it.

Compact form (the default for new fusion models): the sparse TF-IDF rows are projected onto the top
``dim`` singular directions of the training items' TF-IDF matrix (scikit-learn's ``TruncatedSVD``,
i.e. LSA), saved as ``lexical_components.npy``, then re-normalised. The block then has a fixed size
(``dim``, e.g. 128) whatever the vocabulary, and no dense (items x vocabulary) matrix is ever built:
memory is O(items x dim + dim x vocabulary). Without a projection (older exports, ``dim=0``, or a
vocabulary no larger than ``dim``) the block is the TF-IDF row itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from common.vectors import l2_normalize

LEXICAL_FILE = "lexical.json"
COMPONENTS_FILE = "lexical_components.npy"


@dataclass(frozen=True)
class Lexical:
    """A fitted TF-IDF vocabulary, optionally with an LSA projection. ``transform`` gives L2-normalised
    dense rows of :attr:`size` columns: ``len(vocabulary)``, or ``dim`` when projected."""

    vocabulary: tuple[str, ...]
    idf: np.ndarray  # (V,) float64, scikit-learn's smoothed idf
    components: np.ndarray | None = None  # (dim, V) float32: TruncatedSVD's right singular vectors

    @classmethod
    def fit(cls, texts: Sequence[str], max_features: int, dim: int = 0, seed: int = 0) -> "Lexical":
        """Fit on ``texts``; keep the ``max_features`` most frequent terms; with ``0 < dim < V`` also fit
        the ``dim``-dimensional LSA projection of the (normalised) TF-IDF rows."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        vec = TfidfVectorizer(sublinear_tf=True, max_features=max_features, dtype=np.float32)
        x = vec.fit_transform([t or "" for t in texts])
        vocab = vec.get_feature_names_out()
        components = None
        if 0 < dim < len(vocab):
            from sklearn.decomposition import TruncatedSVD

            svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed)
            svd.fit(x)
            components = np.asarray(svd.components_, dtype=np.float32)
        return cls(tuple(str(w) for w in vocab), np.asarray(vec.idf_, dtype=np.float64), components)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    @property
    def size(self) -> int:
        """Columns of the block: the projection's dim, else the vocabulary size."""
        return int(self.components.shape[0]) if self.components is not None else len(self.vocabulary)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """The block's rows, L2-normalised, float32; an item with no known term gets a zero row."""
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import TfidfVectorizer

        # A fixed vocabulary and use_idf=False gives the sublinear tf; multiplying by the saved idf and
        # normalising is what TfidfTransformer does, without reaching into a fitted object's state.
        tf = TfidfVectorizer(vocabulary=list(self.vocabulary), sublinear_tf=True, use_idf=False, norm=None,
                             dtype=np.float32).fit_transform([t or "" for t in texts])  # fmt: skip
        x = sp.csr_matrix(tf.multiply(self.idf[None, :].astype(np.float32)), dtype=np.float32)
        if self.components is None:
            return l2_normalize(np.asarray(x.toarray(), dtype=np.float32))
        from sklearn.preprocessing import normalize

        x = normalize(x)  # the TF-IDF rows as the projection was fitted on (zero rows stay zero)
        return l2_normalize(np.asarray(x @ self.components.T, dtype=np.float32))

    def describe(self) -> dict:
        """What ``meta["lexical"]`` records about the block (beside the dense weight)."""
        out = {"vocab_size": self.vocab_size}
        if self.components is not None:
            out.update(dim=self.size, projection="tfidf-lsa")
        return out

    def save(self, model_dir: str | os.PathLike) -> None:
        payload = {"kind": "tfidf", "sublinear_tf": True, "vocabulary": list(self.vocabulary), "idf": self.idf.tolist()}
        if self.components is not None:
            payload["projection"] = {"kind": "lsa", "file": COMPONENTS_FILE, "dim": self.size}
            np.save(Path(model_dir) / COMPONENTS_FILE, self.components)
        (Path(model_dir) / LEXICAL_FILE).write_text(json.dumps(payload))

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "Lexical | None":
        """The saved block, or None when the export has none."""
        p = Path(model_dir) / LEXICAL_FILE
        if not p.exists():
            return None
        d = json.loads(p.read_text())
        components = None
        if d.get("projection"):
            components = np.load(Path(model_dir) / d["projection"]["file"]).astype(np.float32)
            if components.shape != (d["projection"]["dim"], len(d["vocabulary"])):
                raise ValueError(f"{model_dir}: {d['projection']['file']} has shape {components.shape}, "
                                 f"lexical.json says ({d['projection']['dim']}, {len(d['vocabulary'])}); re-export the model")  # fmt: skip
        return cls(tuple(d["vocabulary"]), np.asarray(d["idf"], dtype=np.float64), components)


def text_vectors(pooled: np.ndarray, lexical: "Lexical | None", texts: Sequence[str], dense_weight: float) -> np.ndarray:
    """An item's text vector: ``[w * normalize(pooled), sqrt(1 - w^2) * tfidf]`` (no lexical block:
    ``normalize(pooled)``). Each block has unit norm before weighting, so ``w`` alone sets the mix."""
    dense = l2_normalize(np.asarray(pooled, dtype=np.float32))
    if lexical is None:
        return dense
    w = float(dense_weight)
    return np.hstack([w * dense, np.float32(np.sqrt(max(0.0, 1.0 - w * w))) * lexical.transform(texts)]).astype(np.float32)
