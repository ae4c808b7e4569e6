"""Run every stage benchmark in turn (``make bench``); each prints its own throughput and ratio table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["bench_delta_write.py", "bench_cooccurrence.py", "bench_mlm.py", "bench_items.py", "bench_softmax_step.py", "bench_softmax_scale.py", "bench_embed.py", "bench_topk.py"]


def main() -> int:
    failed = []
    for name in ORDER:
        script = HERE / name
        if not script.exists():
            continue
        print(f"\n##### {name}", flush=True)
        if subprocess.call([sys.executable, str(script)], cwd=HERE.parent) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
