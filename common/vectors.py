"""Vector helpers shared by model loading (:mod:`common.models`), the lexical block
(:mod:`common.lexical`) and the embedding job: a leaf module, so neither imports the other for them."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
