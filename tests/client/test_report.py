"""The failure report: root cause rule, clock correction, folding, length."""

from __future__ import annotations

import time

from rankd.client.clock import ClockEstimator, ClockSample, RoundTrip
from rankd.client.report import NodeView, build_report, fold, format_ranks
from rankd.v1 import agent_pb2

T0 = 1_800_000_000.0


def failure(
    local_rank: int,
    ts: float,
    *,
    exit_code: int = -15,
    terminated: bool = True,
    message: str = "",
    traceback: str = "",
    pid: int | None = None,
    stderr_tail: tuple[str, ...] = (),
) -> agent_pb2.Failure:
    signal_name = {-15: "SIGTERM", -9: "SIGKILL", -11: "SIGSEGV"}.get(exit_code, "")
    pid = pid if pid is not None else 1000 + local_rank
    if not message:
        message = (
            f"Signal {-exit_code} ({signal_name}) received by PID {pid}"
            if exit_code < 0
            else f"Process {pid} exited with code {exit_code}"
        )
    return agent_pb2.Failure(
        local_rank=local_rank,
        pid=pid,
        exit_code=exit_code,
        signal_name=signal_name,
        message=message,
        error_file="<N/A>",
        traceback=traceback,
        timestamp=ts,
        stderr_tail=list(stderr_tail),
        terminated_by_agent=terminated,
    )


def node(i: int, nproc: int, clock: ClockSample | None = None) -> NodeView:
    return NodeView(f"host{i:02d}:29600", f"host{i:02d}", i, i * nproc, clock)


def status(*failures: agent_pb2.Failure) -> agent_pb2.JobStatus:
    return agent_pb2.JobStatus(job_id="j", state=agent_pb2.FAILED, failures=list(failures))


def test_format_ranks() -> None:
    assert format_ranks([]) == ""
    assert format_ranks([5]) == "5"
    assert format_ranks([3, 0, 1, 2, 8, 9, 10, 11]) == "0-3,8-11"
    assert format_ranks([0, 2, 4]) == "0,2,4"
    assert format_ranks(range(0, 40, 2), limit=3) == "0,2,4,... (17 more ranges)"


def test_root_cause_is_earliest_own_failure_and_has_the_traceback() -> None:
    trace = 'Traceback (most recent call last):\n  File "w.py", line 3\nValueError: boom'
    own = failure(
        1, T0 + 2, exit_code=1, terminated=False, message="ValueError: boom", traceback=trace
    )
    early_kill = failure(0, T0 + 1)  # terminated earlier, still not the root cause
    report = build_report(
        "j", [(node(0, 2), status(own, early_kill))], world_size=2, restart_count=0
    )
    assert report.root_cause is not None
    assert report.root_cause.global_rank == 1
    text = report.format()
    assert "Root Cause (first observed failure):" in text
    assert "rank      : 1 (local_rank: 1)" in text
    assert "exitcode  : 1 (pid: 1001)" in text
    assert "host      : host00 (node rank 0)" in text
    assert "ValueError: boom" in text and 'File "w.py", line 3' in text
    assert "Terminated by rankd" in text
    assert "global rank 0 (host00, local_rank 0, pid 1000): Signal 15 (SIGTERM)" in text


def test_stderr_tail_stands_in_for_a_missing_traceback() -> None:
    segv = failure(0, T0, exit_code=-11, terminated=False, stderr_tail=("last words", "bye"))
    report = build_report("j", [(node(0, 1), status(segv))], world_size=1, restart_count=0)
    text = report.format()
    assert "exitcode  : -11 (pid: 1000) (SIGSEGV)" in text
    assert "Signal 11 (SIGSEGV) received by PID 1000" in text
    assert "last words" in text and "bye" in text


def test_only_terminated_failures_fall_back_to_all() -> None:
    report = build_report(
        "j",
        [(node(0, 2), status(failure(1, T0 + 1), failure(0, T0)))],
        world_size=2,
        restart_count=0,
    )
    assert report.root_cause is not None and report.root_cause.global_rank == 0


