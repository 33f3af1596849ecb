"""benchmarks/bench_packing.py where only torch is installed (the device machine): its recorded quick-start
shapes match the spec, and the parts benchmarks/gpu_packing.sh runs work with Ladder's other packages refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_packing import ROOT, quickstart_shape, resolve_quickstart_shape


@pytest.mark.parametrize("size", [0, 1])
def test_the_recorded_quickstart_shapes_are_what_the_spec_resolves_to(size: int) -> None:
    # If this fails, the quick-start spec or the trial config changed: run
    # `python -m benchmarks.bench_packing --write-shapes` and commit benchmarks/quickstart_shapes.json.
    assert quickstart_shape(size) == resolve_quickstart_shape(size)
    assert quickstart_shape(size, "cuda").device == "cuda"


REFUSING_RUNNER = """
import importlib.abc, runpy, sys

REFUSED = {"ray", "mlflow", "optuna", "pydantic", "pydantic_core", "fastapi", "scipy", "studies", "service"}


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device machine)")
        return None


sys.meta_path.insert(0, Refuse())
if __name__ == "__main__":
    sys.argv = ["bench_packing", *sys.argv[1:]]
    runpy.run_module("benchmarks.bench_packing", run_name="__main__", alter_sys=True)
"""


def test_the_gpu_parts_run_with_only_torch(tmp_path: Path) -> None:
    runner = tmp_path / "refusing_runner.py"
    runner.write_text(REFUSING_RUNNER)
    out = tmp_path / "out.json"
    args = ["--parts", "throughput,kinds", "--steps", "3", "--reps", "1", "--pack-sizes", "1,3"]
    args += ["--form-sizes", "2", "--solo-procs", "2", "--json", str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(runner), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    rows = results["throughput"]["rows"]
    assert set(rows) == {"solo run_trial", "pack 1", "pack 3", "solo run_trial x 2 processes"}
    assert rows["solo run_trial x 2 processes"]["members"] == 2
    assert max(r["vs_solo"] for k, r in rows.items() if k.startswith("solo")) == pytest.approx(1.0)
    assert all(r["trials_per_hour"] > 0 for r in rows.values())
    assert "ea/dpa M=2" in results["kinds"]["rows"]
    assert results["machine_start"]["device"] == "cpu"
