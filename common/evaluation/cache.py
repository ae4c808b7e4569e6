"""On-disk cache of baseline fits (gensim item2vec), so re-running ``evaluate`` does not retrain them.

An entry is keyed by a sha256 of everything the fit depends on: the exact training sentences (a digest
of the sessions' item lists, so a rebuilt ``sessions`` table with the same content still hits, and any
change to the table misses), the parameters, and :data:`CACHE_FORMAT` (bump it when the fitting code
changes meaning). Entries live under ``<lake>/reports/_cache/`` as ``<key>.npz`` (vocabulary, vectors)
plus ``<key>.json`` (what was fitted, from which table versions, how long it took). Remote lakes are
not cached (the harness writes plain local files).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger("prodrep.evaluate")

CACHE_FORMAT = 1


def sessions_digest(sessions: Sequence[Sequence[str]]) -> str:
    """sha256 of the sessions' item lists, in order (the exact input of a fit)."""
    h = hashlib.sha256()
    for s in sessions:
        h.update("\x1f".join(map(str, s)).encode("utf-8"))
        h.update(b"\x1e")
    return h.hexdigest()


def cache_key(**parts: Any) -> str:
    """Stable key of a fit from JSON-able parts."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


class FitCache:
    """Get-or-fit store of (item ids, vectors) under one directory (``None``: no caching)."""

    def __init__(self, directory: str | Path | None, provenance: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory) if directory else None
        self.provenance = provenance or {}
        self.hits = 0
        self.misses = 0

    def vectors(self, key: str, fit: Callable[[], tuple[list[str], np.ndarray]], what: str) -> tuple[list[str], np.ndarray, bool]:
        """(ids, vectors, from_cache): the stored fit for ``key``, else ``fit()`` (stored for next time)."""
        path = self.dir / f"{key}.npz" if self.dir else None
        if path is not None and path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    ids, vecs = [str(x) for x in z["ids"]], np.asarray(z["vectors"], dtype=np.float32)
                self.hits += 1
                log.info("cache: %s reused from %s", what, path)
                return ids, vecs, True
            except (OSError, KeyError, ValueError) as e:  # a torn or foreign file: refit and overwrite
                log.warning("cache: %s unreadable (%s); refitting", path, e)
        self.misses += 1
        ids, vecs = fit()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, ids=np.asarray(ids, dtype=str), vectors=vecs)
            tmp.replace(path)  # atomic: a reader never sees half a file
            self._write_json(key, {"what": what, **self.provenance})
        return ids, vecs, False

    def _write_json(self, key: str, body: dict[str, Any]) -> None:
        assert self.dir is not None
        (self.dir / f"{key}.json").write_text(json.dumps(body, indent=1, default=str))
