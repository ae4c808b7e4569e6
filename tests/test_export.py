"""Both trainers write their export through ray_train.runtime.write_export: a local target is replaced
as a whole; an object-store target (``s3://``) is written to a temporary local dir and uploaded --
train-items used to hand the URI to save_export, which refuses remote paths, after training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from common.config import InputError
from common.models import read_vectors, save_export
from ray_train import runtime


def _id_export(local: str) -> str:
    meta = {"kind": "id", "model_version": "m-1", "dim": 2}
    return save_export(local, meta, item_vectors=(["a", "b"], np.eye(2, dtype=np.float32)))


def test_save_export_still_refuses_remote_paths(tmp_path):
    with pytest.raises(InputError, match="remote"):
        _id_export("s3://bucket/lake/models/r")


def test_local_export_replaces_the_old_one_wholesale(tmp_path):
    target = tmp_path / "models" / "r"
    target.mkdir(parents=True)
    (target / "stale.bin").write_text("from an earlier run")
    assert runtime.write_export(str(target), _id_export) == str(target)
    assert not (target / "stale.bin").exists()
    assert runtime.read_export_meta(str(target))["model_version"] == "m-1"
    assert read_vectors(target / "item_vectors.parquet")[0] == ["a", "b"]


def test_remote_export_is_uploaded_from_a_temporary_dir(tmp_path, monkeypatch):
    bucket = tmp_path / "bucket"
    uploads: list[tuple[str, str]] = []

    def fake_copy_files(source: str, destination: str, **kw) -> None:  # s3://bucket/... -> tmp_path/bucket/...
        uploads.append((source, destination))
        shutil.copytree(source, bucket / destination.removeprefix("s3://bucket/"))

    monkeypatch.setattr(pafs, "copy_files", fake_copy_files)
    target = "s3://bucket/lake/models/r"
    assert runtime.write_export(target, _id_export) == target
    (source, destination), = uploads
    assert destination == target and not Path(source).exists()  # the temporary dir is gone
    assert json.loads((bucket / "lake/models/r/prodrep.json").read_text())["model_version"] == "m-1"

    monkeypatch.setattr(runtime, "_fs", lambda uri: (pafs.LocalFileSystem(), str(bucket / uri.removeprefix("s3://bucket/"))))
    assert runtime.read_export_meta(target)["kind"] == "id"
