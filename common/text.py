"""Item text: one template and one normalisation shared by tokenize, training, embedding and evaluation.

Keeping this in one place avoids train/serve skew: the text a model was trained on is exactly the text
it is later applied to. The template is recorded in every text table's and model's metadata.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Mapping

DEFAULT_TEMPLATE = "{title}. {brand}. {category}. {description}"
FIELDS = ("title", "description", "category", "brand")
_WS = re.compile(r"\s+")
_EMPTY_PARTS = re.compile(r"(?:\s*\.\s*){2,}")


def normalize(text: str | None) -> str:
    """NFKC, collapse whitespace, strip; None -> ''. Case is kept (tokenizers lower-case themselves)."""
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", str(text))
    return _WS.sub(" ", text).strip()


def render(row: Mapping[str, Any], template: str = DEFAULT_TEMPLATE) -> str:
    """Fill the template from a catalog row; missing/empty fields drop out with their separator."""
    values = {f: normalize(row.get(f)) for f in FIELDS}
    text = template.format(**values)
    text = _EMPTY_PARTS.sub(". ", text)  # "a. . b" -> "a. b" when a field is empty
    text = text.strip(" .")
    return normalize(text)


def text_hash(text: str) -> str:
    """Short stable hash of an item's text (drives incremental re-embedding)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
