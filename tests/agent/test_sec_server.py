"""What a peer can cost an agent, token or not (issue 20, findings 6 and 7): memory for
refused requests, descriptors for idle connections, threads for metrics scrapers; and
the token file, unknown methods, the metrics endpoint and the deployment files."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.agents import AGENT_BIN, Agent
from helpers.wait import wait_until
from prometheus_client import CONTENT_TYPE_LATEST

from rankd.agent.metrics import METRICS_BACKLOG, METRICS_MAX_CONNECTIONS, METRICS_TIMEOUT
from rankd.agent.security import HANDSHAKE_TIMEOUT, MAX_MESSAGE_BYTES
from rankd.agent.specs import MAX_DUPLICATE_FILTER_BYTES, MAX_DUPLICATE_FILTERS, Limits
from rankd.testing import agent_command
from rankd.testing import start_agent as start_local_agent
from rankd.v1 import agent_pb2 as pb
from rankd.v1 import agent_pb2_grpc

TOKEN = "s3cret-token-0123456789abcdef"
AUTH = [("authorization", f"Bearer {TOKEN}")]
MiB = 1024 * 1024
#: What a flood of refused requests may add to an agent's RSS. Measured: 40 refused
#: 15 MiB Starts added 25-50 MiB (600+ MiB when they were read before the refusal).
FLOOD_RSS_BOUND = 150 * MiB
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _token_file(where: Path, mode: int = 0o600, text: str | bytes = TOKEN) -> Path:
    path = where / "token"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    path.chmod(mode)
    return path


def _agent(tmp_path: Path, *args: str, nofile: int | None = None) -> Agent:
    """A real agent with the token (and `args`); under `prlimit` with RLIMIT_NOFILE
    `nofile` (soft and hard), and INFO logs, when given."""
    command = agent_command()
    if nofile is not None:
        command = ["prlimit", f"--nofile={nofile}:{nofile}", *command]
    token = _token_file(tmp_path)
    level = "WARNING" if nofile is None else "INFO"
    return Agent.adopt(
        start_local_agent(
            tmp_path / "logs", "--token-file", str(token), *args, command=command, log_level=level
        )
    )


@pytest.fixture
def token_agent(tmp_path: Path) -> Iterator[Agent]:
    handle = _agent(tmp_path)
    try:
        yield handle
    finally:
        handle.stop()


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# -- finding 6: memory -------------------------------------------------------------------


def test_a_flood_of_unauthenticated_15_mib_starts_leaves_rss_bounded(token_agent: Agent) -> None:
    stub = token_agent.stub
    stub.Info(pb.InfoRequest(), metadata=AUTH, timeout=10)  # the server's lazy parts are up
    baseline = _rss(token_agent.pid)
    big = pb.StartRequest(
        spec=pb.JobSpec(
            job_id="flood", nprocs=1, entrypoint="/bin/true", env={"BIG": "x" * (15 * MiB)}
        )
    ).SerializeToString()
    # One connection each, as 40 separate clients would open.
    channels = [
        grpc.insecure_channel(token_agent.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(40)
    ]
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, _rss(token_agent.pid))

    def start(channel: grpc.Channel) -> grpc.StatusCode:
        call = channel.unary_unary("/rankd.v1.NodeAgent/Start")  # raw bytes, sent as is
        with pytest.raises(grpc.RpcError) as info:
            call(big, timeout=60)
        return info.value.code()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(channels)) as pool:
            codes = list(pool.map(start, channels))
    finally:
        done.set()
        sampler.join()
        for channel in channels:
            channel.close()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 40
    after = _rss(token_agent.pid)
    print(f"RSS {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f}, after {after / MiB:.0f}")
    assert peak - baseline < FLOOD_RSS_BOUND, (baseline, peak)
    assert after - baseline < FLOOD_RSS_BOUND, (baseline, after)
    assert not list(token_agent.log_dir.glob("flood*"))  # nothing was started


def _maximal_start(nprocs: int, where: Path) -> pb.StartRequest:
    """The largest Start an agent accepts: every limit of `Limits` and of the duplicate
    filters filled, spread over every rank (most framing), with a real entrypoint and
    cwd of almost PATH_MAX bytes."""
    limits = Limits()
    deep = where
    while len(str(deep)) < 3800:  # PATH_MAX is 4096 with its NUL
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    entry = deep / "true"
    entry.symlink_to("/bin/true")
    arg_len = limits.max_arg_bytes // limits.max_args
    args = [f"{i:0{arg_len}d}" for i in range(limits.max_args)]
    per_var = limits.max_env_bytes // limits.max_env_vars
    keys = [f"V{i:05d}" for i in range(limits.max_env_vars)]
    env = [(key, "x" * (per_var - len(key))) for key in keys]
    every_rank = ",".join(f"{r}:3" for r in range(min(nprocs, 10)))  # torch's: one digit
    per_filter = MAX_DUPLICATE_FILTER_BYTES // MAX_DUPLICATE_FILTERS
    filters = [f"{i:0{per_filter}d}" for i in range(MAX_DUPLICATE_FILTERS)]
    spec = pb.JobSpec(
        job_id="j" * 128,
        nprocs=nprocs,
        entrypoint=str(entry),
        cwd=str(deep),
        role_name="r" * 64,
        redirects=every_rank,
        tee=every_rank,
        local_ranks_filter=range(nprocs),
        log_line_prefix_template="[${role_name}${rank}:${local_rank}]".ljust(256, "x"),
        rank_offset=2**31 - 1 - nprocs,
        restart_count=2**31 - 1,
        kill_timeout=3600,
        lease=86400,
        args=args[: len(args) // 2],
        env=dict(env[: len(env) // 3]),
        default_env=dict(env[len(env) // 3 : 2 * len(env) // 3]),
        duplicate_stdout_filters=filters,
        duplicate_stderr_filters=filters,
    )
    for i, arg in enumerate(args[len(args) // 2 :]):
        spec.rank_args[i % nprocs].args.append(arg)
    for i, (key, value) in enumerate(env[2 * len(env) // 3 :]):
        spec.rank_env[i % nprocs].env[key] = value
    return pb.StartRequest(spec=spec)


def test_the_receive_limit_fits_the_largest_valid_start(tmp_path: Path) -> None:
    """MAX_MESSAGE_BYTES is what a valid Start needs (measured: about 1.2 MiB), with
    room to spare; one byte more than the limit is refused unread."""
    nprocs = Limits().max_nprocs
    request = _maximal_start(nprocs, tmp_path / "deep")
    size = request.ByteSize()
    assert 1.1 * MiB < size < MAX_MESSAGE_BYTES * 0.75, size
    # --max-running-ranks 1: the Start is read and validated, then refused for room,
    # so 1024 ranks are not started for this.
    agent = _agent(tmp_path, "--max-running-ranks", "1")
    try:
        with pytest.raises(grpc.RpcError) as info:
            agent.stub.Start(request, metadata=AUTH, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "running ranks" in info.value.details()  # past validation: a valid spec

        # Past the limit: refused by its size alone.
        too_big = pb.StartRequest(
            spec=pb.JobSpec(
                job_id="big", nprocs=1, entrypoint="/bin/true", cwd="x" * MAX_MESSAGE_BYTES
            )
        )
        with pytest.raises(grpc.RpcError) as info:
            agent.stub.Start(too_big, metadata=AUTH, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MAX_MESSAGE_BYTES) in info.value.details()
    finally:
        agent.stop()


# -- finding 6: connections --------------------------------------------------------------


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed `sock` (what it sent first, e.g. HTTP/2 SETTINGS, is
    read and dropped); never blocks."""
    try:
        while sock.recv(4096, socket.MSG_DONTWAIT):
            pass
    except BlockingIOError:
        return False
    except OSError:
        pass  # reset
    return True


