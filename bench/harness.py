"""The benchmark machinery: scenarios with sides, repetitions, statistics, targets.

A scenario has one or more *sides* (``rankd``, ``torch``, ...), each a callable that
does the work once and returns its samples (metric name -> values). The runner calls
every side once as a warm-up, then ``repeat`` times in alternating order, pools the
samples, and turns them into rows: a rankd figure, a reference figure, their ratio
with the interval this run's noise allows it (bootstrap), and a verdict against the
row's target.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Row",
    "RowSpec",
    "Samples",
    "Scenario",
    "Target",
    "bootstrap_interval",
    "percentile",
    "progress",
    "run_scenario",
]

Samples = dict[str, list[float]]


# seconds between two sides' runs: what a side leaves running in the background (the
# agent's spare run directory, its job.json writes 10 ms after an end) finishes before
# the other side is measured, and is not counted against it
SETTLE = 0.05


def progress(message: str) -> None:
    """One progress line on stderr (stdout carries only the table)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    data = sorted(values)
    if not data:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(data)))
    return data[min(rank, len(data)) - 1]


_STATS: dict[str, Callable[[list[float]], float]] = {
    "median": lambda v: statistics.median(v) if v else math.nan,
    "p50": lambda v: percentile(v, 50),
    "p99": lambda v: percentile(v, 99),
    "mean": lambda v: statistics.fmean(v) if v else math.nan,
}


INTERVAL = 90  # percent: the ratio's bootstrap interval shown beside it
_RESAMPLES = 2000


def bootstrap_interval(
    mine: list[float],
    stat: Callable[[list[float]], float],
    ref: list[float] | None = None,
    *,
    level: float = INTERVAL,
    resamples: int = _RESAMPLES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """How far stat(mine) (with `ref`: stat(mine) / stat(ref)) moves with this run's
    noise: the central `level` % of that figure over `resamples` bootstrap resamples
    (every side drawn with replacement; seeded: the same samples give the same
    interval). None with fewer than 3 samples on a side."""
    if len(mine) < 3 or (ref is not None and len(ref) < 3):
        return None
    rng = random.Random(seed)
    figures = []
    for _ in range(resamples):
        value = stat(rng.choices(mine, k=len(mine)))
        if ref is None:
            figures.append(value)
            continue
        den = stat(rng.choices(ref, k=len(ref)))
        if den > 0:
            figures.append(value / den)
    if len(figures) < resamples // 2:  # a reference mostly zero: no ratio to speak of
        return None
    tail = (100 - level) / 2
    return percentile(figures, tail), percentile(figures, 100 - tail)


@dataclass(frozen=True)
class Target:
    """``kind``: ``ratio_max`` / ``ratio_min`` (rankd / reference) or ``max`` / ``min``
    (rankd's own figure, in the row's unit)."""

    kind: str
    value: float

    def describe(self, unit: str, ref_label: str) -> str:
        op = "≤" if self.kind.endswith("max") else "≥"
        if self.kind.startswith("ratio"):
            return f"{op} {self.value:g}x {ref_label}"
        if unit in ("ms", "%", "MB"):
            return f"{op} {self.value:g} {unit}"
        return f"{op} {format_value(self.value, unit)}"

    def passes(self, value: float, ratio: float | None) -> bool:
        got = ratio if self.kind.startswith("ratio") else value
        if got is None or math.isnan(got):
            return False
        return got <= self.value if self.kind.endswith("max") else got >= self.value


def format_value(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "—"
    if unit == "ms":
        return f"{value:.3g} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "lines/s":
        return f"{value:,.0f}/s"
    if unit == "%":
        return f"{value:.3f} %"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:g} {unit}"


@dataclass(frozen=True)
class RowSpec:
    """One line of the table. ``metrics``: the rankd side's candidate metrics; with several
    (e.g. two ways to learn a result), the best one by ``stat`` is reported and named."""

    id: str
    title: str
    unit: str
    metrics: tuple[str, ...]
    stat: str = "median"
    side: str = "rankd"
    ref_side: str | None = "torch"
    ref_metric: str | None = None
    ref_label: str = "torch"
    target: Target | None = None
    higher_is_better: bool = False
    note: str = ""
    # Further metrics of the same side whose medians are added to the note.
    note_metrics: tuple[str, ...] = ()
    note_unit: str = ""


@dataclass
class Row:
    id: str
    title: str
    unit: str
    rankd: float | None
    reference: float | None
    ref_label: str
    ratio: float | None
    target: str
    passed: bool | None  # None: no verdict (no target, --quick, or an error)
    note: str = ""
    samples: int = 0
    error: str = ""
    # INTERVAL % bootstrap intervals (None: too few samples): of the ratio, and of
    # rankd's own figure where the target is on that figure
    ratio_low: float | None = None
    ratio_high: float | None = None
    value_low: float | None = None
    value_high: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in self.__dict__.items()}


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def _evaluate(spec: RowSpec, samples: dict[str, Samples], judge: bool) -> Row:
    mine = samples.get(spec.side, {})
    stat = _STATS[spec.stat]
    candidates = [(stat(mine[m]), m) for m in spec.metrics if mine.get(m)]
    note = spec.note
    if candidates:
        pick = max if spec.higher_is_better else min
        value, metric = pick(candidates)
        if len(spec.metrics) > 1:
            others = ", ".join(
                f"{m} {format_value(v, spec.unit)}" for v, m in candidates if m != metric
            )
            note = f"via {metric}" + (f" (other: {others})" if others else "")
        count = len(mine[metric])
    else:
        value, count, metric = math.nan, 0, ""
    extra = [
        f"{m} {format_value(statistics.median(mine[m]), spec.note_unit or spec.unit)}"
        for m in spec.note_metrics
        if mine.get(m)
    ]
    if extra:
        note = "; ".join([*([note] if note else []), *extra])
    reference, interval, own = None, None, None
    if spec.ref_side is not None:
        ref = samples.get(spec.ref_side, {}).get(spec.ref_metric or spec.metrics[0], [])
        reference = stat(ref) if ref else math.nan
        if metric:
            interval = bootstrap_interval(mine[metric], stat, ref)
    if metric and spec.target is not None and not spec.target.kind.startswith("ratio"):
        own = bootstrap_interval(mine[metric], stat)
    ratio = value / reference if reference and not math.isnan(reference) else None
    target = spec.target.describe(spec.unit, spec.ref_label) if spec.target else "—"
    passed = spec.target.passes(value, ratio) if spec.target and judge else None
    return Row(
        id=spec.id,
        title=spec.title,
        unit=spec.unit,
        rankd=value,
        reference=reference,
        ref_label=spec.ref_label if spec.ref_side else "",
        ratio=ratio,
        target=target,
        passed=passed,
        note=note,
        samples=count,
        ratio_low=interval[0] if interval and ratio is not None else None,
        ratio_high=interval[1] if interval and ratio is not None else None,
        value_low=own[0] if own else None,
        value_high=own[1] if own else None,
    )


