"""bench/gpu_summary.py: the table of bench/gpu.sh, from step logs of both modes (with and without the
Spark/Ray wrappers). Log lines are the scripts' real output (the no-wrapper ones from an H200 run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_summary", ROOT / "bench" / "gpu_summary.py")
gs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gs)

MLM = json.dumps({"mode": "gpu", "device": "NVIDIA H200", "preset": "base", "seq_len": 128, "batch_size": 256, "results": {
    "plain fp32 (HF forward, all-token head)": {"tok_s": 67120.4, "mfu": 0.0446},
    "ray_train.mlm step + torch.compile": {"tok_s": 603692.9, "mfu": 0.4011}}})  # fmt: skip
EMBED_PLAIN = "plain loop (1 process, 8 torch threads): 45,190 rows/s (median of 3)\nspark UDF: not run (--no-spark)\n"
EMBED_BOTH = ("plain loop (1 process, 2 torch threads): 69 rows/s (median of 3)\n"
              "spark UDF  (local[2], 2 partitions, 1 thread/task): 107 rows/s\nratio spark/plain: 1.56\n")  # fmt: skip
ITEMS_PLAIN = ("stage 1 text tower (pairs/s)       plain torch loop 6,808.7 (runs [6808.7, 6464.5, 6867.7]; 2,092,152 pairs, "
               "3,356 items; ray_train.items not run: --plain-only)\n")  # fmt: skip
ITEMS_BOTH = ("stage 1 text tower (pairs/s)       ray_train.items       68.6 | plain torch loop       92.4 | ratio ray/plain 0.74x "
              "(runs: ray [68.6], plain [92.4])\n")  # fmt: skip


def test_parsers_read_both_modes() -> None:
    rows = gs.mlm_rows("noise\n" + MLM + "\n")
    assert [r[1] for r in rows] == ["67,120 tokens/s, MFU 4.5%", "603,693 tokens/s, MFU 40.1%"]
    assert rows[1][2] == "8.99x plain fp32"
    assert gs.embed_rows(EMBED_PLAIN) == [(
        "catalog embedding, MiniLM: plain batched loop (the encoder each Spark task runs)", "45,190 titles/s",
        "Spark UDF not run: no pyspark/Java here")]  # fmt: skip
    assert [r[1:] for r in gs.embed_rows(EMBED_BOTH)] == [("107 titles/s", "1.56x plain loop"), ("69 titles/s", "1.00x")]
    assert gs.items_rows(ITEMS_PLAIN)[0][1:] == ("6,808.7 pairs/s", "Ray Train not run: no Ray here")
    assert [r[1:] for r in gs.items_rows(ITEMS_BOTH)] == [("68.6 pairs/s", "0.74x plain loop"), ("92.4 pairs/s", "1.00x")]
    assert gs.embed_rows("plain loop (1 process): crashed") == [] and gs.items_rows("") == []


def test_table_marks_failed_and_missing_steps(tmp_path: Path, capsys) -> None:
    (tmp_path / "mlm.log").write_text(MLM + "\n")
    (tmp_path / "mlm.rc").write_text("0 139\n")
    (tmp_path / "embed.log").write_text("Traceback ...\n")
    (tmp_path / "embed.rc").write_text("124 100\n")  # items never ran
    rc = gs.main(["gpu_summary.py", str(tmp_path), "NVIDIA H200", "240", "0", "0"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "| embed | timed out | 100 | (no figure: see the log) |" in out
    assert "| items | not run | - |" in out
    assert "Spark no (no pyspark/Java), Ray no" in out
    assert "| mlm | ok | 139 | MLM base seq 128 batch 256: ray_train.mlm step + torch.compile | 603,693 tokens/s, MFU 40.1% | 8.99x plain fp32 |" in out