def test_clock_offsets_order_failures_across_nodes() -> None:
    # Node 1's clock runs 5 s ahead: its failure at agent time T0+4 is T0-1 on ours,
    # earlier than node 0's failure at T0.
    n0 = node(0, 1, ClockSample(offset=0.0, rtt=0.001))
    n1 = node(1, 1, ClockSample(offset=5.0, rtt=0.001))
    report = build_report(
        "j",
        [
            (n0, status(failure(0, T0, exit_code=2, terminated=False))),
            (n1, status(failure(0, T0 + 4, exit_code=3, terminated=False))),
        ],
        world_size=2,
        restart_count=0,
    )
    assert report.root_cause is not None and report.root_cause.node == "host01"
    assert report.root_cause.time == T0 - 1
    assert report.close_call is None
    assert "either may have failed first" not in report.format()


def test_close_failures_within_uncertainty_are_flagged() -> None:
    n0 = node(0, 1, ClockSample(offset=0.0, rtt=0.010))  # ±5 ms
    n1 = node(1, 1, ClockSample(offset=0.0, rtt=0.010))
    report = build_report(
        "j",
        [
            (n0, status(failure(0, T0 + 0.004, exit_code=1, terminated=False))),
            (n1, status(failure(0, T0, exit_code=1, terminated=False))),
        ],
        world_size=2,
        restart_count=0,
    )
    assert report.root_cause is not None and report.root_cause.node == "host01"
    assert report.close_call is not None and report.close_call.node == "host00"
    text = report.format()
    assert "global rank 0 (host00) failed 4.0 ms from the root cause" in text
    assert "±10.0 ms" in text


def test_32_alike_failures_fold_into_one_entry() -> None:
    nproc = 8
    outcomes = []
    for i in range(4):
        fails = [failure(r, T0 + 1 + i + r / 100) for r in range(nproc)]
        if i == 0:
            fails[0] = failure(0, T0, exit_code=1, terminated=False)
        outcomes.append((node(i, nproc), status(*fails)))
    report = build_report("j", outcomes, world_size=32, restart_count=0)
    terminated = fold(report.terminated)
    assert len(terminated) == 1
    assert terminated[0].ranks == list(range(1, 32))
    text = report.format()
    assert "[1]: global ranks 1-31 (host00, host01, host02, host03): Signal 15 (SIGTERM)" in text
    assert text.count("Signal 15") == 1


def test_report_stays_short_for_1000_ranks() -> None:
    nproc = 8
    outcomes = []
    for i in range(125):
        fails = []
        for r in range(nproc):
            g = i * nproc + r
            if g % 50 == 7:  # scattered own failures of a few kinds
                fails.append(
                    failure(
                        r,
                        T0 + 1,
                        exit_code=g % 3 + 1,
                        terminated=False,
                        message=f"RuntimeError: kind {g % 3} on rank {g}",
                    )
                )
            else:
                fails.append(failure(r, T0 + 2))
        outcomes.append((node(i, nproc), status(*fails)))
    outcomes[0] = (
        outcomes[0][0],
        status(failure(0, T0, exit_code=1, terminated=False), *outcomes[0][1].failures[1:]),
    )
    report = build_report("j", outcomes, world_size=1000, restart_count=3)
    text = report.format()
    assert len(report.failures) == 1000
    assert len(text.splitlines()) < 40, text
    assert "+121 more nodes" in text
    assert "RuntimeError: kind" in text


def test_round_trip_sample_and_estimator_keeps_smallest_rtt() -> None:
    trip = RoundTrip()
    sample = trip.sample(time.time() + 3.0)  # an agent 3 s ahead
    assert abs(sample.offset - 3.0) < 0.5 and sample.rtt >= 0
    est = ClockEstimator()
    assert est.best is None
    est.add(ClockSample(1.0, 0.5))
    est.add(ClockSample(2.0, 0.1))
    est.add(ClockSample(3.0, 0.3))
    assert est.best == ClockSample(2.0, 0.1) and est.samples == 3
    assert est.best.uncertainty == 0.05
    assert est.best.to_client_time(10.0) == 8.0
