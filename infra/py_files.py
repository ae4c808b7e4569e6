"""Build the zip a cluster user passes to ``spark-submit --py-files``: prodrep's packages, sources only.

Usage: ``python infra/py_files.py dist/prodrep-py-files.zip`` (``make dist`` runs it; so does the
cluster stage of the test suite, into its temp dir). Deterministic: sorted entries, fixed timestamps.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prodrep", "common", "spark_jobs", "ray_train")


def build(out: str | Path) -> Path:
    """Write the zip to ``out`` and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for pkg in PACKAGES:
            for p in sorted((ROOT / pkg).rglob("*.py")) if (ROOT / pkg).is_dir() else ():
                rel = p.relative_to(ROOT).as_posix()
                z.writestr(zipfile.ZipInfo(rel, date_time=(2020, 1, 1, 0, 0, 0)), p.read_bytes(), zipfile.ZIP_DEFLATED)
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "dist" / "prodrep-py-files.zip"))