def test_idle_connections_do_not_starve_an_authorised_start(tmp_path: Path) -> None:
    """With 256 descriptors, 250 sockets that connect and say nothing: the agent keeps
    a quarter of its descriptors for connections (64), closes the rest at once, drops
    the silent ones after HANDSHAKE_TIMEOUT, and an authorised Start gets through."""
    agent = _agent(tmp_path, nofile=256)
    host, port = agent.address.rsplit(":", 1)
    idle: list[socket.socket] = []
    try:
        wait_until(lambda: any("at most 64 connections" in ln for ln in agent.stderr_lines))
        for _ in range(250):
            idle.append(socket.create_connection((host, int(port)), timeout=5))
        opened = time.monotonic()
        wait_until(lambda: sum(map(_closed_by_peer, idle)) >= 250 - 64, 10, "refused at once")
        assert psutil.Process(agent.pid).num_fds() < 128  # 64 + its own, far from 256

        # Fast reconnects: the channel retries while the silent sockets hold their places.
        options = [
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 500),
        ]
        with grpc.insecure_channel(agent.address, options=options) as channel:
            spec = pb.JobSpec(job_id="authorised", nprocs=1, entrypoint="/bin/true")
            reply = agent_pb2_grpc.NodeAgentStub(channel).Start(
                pb.StartRequest(spec=spec),
                metadata=AUTH,
                timeout=HANDSHAKE_TIMEOUT + 15,
                wait_for_ready=True,
            )
        assert reply.created
        assert time.monotonic() - opened < HANDSHAKE_TIMEOUT + 5
        wait_until(lambda: all(map(_closed_by_peer, idle)), 5, "the silent ones dropped")
        assert not any("File descriptor limit" in ln for ln in agent.stderr_lines)
    finally:
        for sock in idle:
            sock.close()
        agent.stop()