@dataclass
class Scenario:
    """Sides run in the given order on even repetitions, reversed on odd ones.

    ``setup`` returns the state the sides share (agents, servers); ``teardown`` gets it
    back and must release everything, also after an error. ``extras`` may add
    free-form facts to the JSON report."""

    id: str
    sides: dict[str, Callable[[Any], Samples]]
    rows: list[RowSpec]
    setup: Callable[[], Any] = lambda: None
    teardown: Callable[[Any], None] = lambda state: None
    repeat: int | None = None  # None: the run's --repeat
    warmup: bool = True
    extras: Callable[[Any], dict[str, Any]] | None = None
    results: dict[str, Samples] = field(default_factory=dict)

    def matches(self, pattern: str) -> bool:
        return pattern in self.id or any(pattern in r.id for r in self.rows)


def _merge(into: Samples, got: Samples) -> None:
    for metric, values in got.items():
        into.setdefault(metric, []).extend(values)


def _brief(got: Samples) -> str:
    parts = []
    for metric, values in got.items():
        if values:
            parts.append(f"{metric}={statistics.median(values):.4g}")
    return " ".join(parts)


def run_scenario(
    scenario: Scenario, *, repeat: int, warmup: bool, judge: bool
) -> tuple[list[Row], dict[str, Any]]:
    """Run one scenario; returns its rows and its JSON record (samples, extras, error)."""
    reps = scenario.repeat or repeat
    samples: dict[str, Samples] = {side: {} for side in scenario.sides}
    record: dict[str, Any] = {"samples": samples}
    started = time.perf_counter()
    error = ""
    state = None
    try:
        progress(f"{scenario.id}: setting up")
        state = scenario.setup()
        if warmup and scenario.warmup:
            for name, side in scenario.sides.items():
                side(state)
                progress(f"{scenario.id}: warm-up {name} done")
        names = list(scenario.sides)
        for rep in range(reps):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                time.sleep(SETTLE)
                got = scenario.sides[name](state)
                _merge(samples[name], got)
                progress(f"{scenario.id}: rep {rep + 1}/{reps} {name}: {_brief(got)}")
        if scenario.extras is not None:
            record["extras"] = scenario.extras(state)
    except Exception as err:
        error = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc()
        progress(f"{scenario.id}: ERROR {error}\n{record['traceback']}")
    finally:
        try:
            scenario.teardown(state)
        except Exception as err:
            progress(f"{scenario.id}: teardown failed: {type(err).__name__}: {err}")
            error = error or f"teardown: {type(err).__name__}: {err}"
    record["seconds"] = round(time.perf_counter() - started, 2)
    rows = [_evaluate(spec, samples, judge) for spec in scenario.rows]
    if error:
        record["error"] = error
        for row in rows:
            row.error, row.passed = error, None
    return rows, record
