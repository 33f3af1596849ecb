"""The packed quick-start through the real driver on a fresh data dir: end-to-end wall and the driver's phases.

Run it from two checkouts in turn (interleaved, one run each per round) to compare them side by
side; each run reports its wall, the driver's phases from ``status.json`` (``imports_s``,
``startup_s``, ``fit_s``, ``outputs_s``) and the CPU-s of the driver, Ray and the workers::

    for i in 1 2 3; do for t in <old checkout> <new checkout>; do (cd $t && OMP_NUM_THREADS=1 \\
      PYTHONPATH=$t .venv/bin/python -m benchmarks.bench_driver_start --runs 1); done; done
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_packing import _run_study


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_driver_start", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="quick-start runs, each on a fresh data dir")
    p.add_argument("--pack", default="auto", choices=["auto", "off"], help="the spec's execution.pack")
    args = p.parse_args(argv)
    walls, starts = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-start-") as d:
            r = _run_study(args.pack, Path(d))
        walls.append(r["wall_s"])
        starts.append(r["timings"]["startup_s"])
        cpu = {k: round(v, 1) for k, v in r["cpu_s"].items()}
        print(json.dumps({"wall_s": round(r["wall_s"], 2), "timings": r["timings"], "cpu_s": cpu}), flush=True)
    print(f"median wall {statistics.median(walls):.2f} s, median startup_s {statistics.median(starts):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