def test_streams_per_connection_and_connections_are_capped_flags(tmp_path: Path) -> None:
    help_text = subprocess.run(
        [AGENT_BIN, "--help"], capture_output=True, text=True, check=True
    ).stdout
    described = " ".join(help_text.split()).split(" --")  # one piece per option
    for name, default in (
        ("max-connections", "256"),
        ("max-streams-per-connection", "256"),
        ("max-message-bytes", str(MAX_MESSAGE_BYTES)),
    ):
        assert any(
            d.startswith(f"{name} N ") and d.endswith(f"(default: {default})") for d in described
        ), name
    bad = subprocess.run(
        [AGENT_BIN, "--max-connections", "0"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2
    assert "argument --max-connections: must be a whole number >= 1, not '0'" in bad.stderr


def test_calls_past_the_streams_per_connection_cap_wait_for_a_free_place(tmp_path: Path) -> None:
    """--max-streams-per-connection 2: two follow Streams hold both places on one
    connection; a third call on it waits, while another connection is answered, and goes
    through once a Stream ends."""
    agent = _agent(tmp_path, "--max-streams-per-connection", "2")
    try:
        talk = "import time; print('up', flush=True); time.sleep(60)"
        spec = pb.JobSpec(job_id="long", nprocs=1, entrypoint=sys.executable, args=["-c", talk])
        agent.stub.Start(pb.StartRequest(spec=spec), metadata=AUTH, timeout=30)
        poll = pb.PollRequest(job_id="long")
        # a connection of its own, not the one agent.stub shares through the subchannel pool
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(agent.address, options=options) as channel:
            stub = agent_pb2_grpc.NodeAgentStub(channel)
            stub.Poll(poll, metadata=AUTH, timeout=10)  # connected
            follow = pb.StreamRequest(job_id="long", follow=True)
            streams = [stub.Stream(follow, metadata=AUTH, timeout=60) for _ in range(2)]
            for stream in streams:  # each is open on the agent: it sent the line
                assert [ln.text for ln in next(stream).lines] == ["up"]
            with pytest.raises(grpc.RpcError) as info:
                stub.Poll(poll, metadata=AUTH, timeout=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert agent.stub.Poll(poll, metadata=AUTH, timeout=5).job.state == pb.RUNNING
            streams[0].cancel()
            assert stub.Poll(poll, metadata=AUTH, timeout=10).job.state == pb.RUNNING
            streams[1].cancel()
    finally:
        agent.stop()


# -- finding 7: unknown methods, health ------------------------------------------------------


def _raw_call(
    channel: grpc.Channel, method: str, metadata: list[tuple[str, str]]
) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(b"", metadata=metadata or None, timeout=10)
    return info.value.code()


def test_unknown_methods_need_the_token_too(tmp_path: Path) -> None:
    agent = _agent(tmp_path, "--health-port", "0")
    try:
        channel = agent.channel
        for method in ("/rankd.v1.NodeAgent/Nope", "/no.Such/Service"):
            assert _raw_call(channel, method, []) == grpc.StatusCode.UNAUTHENTICATED, method
            assert _raw_call(channel, method, AUTH) == grpc.StatusCode.UNIMPLEMENTED, method

        # The health check stays open; its Watch (a stream that stays open) needs the token.
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(health.Watch(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert next(health.Watch(request, metadata=AUTH, timeout=5)).status == (
            health_pb2.HealthCheckResponse.SERVING
        )

        # The plaintext health port: the check, and nothing else.
        wait_until(lambda: any(ln.startswith("health on ") for ln in agent.stderr_lines))
        line = next(ln for ln in agent.stderr_lines if ln.startswith("health on "))
        with grpc.insecure_channel(line.split()[-1]) as plain:
            probe = health_pb2_grpc.HealthStub(plain)
            assert probe.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                next(probe.Watch(request, timeout=5))
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        agent.stop()


# -- finding 7: the token file -------------------------------------------------------------


def _refusal(token: Path, tmp_path: Path) -> str:
    """The one line an agent given `token` prints before exiting 2."""
    done = subprocess.run(
        [AGENT_BIN, "--port", "0", "--log-dir", str(tmp_path / "l"), "--token-file", str(token)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
@pytest.mark.parametrize(
    ("mode", "owner", "content", "needle"),
    [
        (0o640, 0, TOKEN, "readable or writable by its group (mode 640); run: chmod 600"),
        (0o660, 0, TOKEN, "readable or writable by its group (mode 660)"),
        (0o604, 0, TOKEN, "readable or writable by others (mode 604)"),
        (0o600, 12345, TOKEN, "belongs to uid 12345, not to this agent's user (uid 0) or root"),
        (0o600, 0, b"\xff\xfe" * 20, "is not UTF-8 text (byte 0)"),
    ],
)
def test_unsafe_or_unreadable_token_files_are_refused_in_one_line(
    tmp_path: Path, mode: int, owner: int, content: str | bytes, needle: str
) -> None:
    token = _token_file(tmp_path, mode, content)
    os.chown(token, owner, -1)
    line = _refusal(token, tmp_path)
    assert line.startswith("rankd-agent: error: token file ") and needle in line, line


def test_a_fifo_as_token_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    assert "is not a regular file" in _refusal(fifo, tmp_path)
    assert time.monotonic() - started < 20  # opened without blocking on a writer


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (tmp_path's parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="rankd-token-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_non_root_agent_takes_root_s_group_readable_token_not_its_own(shared_dir: Path) -> None:
    """Kubernetes (fsGroup) and systemd (an ACL) hand a service root's file, readable by
    its group: accepted. The agent's own file has no reason to be group-readable."""
    nobody = 65534
    # Python and rankd load as root (the venv may sit where nobody can read), then the
    # process becomes nobody before it opens the token.
    load = (
        "import os, sys\n"
        "from rankd.agent.security import SecurityError, load_token\n"
        f"os.setgroups([]); os.setegid({nobody}); os.seteuid({nobody})\n"
        "try:\n    print(load_token(sys.argv[1]))\n"
        "except SecurityError as err:\n    sys.exit(str(err))\n"
    )

    def as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", load, str(path)], capture_output=True, text=True, timeout=60
        )

    token = _token_file(shared_dir, 0o440)
    os.chown(token, 0, nobody)
    done = as_nobody(token)
    assert done.returncode == 0 and done.stdout.strip() == TOKEN, done.stderr
    token.chmod(0o460)  # group-writable: refused, root's file or not
    assert "readable or writable by its group (mode 460)" in as_nobody(token).stderr

    os.chown(token, nobody, nobody)
    token.chmod(0o640)
    done = as_nobody(token)
    assert "readable or writable by its group (mode 640)" in done.stderr, done.stderr
    token.chmod(0o400)
    assert as_nobody(token).stdout.strip() == TOKEN


# -- finding 7: the metrics endpoint -------------------------------------------------------


@pytest.fixture
def metrics_agent(tmp_path: Path) -> Iterator[tuple[Agent, tuple[str, int]]]:
    agent = _agent(tmp_path, "--metrics-port", "0")
    try:
        wait_until(lambda: any(ln.startswith("metrics on ") for ln in agent.stderr_lines))
        line = next(ln for ln in agent.stderr_lines if ln.startswith("metrics on "))
        host, port = line.split()[-1].rsplit(":", 1)
        yield agent, (host, int(port))
    finally:
        agent.stop()


def _get(
    where: tuple[str, int], path: str = "/metrics", method: str = "GET"
) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://{where[0]}:{where[1]}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def test_idle_metrics_sockets_cost_no_threads_and_do_not_block_a_scrape(
    metrics_agent: tuple[Agent, tuple[str, int]],
) -> None:
    agent, where = metrics_agent
    proc = psutil.Process(agent.pid)
    threads = proc.num_threads()
    idle = [socket.create_connection(where, timeout=5) for _ in range(200)]
    try:
        wait_until(
            lambda: sum(map(_closed_by_peer, idle)) >= 200 - METRICS_MAX_CONNECTIONS,
            10,
            "the oldest silent sockets evicted",
        )
        assert proc.num_threads() <= threads + 2  # was one thread per socket
        started = time.monotonic()
        status, content_type, body = _get(where)
        assert time.monotonic() - started < 2
        assert status == 200 and content_type == CONTENT_TYPE_LATEST
        assert "rankd_ranks_running 0.0" in body
        # Silent sockets that were not evicted are dropped after METRICS_TIMEOUT.
        wait_until(lambda: all(map(_closed_by_peer, idle)), METRICS_TIMEOUT + 5, "dropped")
    finally:
        for sock in idle:
            sock.close()


def test_metrics_endpoint_serves_get_metrics_only(
    metrics_agent: tuple[Agent, tuple[str, int]],
) -> None:
    _, where = metrics_agent
    assert _get(where, "/metrics?name[]=rankd_jobs")[0] == 200
    assert _get(where, "/")[0] == 404
    assert _get(where, "/metrics", "POST")[0] == 405
    # A request head larger than the endpoint reads is dropped, not buffered.
    with socket.create_connection(where, timeout=5) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 65536)
        wait_until(lambda: _closed_by_peer(sock), 5, "the oversized request dropped")
    listening = subprocess.run(
        ["ss", "-ltnH", f"sport = :{where[1]}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert int(listening[2]) >= METRICS_BACKLOG >= 128  # Send-Q of a listener: its backlog


# -- finding 7: deployment files -------------------------------------------------------------


def _daemonset_container() -> dict[str, object]:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "rankd-agent.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert isinstance(container, dict)
    return container


def test_kubernetes_binds_metrics_to_the_pod_address_not_every_interface() -> None:
    container = _daemonset_container()
    args = container["args"]
    assert isinstance(args, list)
    host = next(a.split("=", 1)[1] for a in args if a.startswith("--metrics-host="))
    assert host == "$(POD_IP)"  # Kubernetes expands it from the env var
    env = {e["name"]: e for e in container["env"]}  # type: ignore[attr-defined]
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_docker_build_context_leaves_out_secrets() -> None:
    ignored = set((DEPLOY / "Dockerfile.dockerignore").read_text().split())
    assert {"token", "*.key", "*.pem", "**/*.key", "**/*.pem"} <= ignored
