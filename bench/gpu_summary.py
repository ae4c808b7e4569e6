"""Summary table of ``bench/gpu.sh``: reads the three step logs and prints one markdown table.

    python bench/gpu_summary.py LOG_DIR DEVICE_NAME TOTAL_SECONDS [HAVE_SPARK HAVE_RAY]

HAVE_SPARK / HAVE_RAY (1 or 0, default 1): whether the machine could run the Spark / Ray wrappers; where
it could not, the table says so beside the plain-loop figure instead of counting the step as failed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def status(out: Path, name: str) -> tuple[str, str]:
    """(state, seconds) of a step from its ``.rc`` file."""
    try:
        rc, secs = (out / f"{name}.rc").read_text().split()
    except (OSError, ValueError):
        return "not run", "-"
    return ("ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed (rc {rc})"), secs


def mlm_rows(log: str) -> list[tuple[str, str, str]]:
    """(figure, value, vs) rows from bench_mlm.py --gpu's final JSON line."""
    line = next((x for x in reversed(log.splitlines()) if x.startswith('{"mode": "gpu"')), None)
    if line is None:
        return []
    d = json.loads(line)
    res = d["results"]
    base = next(iter(res.values()))["tok_s"]
    return [
        (f"MLM {d['preset']} seq {d['seq_len']} batch {d['batch_size']}: {name}", f"{r['tok_s']:,.0f} tokens/s, MFU {100 * r['mfu']:.1f}%",
         f"{r['tok_s'] / base:.2f}x plain fp32")
        for name, r in res.items()
    ]


def embed_rows(log: str) -> list[tuple[str, str, str]]:
    """Rows from bench_embed.py's 'plain loop' / 'spark UDF' / 'ratio' lines."""
    plain = re.search(r"^plain loop .*?: ([\d,]+) rows/s", log, re.M)
    spark = re.search(r"^spark UDF .*?: ([\d,]+) rows/s", log, re.M)
    ratio = re.search(r"^ratio spark/plain: ([\d.]+)", log, re.M)
    if plain and re.search(r"^spark UDF: not run", log, re.M):
        return [("catalog embedding, MiniLM: plain batched loop (the encoder each Spark task runs)", f"{plain.group(1)} titles/s",
                 "Spark UDF not run: no pyspark/Java here")]  # fmt: skip
    if not (plain and spark and ratio):
        return []
    return [("catalog embedding, MiniLM: Spark mapInArrow UDF", f"{spark.group(1)} titles/s", f"{ratio.group(1)}x plain loop"),
            ("catalog embedding, MiniLM: plain batched loop", f"{plain.group(1)} titles/s", "1.00x")]  # fmt: skip


def items_rows(log: str) -> list[tuple[str, str, str]]:
    """Rows from bench_items.py's stage-1 line."""
    only = re.search(r"^stage 1 text tower \(pairs/s\)\s+plain torch loop ([\d,.]+) .*--plain-only", log, re.M)
    if only:
        return [("train-items fusion, text tower: plain torch loop (fp32)", f"{only.group(1)} pairs/s", "Ray Train not run: no Ray here")]
    m = re.search(r"^stage 1 text tower \(pairs/s\)\s+ray_train.items\s+([\d,.]+) \| plain torch loop\s+([\d,.]+) \| ratio ray/plain ([\d.]+)x", log, re.M)
    if not m:
        return []
    return [("train-items fusion, text tower: Ray Train", f"{m.group(1)} pairs/s", f"{m.group(3)}x plain loop"),
            ("train-items fusion, text tower: plain torch loop", f"{m.group(2)} pairs/s", "1.00x")]  # fmt: skip


def main(argv: list[str]) -> int:
    out, device, total = Path(argv[1]), argv[2], argv[3]
    spark, ray = (argv[4:6] + ["1", "1"])[:2] if len(argv) > 4 else ("1", "1")
    print(f"\n## GPU benchmarks: {device} (total {total}s; logs in {out})\n")
    if "0" in (spark, ray):
        print(f"Wrappers on this machine: Spark {'yes' if spark == '1' else 'no (no pyspark/Java)'}, Ray {'yes' if ray == '1' else 'no'}: "
              "their rows time the plain loops alone.\n")
    print("| step | status | s | figure | value | ratio |")
    print("|---|---|---:|---|---:|---:|")
    failed = 0
    for name, parse in (("mlm", mlm_rows), ("embed", embed_rows), ("items", items_rows)):
        state, secs = status(out, name)
        log = (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").exists() else ""
        rows = parse(log) if state == "ok" else []
        failed += state != "ok" or not rows
        for fig, val, ratio in rows or [("(no figure: see the log)", "-", "-")]:
            print(f"| {name} | {state} | {secs} | {fig} | {val} | {ratio} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
