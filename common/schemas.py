"""Every lake table's schema, defined once.

Each table is a :class:`TableSchema`: an ordered list of :class:`Column` with an Arrow type, nullability
and a one-line doc. Spark ``StructType`` and Arrow schemas are both derived from it, so Spark jobs,
delta-rs, Ray Data and pandas readers agree on names, types and nullability.

Timestamps are UTC microseconds (``timestamp[us, tz=UTC]`` / Spark ``TimestampType``); the Spark
session runs with ``spark.sql.session.timeZone=UTC`` so naive source timestamps keep their wall time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


@dataclass(frozen=True)
class Column:
    """One column: name, Arrow type, whether nulls are allowed, and what it means."""

    name: str
    type: pa.DataType
    nullable: bool
    doc: str


@dataclass(frozen=True)
class TableSchema:
    """A lake table: its name under the lake root, columns, and partition columns."""

    name: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()
    doc: str = ""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def required(self) -> list[str]:
        return [c.name for c in self.columns if not c.nullable]

    def arrow(self) -> pa.Schema:
        """The Arrow schema, with each column's doc in the field metadata."""
        return pa.schema(
            [pa.field(c.name, c.type, nullable=c.nullable, metadata={"doc": c.doc}) for c in self.columns]
        )

    def spark(self):
        """The Spark ``StructType`` (imported lazily: Ray workers need no pyspark)."""
        from pyspark.sql.pandas.types import from_arrow_schema

        return from_arrow_schema(self.arrow())

    def ddl(self) -> str:
        """Spark DDL string, e.g. for ``DataSource.schema()``."""
        return self.spark().simpleString()[len("struct<") : -1]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table {self.name!r} has no column {name!r}; columns are {self.names}")


EVENTS = TableSchema(
    "events",
    (
        Column("event_id", pa.string(), False, "Stable hash of the source row; re-ingesting the same row gives the same id."),
        Column("session_id", pa.string(), False, "Basket / session key (e.g. invoice number)."),
        Column("user_id", pa.string(), True, "Customer id when known."),
        Column("item_id", pa.string(), False, "Item key; joins catalog.item_id."),
        Column("event_type", pa.string(), False, "purchase, click, view, add_to_cart, ... (defaults to 'purchase')."),
        Column("ts", TS, True, "Event time, UTC."),
        Column("quantity", pa.float64(), True, "Units (positive; non-positive rows are quarantined)."),
        Column("price", pa.float64(), True, "Unit price (positive when given)."),
        Column("position", pa.int32(), True, "Position of the item in the session/page when known."),
        Column("split", pa.string(), True, "train/val/test when the source fixes it; overrides automatic splitting."),
    ),
    doc="Validated events: one row per accepted source row.",
)

CATALOG = TableSchema(
    "catalog",
    (
        Column("item_id", pa.string(), False, "Item key."),
        Column("title", pa.string(), False, "Product title (normalised whitespace, never empty)."),
        Column("description", pa.string(), True, "Longer product text."),
        Column("category", pa.string(), True, "Category label (used by the category probe)."),
        Column("brand", pa.string(), True, "Brand."),
        Column("price", pa.float64(), True, "Typical unit price."),
        Column("attributes", pa.map_(pa.string(), pa.string()), True, "Any other source columns, as strings."),
    ),
    doc="One row per item with its text.",
)

QUARANTINE = TableSchema(
    "quarantine",
    (
        Column("source", pa.string(), False, "Which input the row came from: 'events' or 'catalog' (+ file)."),
        Column("raw", pa.string(), False, "The source row as JSON, unmodified."),
        Column("reason", pa.string(), False, "Reason code, e.g. duplicate, cancellation, non_positive_quantity."),
        Column("detail", pa.string(), True, "Human-readable detail (column, value)."),
        Column("job", pa.string(), False, "Job that quarantined the row."),
        Column("ingested_at", TS, False, "When the job ran."),
    ),
    doc="Rows rejected by validation, with a reason; rows in = events + quarantine.",
)

SESSIONS = TableSchema(
    "sessions",
    (
        Column("session_id", pa.string(), False, "Session key (source session_id, or user_id + inactivity gap)."),
        Column("user_id", pa.string(), True, "User, when known."),
        Column("item_ids", pa.list_(pa.string()), False, "Distinct items in order of first appearance."),
        Column("start_ts", TS, True, "First event time."),
        Column("end_ts", TS, True, "Last event time."),
        Column("length", pa.int32(), False, "Number of distinct items."),
        Column("split", pa.string(), False, "train, val or test."),
    ),
    partition_by=("split",),
    doc="One row per session with its split.",
)

COOCCURRENCE = TableSchema(
    "cooccurrence",
    (
        Column("item_a", pa.string(), False, "First item (both orders are stored: the matrix is symmetric)."),
        Column("item_b", pa.string(), False, "Second item, != item_a."),
        Column("count", pa.int64(), False, "Train sessions containing both items (after the session cap)."),
        Column("weight", pa.float64(), False, "Length-discounted count: sum over sessions of r/(n_items-1), r the session's recency (1 without decay)."),
        Column("freq_a", pa.int64(), False, "Train sessions containing item_a."),
        Column("freq_b", pa.int64(), False, "Train sessions containing item_b."),
        Column("cosine", pa.float64(), False, "count / sqrt(freq_a * freq_b)."),
        Column("ppmi", pa.float64(), False, "max(0, log(count * N / (freq_a * freq_b))), N = train sessions."),
        Column("bucket", pa.int32(), False, "Hash bucket of item_a (partition column)."),
    ),
    partition_by=("bucket",),
    doc="Item-item co-occurrence over train sessions.",
)

