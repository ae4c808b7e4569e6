"""The layer contracts in pyproject.toml ([tool.importlinter]) hold: prodrep (app) > spark_jobs |
ray_train (jobs, independent of each other) > common, lazy imports inside functions included, and no
import cycles inside common. ``make test`` runs this, so CI enforces them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), f"{lint} missing: install the test extra (pip install -e '.[test]')"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's packages, not an installed copy
    res = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
