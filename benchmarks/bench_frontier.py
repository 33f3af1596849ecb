"""Frontier search vs grid: trials and CPU-seconds to recover the grid's capacity frontier.

Runs the same spec twice on local Ray, once with ``search.method: grid`` (ground truth)
and once with ``frontier`` (bisection per lane), each in its own driver process, and
compares the frontiers, trial counts and CPU-seconds. Repeat with ``--repeats`` to get
medians.

    .venv/bin/python -m benchmarks.bench_frontier studies/quickstart.yaml --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from studies.records import read_records
from studies.report import build_report
from studies.spec import StudySpec


def run_once(spec: StudySpec, method: str, data_dir: Path) -> dict[str, Any]:
    s = spec.model_copy(update={"search": spec.search.model_copy(update={"method": method})})
    s = StudySpec.model_validate(s.model_dump())
    env = dict(os.environ, LADDER_DATA_DIR=str(data_dir), MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    code = (
        "import sys; from studies.spec import StudySpec; from workers.driver import prepare_study, run_study; "
        "spec = StudySpec.model_validate_json(sys.stdin.read()); sid = prepare_study(spec); "
        "print('STUDY', sid, run_study(sid))"
    )
    out = subprocess.run([sys.executable, "-c", code], input=s.to_json(), env=env, capture_output=True, text=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("STUDY ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-3000:])
    study_id = line.split()[1]
    records = read_records(data_dir / "studies" / study_id / "trials.jsonl")
    report = build_report(s, records)
    frontier = {f"{f.kind}/{f.size}": f.highest_rung for f in report.frontier} if report.is_ladder else {}
    return {"trials": len(records), "cpu_s": sum(r.cpu_s for r in records), "frontier": frontier}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", help="write the raw results here")
    args = p.parse_args()
    spec = StudySpec.from_file(args.spec)
    results: dict[str, list[dict[str, Any]]] = {"grid": [], "frontier": []}
    for _ in range(args.repeats):
        for method in ("grid", "frontier"):
            with tempfile.TemporaryDirectory() as d:
                results[method].append(run_once(spec, method, Path(d)))
    g, f = results["grid"], results["frontier"]
    med = {m: {k: statistics.median(r[k] for r in results[m]) for k in ("trials", "cpu_s")} for m in results}
    agree = [a["frontier"] == b["frontier"] for a, b in zip(g, f, strict=True)]
    print(f"spec: {args.spec}  repeats: {args.repeats}")
    print("| search | trials (median) | CPU-s (median) |")
    print("|---|---|---|")
    for m in ("grid", "frontier"):
        print(f"| {m} | {med[m]['trials']:.0f} | {med[m]['cpu_s']:.1f} |")
    print(
        f"frontier/grid: trials {med['frontier']['trials'] / med['grid']['trials']:.2f}, "
        f"CPU-s {med['frontier']['cpu_s'] / med['grid']['cpu_s']:.2f}"
    )
    print(f"same frontier as the grid in {sum(agree)}/{len(agree)} repeats")
    for a, b in zip(g, f, strict=True):
        diff = {
            k: (a["frontier"].get(k), b["frontier"].get(k))
            for k in a["frontier"]
            if a["frontier"][k] != b["frontier"].get(k)
        }
        if diff:
            print(f"  differs (grid, frontier): {diff}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