CUSTOMER_COOCCURRENCE = TableSchema(
    "customer_cooccurrence",
    (
        Column("item_a", pa.string(), False, "First item (both orders are stored: the matrix is symmetric)."),
        Column("item_b", pa.string(), False, "Second item, != item_a."),
        Column("customers", pa.int64(), False, "Known customers who bought both items in their train sessions (after the cap)."),
        Column("weight", pa.float64(), False, "Sum over those customers of r/(m-1): m their distinct items (after the cap), r their newest train session's recency."),
        Column("bucket", pa.int32(), False, "Hash bucket of item_a (partition column)."),
    ),
    partition_by=("bucket",),
    doc="Item-item co-occurrence across a customer's train sessions (one pseudo-basket per customer).",
)

TEXT_SHARDS = TableSchema(
    "text_shards",
    (
        Column("item_id", pa.string(), False, "Item key."),
        Column("text", pa.string(), False, "Normalised text from the template (may be empty)."),
        Column("input_ids", pa.list_(pa.int32()), False, "Token ids incl. [CLS]/[SEP], truncated to max_length."),
        Column("n_tokens", pa.int32(), False, "len(input_ids)."),
        Column("empty_text", pa.bool_(), False, "True when the item had no usable text (kept, flagged)."),
        Column("split", pa.string(), False, "train/val/test by a stable hash of item_id (for perplexity)."),
        Column("shard", pa.int32(), False, "Shard id (partition column)."),
    ),
    partition_by=("shard",),
    doc="Tokenized catalog text for MLM and text encoders.",
)

ITEM_EMBEDDINGS = TableSchema(
    "item_embeddings",
    (
        Column("item_id", pa.string(), False, "Item key."),
        Column("embedding", pa.list_(pa.float32()), False, "Query-side vector; L2-normalised for cosine models."),
        Column(
            "candidate", pa.list_(pa.float32()), True,
            "Candidate-side vector of a model scored by dot product (kind softmax: score(q, c) = "
            "embedding[q] · candidate[c]); null for cosine models, whose candidate vector is `embedding`.",
        ),  # fmt: skip
        Column("dim", pa.int32(), False, "Vector length."),
        Column("model_version", pa.string(), False, "Which model produced it (run name + hash)."),
        Column("text_hash", pa.string(), True, "Hash of the text embedded (for --incremental); null for ID vectors."),
        Column("catalog_version", pa.int64(), True, "Delta version of catalog the vector was computed from."),
    ),
    partition_by=("model_version",),
    doc="One vector per item per model.",
)

ITEM_NEIGHBORS = TableSchema(
    "item_neighbors",
    (
        Column("item_id", pa.string(), False, "Query item."),
        Column("neighbor_id", pa.string(), False, "Neighbour item (never the query)."),
        Column("rank", pa.int32(), False, "1 = most similar."),
        Column("score", pa.float32(), False, "The model's declared score (common.scoring): cosine, or dot of query and candidate vectors."),
        Column("model_version", pa.string(), False, "Embedding model used."),
    ),
    partition_by=("model_version",),
    doc="Top-K neighbours of every item.",
)

# Quarantine reason codes, defined once (ingest writes them; dashboards and tests key on them).
REASONS: dict[str, str] = {
    "missing_field": "a required field (session_id, item_id, event_type, title, ...) is empty",
    "malformed_row": "a CSV row with more or fewer fields than the header (kept verbatim in raw)",
    "bad_encoding": "text that is not valid UTF-8 (decoded as U+FFFD)",
    "cancellation": "session_id starts with a cancellation prefix",
    "adjustment": "session_id starts with an accounting-adjustment prefix",
    "non_product": "item_id is a fee/postage/... code",
    "bad_timestamp": "ts does not parse (or is outside 1900..2200 after epoch-unit detection)",
    "bad_quantity": "quantity is not a number",
    "non_finite_quantity": "quantity is NaN or +-Infinity (including overflow such as 1e309)",
    "non_positive_quantity": "quantity <= 0",
    "bad_price": "price is not a number",
    "non_finite_price": "price is NaN or +-Infinity",
    "non_positive_price": "price < 0 (or <= 0 with reject_zero_price)",
    "bad_user_id": "a numeric user id that is not an integer or does not fit in 64 bits",
    "duplicate": "exact duplicate of an earlier row",
    "unknown_item": "no catalog row with a title for the item",
    "duplicate_item": "catalog item_id already has a row (first wins: sorted file path, then row order)",
}

TABLES: dict[str, TableSchema] = {
    t.name: t
    for t in (EVENTS, CATALOG, QUARANTINE, SESSIONS, COOCCURRENCE, CUSTOMER_COOCCURRENCE, TEXT_SHARDS, ITEM_EMBEDDINGS, ITEM_NEIGHBORS)
}


def schema_for(table: str) -> TableSchema:
    """Look up a table's schema by name, with a clear error for typos."""
    try:
        return TABLES[table]
    except KeyError:
        raise KeyError(f"unknown lake table {table!r}; known tables: {sorted(TABLES)}") from None
