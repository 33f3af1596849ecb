"""The ``ladder`` command line: run, resume and report studies; schema; the service client."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError


def _load_spec(path: str) -> object:
    from studies.spec import StudySpec

    try:
        return StudySpec.from_file(path)
    except FileNotFoundError:
        sys.exit(f"error: no such spec file: {path}")
    except OSError as e:  # a directory, no permission
        sys.exit(f"error: cannot read spec file {path}: {e.strerror or e}")
    except ValidationError as e:
        lines = [f"  {'.'.join(str(x) for x in err['loc']) or '(spec)'}: {err['msg']}" for err in e.errors()]
        sys.exit(f"error: invalid study spec {path}:\n" + "\n".join(lines))
    except ValueError as e:
        sys.exit(f"error: invalid study spec {path}: {e}")


def _print_where(study_id: str) -> None:
    from studies.settings import get_settings

    s = get_settings()
    d = s.study_dir(study_id)
    print(f"study {study_id}")
    print(f"  results:   {d}/trials.jsonl")
    print(f"  report:    {d}/report/report.html")
    print(f"  MLflow UI: mlflow ui --backend-store-uri {s.mlflow_uri}  (experiment ladder/{study_id})")


def _print_frontier(study_id: str) -> None:
    from studies.settings import get_settings

    d = get_settings().study_dir(study_id)
    try:
        from studies.records import read_records
        from studies.report import build_report, frontier_table
        from studies.spec import StudySpec

        spec = StudySpec.model_validate_json((d / "spec.json").read_text())
        print(frontier_table(build_report(spec, read_records(d / "trials.jsonl"))))
    except ImportError:
        status = json.loads((d / "status.json").read_text())
        print(json.dumps(status.get("frontier", {}), indent=2))


def cmd_run(args: argparse.Namespace) -> int:
    spec = _load_spec(args.spec)  # before importing Ray and torch: a typo fails at once
    from studies.studydir import prepare_study
    from workers.driver import run_study

    study_id = prepare_study(spec)  # type: ignore[arg-type]
    _print_where(study_id)
    state = run_study(study_id, progress=True)
    print(f"\nstudy {study_id}: {state}")
    _print_frontier(study_id)
    _print_where(study_id)
    return _exit(study_id, state)


def _exit(study_id: str, state: str) -> int:
    if state in ("interrupted", "cancelled", "failed"):
        print(f"resume with: ladder resume {study_id}")
    return 0 if state in ("finished", "cancelled") else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from studies.settings import get_settings
    from workers.driver import run_study

    if not (get_settings().study_dir(args.study_id) / "spec.json").exists():
        sys.exit(f"error: no study {args.study_id!r} under {get_settings().data_dir}/studies")
    state = run_study(args.study_id, resume=True, progress=True)
    print(f"\nstudy {args.study_id}: {state}")
    _print_frontier(args.study_id)
    return _exit(args.study_id, state)


def cmd_schema(args: argparse.Namespace) -> int:
    from studies.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from studies.records import read_records
    from studies.report import frontier_table
    from studies.report_html import write_report
    from studies.settings import get_settings
    from studies.spec import StudySpec

    target = Path(args.target)
    d = target if target.is_dir() else get_settings().study_dir(args.target)
    if not (d / "spec.json").exists():
        sys.exit(f"error: {args.target!r} is neither a study id nor a study directory (no spec.json)")
    spec = StudySpec.model_validate_json((d / "spec.json").read_text())
    out = Path(args.out) if args.out else d / "report"
    report = write_report(spec, read_records(d / "trials.jsonl"), out, {"study_id": d.name})
    print(frontier_table(report))
    print(f"\nreport: {out / 'report.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ladder", description="DPA vs EA capacity-frontier studies.")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a study spec on local Ray (or LADDER_RAY_ADDRESS) in this process")
    r.add_argument("spec")
    r.set_defaults(fn=cmd_run)
    r = sub.add_parser("resume", help="resume an interrupted study exactly where it stopped")
    r.add_argument("study_id")
    r.set_defaults(fn=cmd_resume)
    r = sub.add_parser("schema", help="print the study spec's JSON Schema")
    r.set_defaults(fn=cmd_schema)
    r = sub.add_parser("report", help="write a study's report and print its frontier table")
    r.add_argument("target", help="study id or study directory")
    r.add_argument("--out", help="output directory (default: <study dir>/report)")
    r.set_defaults(fn=cmd_report)
    try:
        from service.cli import add_service_commands
    except ImportError:
        pass
    else:
        add_service_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
