"""``prodrep similar ITEM_ID`` and ``prodrep search "text"``: read the lake, print the closest items.

Driver-only (delta-rs via :func:`common.lake.read_pandas`, no Spark). Both rank by the model's declared
score (:func:`common.scoring.score`: the query's ``embedding`` against every item's ``candidate``,
``embedding`` for cosine models). ``similar`` reads the item's row of ``item_neighbors`` and, when the
table or the item is missing there, scores it against every item of ``item_embeddings`` on the fly.
``search`` embeds the query with the same model the catalog was embedded with (its directory is
recorded in the item_embeddings commit metadata), rendering the query with :func:`common.text.render`
like an item that has only a title, and taking its query-side vector as a cold item's (no history).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from common.command import Command
from common.config import ConfigError, InputError, JobConfig, option
from common.scoring import score

if TYPE_CHECKING:  # pragma: no cover
    from spark_jobs.neighbors import ModelVectors

#: The id a search query is embedded under: no catalog item has it, so the model treats the query as a
#: cold item (text only), whatever its kind.
QUERY_ID = "\x00prodrep-search-query"


@dataclass(frozen=True)
class LookupConfig(JobConfig):
    """Options of ``prodrep similar`` / ``prodrep search``."""

    k: int = option(10, "how many items to print")
    model_version: str = option("", "embedding model; '' = the model of the latest embed run")

    def validate(self) -> None:
        super().validate()
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be >= 1 (e.g. --k 10)")


def resolve_model_version(lake: str, model_version: str = "") -> str:
    """The given model version, or the one of the latest item_embeddings write."""
    if model_version:
        return model_version
    from spark_jobs.neighbors import latest_model_version

    return latest_model_version(lake)


def model_dir_for(lake: str, model_version: str) -> str:
    """The exported model directory that produced ``model_version`` (from item_embeddings metadata)."""
    from common import lake as L

    info = L.commit_info(lake, "item_embeddings")
    models = dict(info.get("models") or {})
    if info.get("model_version") and info.get("model_dir"):
        models.setdefault(info["model_version"], info["model_dir"])
    if model_version not in models:
        raise InputError(
            f"no model directory recorded for {model_version!r} in item_embeddings metadata "
            f"(known: {sorted(models)}); re-run `prodrep embed --model DIR`"
        )
    return models[model_version]


def titles(lake: str, item_ids: list[str]) -> dict[str, str]:
    """item_id -> catalog title for the given items."""
    from common import lake as L

    if not item_ids:
        return {}
    df = L.read_pandas(lake, "catalog", columns=["item_id", "title"], filters=[("item_id", "in", list(item_ids))])
    return dict(zip(df["item_id"], df["title"]))


def load_matrix(lake: str, model_version: str) -> "ModelVectors":
    """One model's query and candidate vectors from item_embeddings."""
    from spark_jobs.neighbors import load_vectors

    return load_vectors(lake, model_version)


def top_k(ids: np.ndarray, candidates: np.ndarray, query: np.ndarray, k: int, exclude: str | None = None) -> pd.DataFrame:
    """Exact top-k of ``score(query, candidates)`` (ties broken by position), optionally excluding one id."""
    scores = score(query[None, :], candidates)[0]
    if exclude is not None:
        scores = np.where(ids == exclude, -np.inf, scores)
    k = min(k, int(np.isfinite(scores).sum()))
    best = np.argsort(-scores, kind="stable")[:k]
    return pd.DataFrame({"neighbor_id": ids[best].astype(str), "score": scores[best].astype(np.float32), "rank": np.arange(1, k + 1)})


def similar(lake: str, item_id: str, k: int = 10, model_version: str = "") -> tuple[pd.DataFrame, str, str]:
    """Top-k neighbours of ``item_id``: (rows rank/score/neighbor_id/title, the item's title, model_version).

    ``rows.attrs["source"]`` says where they came from: item_neighbors, or computed on the fly.
    """
    from common import lake as L

    model_version = resolve_model_version(lake, model_version)
    rows = None
    source = "item_neighbors"
    if L.exists(lake, "item_neighbors"):
        nb = L.read_pandas(
            lake, "item_neighbors", columns=["neighbor_id", "rank", "score"],
            filters=[("model_version", "=", model_version), ("item_id", "=", item_id)],
        )  # fmt: skip
        if len(nb) >= 1:
            rows = nb.sort_values("rank").head(k).reset_index(drop=True)
    if rows is None:  # no neighbour table (or not for this item): exact scores from the embeddings
        source = "item_embeddings (on the fly)"
        vectors = load_matrix(lake, model_version)
        ids = vectors.ids
        hit = np.nonzero(ids == item_id)[0]
        if len(hit) == 0:
            raise InputError(
                f"item {item_id!r} has no embedding for model {model_version} in {L.table_uri(lake, 'item_embeddings')}: "
                f"check the id (catalog.item_id) or re-run `prodrep embed`"
            )
        rows = top_k(ids, vectors.candidate, vectors.query[hit[0]], k, exclude=item_id)
    names = titles(lake, [item_id, *rows["neighbor_id"]])
    rows["title"] = rows["neighbor_id"].map(names).fillna("")
    rows.attrs["source"] = source
    return rows, names.get(item_id, ""), model_version


def search(lake: str, query: str, k: int = 10, model_version: str = "") -> tuple[pd.DataFrame, str]:
    """Items closest to a free-text query, embedded with the catalog's model."""
    from common.models import cached_encoder
    from common.text import DEFAULT_TEMPLATE, render

    model_version = resolve_model_version(lake, model_version)
    encoder = cached_encoder(model_dir_for(lake, model_version), "cpu")
    if encoder.kind == "id":
        raise InputError(f"model {model_version} is an ID model (no text encoder): search needs a text model (mlm, fusion, pretrained, softmax)")
    text = render({"title": query}, encoder.meta.get("text_template") or DEFAULT_TEMPLATE)
    if not text:
        raise InputError('search: the query is empty; pass some text, e.g. prodrep search --lake L "christmas lights"')
    q = encoder.embed_pair([QUERY_ID], [text])[0][0]
    vectors = load_matrix(lake, model_version)
    rows = top_k(vectors.ids, vectors.candidate, q, k)
    names = titles(lake, list(rows["neighbor_id"]))
    rows["title"] = rows["neighbor_id"].map(names).fillna("")
    return rows, model_version


def format_rows(rows: pd.DataFrame) -> str:
    lines = [f"{'rank':>4}  {'score':>6}  {'item_id':<12}  title"]
    for r in rows.itertuples():
        lines.append(f"{r.rank:>4}  {r.score:>6.3f}  {r.neighbor_id:<12}  {r.title}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI
def _item_id_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("item_id", help="catalog item id, e.g. 85123A")


def _run_similar(cfg: LookupConfig, args: argparse.Namespace) -> int:
    rows, name, version = similar(cfg.lake, args.item_id, cfg.k, cfg.model_version)
    print(f"items similar to {args.item_id} {name!r}  (model {version}, from {rows.attrs['source']})")
    print(format_rows(rows))
    return 0


def _query_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help='free text, e.g. "christmas lights"')


def _run_search(cfg: LookupConfig, args: argparse.Namespace) -> int:
    rows, version = search(cfg.lake, args.query, cfg.k, cfg.model_version)
    print(f"items closest to {args.query!r}  (model {version})")
    print(format_rows(rows))
    return 0


SIMILAR = Command(LookupConfig, _run_similar, arguments=_item_id_argument)  # prodrep similar
SEARCH = Command(LookupConfig, _run_search, arguments=_query_argument)  # prodrep search
