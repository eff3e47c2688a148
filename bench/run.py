"""``python -m bench.run``: every scenario, rankd beside torch, one table.

Each scenario is run once as a warm-up, then ``--repeat`` times, alternating the sides;
the table shows medians (percentiles where named), the ratio rankd / reference with its
90 % bootstrap interval (how far this run's noise could move it), the target of issue 7
and the verdict (on the ratio itself). The same goes as JSON to
``<out>/<timestamp>.json`` and ``<out>/latest.json``. Progress goes to stderr.

Exit status: 0, or 1 when a scenario could not run (or, with ``--strict``, when a
target was missed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import psutil

from bench import fleet, lifecycle, logs, scale, stacks
from bench.config import Config
from bench.harness import INTERVAL, Row, Scenario, format_value, progress, run_scenario

__all__ = ["all_scenarios", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_REPEAT = 7


def all_scenarios(cfg: Config) -> list[Scenario]:
    return [
        *lifecycle.scenarios(cfg),
        *logs.scenarios(cfg),
        *fleet.scenarios(cfg),
        *stacks.scenarios(cfg),
        *scale.scenarios(cfg),
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="rankd benchmarks side by side with torch.distributed.elastic "
        "(medians, ratios with their 90 % bootstrap intervals, targets of issue 7).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repetition, no verdicts"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run the scenarios whose id or row id contains NAME (repeatable)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"repetitions after the warm-up (default {DEFAULT_REPEAT}, --quick 1)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="directory for the JSON (default %(default)s)"
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser


def _machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if "model name" in ln), "")
    except OSError:
        pass
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:
        torch_version = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch_version,
        "loadavg_start": list(os.getloadavg()),
    }


def _verdict(row: Row) -> str:
    if row.error:
        return "ERROR"
    if row.passed is None:
        return "—" if row.target == "—" else "(quick)"
    return "pass" if row.passed else "FAIL"


def _span(low: float, high: float, unit: str) -> str:
    if unit == "lines/s":
        return f"{low / 1e6:.2f} to {high / 1e6:.2f} M/s"
    return f"{format_value(low, unit).split()[0]} to {format_value(high, unit)}"


def render(rows: Sequence[Row]) -> str:
    header = (
        "scenario",
        "rankd",
        "torch / ref",
        f"ratio ({INTERVAL}% interval)",
        "target",
        "result",
    )
    body = []
    for row in rows:
        ref = format_value(row.reference, row.unit) if row.ref_label else ""
        if row.ref_label and row.ref_label != "torch":
            ref = f"{ref} ({row.ref_label})"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        if row.ratio_low is not None and row.ratio_high is not None:
            ratio += f" ({row.ratio_low:.2f} to {row.ratio_high:.2f})"
        mine = format_value(row.rankd, row.unit)
        if row.value_low is not None and row.value_high is not None:
            low, high = (
                format_value(row.value_low, row.unit),
                format_value(row.value_high, row.unit),
            )
            mine += f" ({low.split()[0]} to {high})"
        body.append((row.title, mine, ref, ratio, row.target, _verdict(row)))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for cells in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    notes = [f"- {row.title.strip()}: {row.note}" for row in rows if row.note]
    if any(row.ratio_low is not None or row.value_low is not None for row in rows):
        notes.append(
            f"- (a to b): the central {INTERVAL} % of a figure (the ratio, or rankd's own "
            "where the target is on it) over bootstrap resamples of the samples; a target "
            "inside it is within this run's noise (the verdict is on the figure itself)"
        )
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def _write(out_dir: Path, report: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(report['started']))}.json"
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else DEFAULT_REPEAT)
    if repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="rankd-bench-"))
    cfg = Config(root=root, quick=args.quick)
    chosen = [
        s for s in all_scenarios(cfg) if not args.only or any(s.matches(n) for n in args.only)
    ]
    if args.list or not chosen:
        for s in all_scenarios(cfg):
            print(f"{s.id}: {', '.join(r.id for r in s.rows)}")
        shutil.rmtree(root, ignore_errors=True)
        return 0 if args.list else 2
    started = time.time()
    report: dict[str, Any] = {
        "started": started,
        "quick": args.quick,
        "repeat": repeat,
        "machine": _machine(),
        "rows": [],
        "scenarios": {},
    }
    rows: list[Row] = []
    try:
        for scenario in chosen:
            got, record = run_scenario(
                scenario, repeat=repeat, warmup=not args.quick, judge=not args.quick
            )
            rows += got
            report["scenarios"][scenario.id] = record
    finally:
        if args.keep:
            progress(f"scratch kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report["rows"] = [r.as_dict() for r in rows]
    report["seconds"] = round(time.time() - started, 1)
    report["machine"]["loadavg_end"] = list(os.getloadavg())
    print(render(rows), flush=True)
    path = _write(args.out, report)
    progress(f"done in {report['seconds']:.0f} s; results in {path}")
    if any(r.error for r in rows):
        return 1
    if args.strict and any(r.passed is False for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
