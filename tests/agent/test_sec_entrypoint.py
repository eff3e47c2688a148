"""`--allow-entrypoint` held exactly (issue 20, finding 5): the program that runs is the
one that was checked, an interpreter can be pinned to its script, and variables that
make a program load other code are refused. Real agents and real workers throughout;
each refused variable is first shown to run code on an agent without the guard."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers.agents import PYTHON, RANKD_BIN, Agent, start_agent
from helpers.wait import wait_until

from rankd.testing import AgentStartError
from rankd.v1 import agent_pb2 as pb

pytestmark = pytest.mark.timeout(120)

# Prints sys.prefix into argv[1]: which Python ran, and whether it kept its venv.
PREFIX_SCRIPT = "import sys\nopen(sys.argv[1], 'w').write(sys.prefix)\n"
# Waits (10 s at most) for the file argv[1]: the rank lives until a trick's marker shows.
AWAIT_MARKER = (
    "import os, sys, time\n"
    "end = time.monotonic() + 10\n"
    "while not os.path.exists(sys.argv[1]) and time.monotonic() < end:\n"
    "    time.sleep(0.01)\n"
)
# Flips the symlink argv[1] between argv[2] and argv[3] until killed (atomic replace).
FLIPPER = (
    "import os, sys\n"
    "link, a, b = sys.argv[1:4]\n"
    "while True:\n"
    "    for target in (a, b):\n"
    "        os.symlink(target, link + '.tmp')\n"
    "        os.replace(link + '.tmp', link)\n"
)


@dataclass
class Site:
    """Worker scripts, and a guarded and an unguarded agent that share them."""

    root: Path
    guarded: Agent  # --allow-entrypoint: the pinned script, /bin/sh, bash.sh, allowed.sh
    plain: Agent  # no policy
    script: str  # PREFIX_SCRIPT, the one Python script allowed
    await_marker: str
    bash: str  # a bash script that does nothing
    allowed: str  # touches argv[1]
    evil: str  # touches root/EVIL

    @property
    def evil_marker(self) -> Path:
        return self.root / "EVIL"


def _script(root: Path, name: str, body: str) -> str:
    path = root / name
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("entry")
    script = _script(root, "prefix.py", PREFIX_SCRIPT)
    bash = _script(root, "bash.sh", "#!/bin/bash\nexit 0\n")
    allowed = _script(root, "allowed.sh", '#!/bin/sh\n: > "$1"\n')
    evil = _script(root, "evil.sh", f"#!/bin/sh\n: > {shlex.quote(str(root / 'EVIL'))}\n")
    await_marker = _script(root, "await.py", AWAIT_MARKER)
    guarded = start_agent(
        root / "guarded",
        *("--allow-entrypoint", shlex.join([PYTHON, script])),
        *("--allow-entrypoint", "/bin/sh"),
        *("--allow-entrypoint", bash),
        *("--allow-entrypoint", allowed),
        *("--allow-env", "PYTHONPATH"),
    )
    try:
        plain = start_agent(root / "plain")
        try:
            yield Site(root, guarded, plain, script, await_marker, bash, allowed, evil)
        finally:
            plain.stop()
    finally:
        guarded.stop()


def spec(
    job_id: str,
    entry: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    nprocs: int = 1,
    **kw: Any,
) -> pb.JobSpec:
    return pb.JobSpec(
        job_id=job_id, nprocs=nprocs, entrypoint=entry, args=list(args), env=env, **kw
    )


def start(agent: Agent, job: pb.JobSpec) -> None:
    agent.stub.Start(pb.StartRequest(spec=job), timeout=20)


def refused(agent: Agent, job: pb.JobSpec) -> str:
    """Start `job`, which must be PERMISSION_DENIED and leave no job; returns the message."""
    with pytest.raises(grpc.RpcError) as info:
        start(agent, job)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value.details()
    held = {j.job_id for j in agent.stub.List(pb.ListRequest(), timeout=10).jobs}
    assert job.job_id not in held
    return str(info.value.details())


def ended(agent: Agent, job_id: str) -> pb.JobStatus:
    """The job's status once it has ended (20 s at most)."""
    status: list[pb.JobStatus] = []

    def done() -> bool:
        job = agent.stub.Poll(pb.PollRequest(job_id=job_id), timeout=10).job
        status[:] = [job]
        return job.state in (pb.SUCCEEDED, pb.FAILED, pb.KILLED)

    wait_until(done, timeout=20, what=f"job {job_id} to end")
    return status[0]


def succeeded(agent: Agent, job: pb.JobSpec) -> pb.JobStatus:
    start(agent, job)
    status = ended(agent, job.job_id)
    assert status.state == pb.SUCCEEDED, status
    return status


# -- what runs is what was checked ----------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_symlink_swapped_between_check_and_exec_never_runs_the_other(site: Site) -> None:
    """`entry` flips between allowed.sh and evil.sh all along while 150 Starts name it:
    each is refused (evil at the check) or runs allowed.sh; evil.sh never runs. (The
    agent that executed the request's own path ran evil.sh in about half of these.)"""
    link = site.root / "entry"
    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(link), site.allowed, site.evil],
        stdin=subprocess.DEVNULL,
    )
    accepted = []
    try:
        wait_until(link.exists, what="the flipper's first symlink")
        for i in range(150):
            job = spec(f"swap-{i}", str(link), [str(site.root / f"ran-{i}")])
            try:
                start(site.guarded, job)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
                assert "is not allowed on this agent" in str(err.details())
                continue
            accepted.append(i)
    finally:
        flipper.kill()
        flipper.wait(10)
    assert 0 < len(accepted) < 150, len(accepted)  # the swap did race the checks
    for i in accepted:
        status = ended(site.guarded, f"swap-{i}")
        assert status.state == pb.SUCCEEDED, status
        assert (site.root / f"ran-{i}").exists()
    assert not site.evil_marker.exists()


def test_an_interpreter_pinned_to_its_script_runs_that_script_only(site: Site) -> None:
    out = site.root / "prefix-out"
    succeeded(site.guarded, spec("pinned", PYTHON, [site.script, str(out)]))
    assert out.read_text() == sys.prefix  # the allowed path as named: the venv is kept
    # the pinned arguments may come from each rank's rank_args
    ranks = {r: pb.RankArgs(args=[site.script, str(out) + str(r)]) for r in range(2)}
    succeeded(site.guarded, spec("per-rank", PYTHON, nprocs=2, rank_args=ranks))
    assert (site.root / "prefix-out1").read_text() == sys.prefix
    # through a symlink of the requester's own: the real file that was compared runs
    link = site.root / "my-python"
    link.symlink_to(PYTHON)
    succeeded(site.guarded, spec("linked", str(link), [site.script, str(out)]))
    assert out.read_text() == sys.base_prefix
    pinned = shlex.join([PYTHON, site.script])
    cases: list[tuple[str, list[str], dict[str, Any]]] = [
        ("dash-c", ["-c", "print('any code')"], {}),
        ("dash-m", ["-m", "http.server"], {}),
        ("other", [site.await_marker, str(out)], {}),
        ("none", [], {}),
        ("one-rank-off", [], {"nprocs": 2, "rank_args": {0: ranks[0], 1: pb.RankArgs()}}),
    ]
    for job_id, args, kw in cases:
        message = refused(site.guarded, spec(job_id, PYTHON, args, **kw))
        assert f"allowed on this agent only as: {pinned}" in message, message


def test_a_bare_interpreter_is_allowed_whole_and_warned_about(site: Site) -> None:
    out = site.root / "sh-out"
    succeeded(site.guarded, spec("sh-c", "/bin/sh", ["-c", f": > {out}"]))
    assert out.exists()
    warnings = [ln for ln in site.guarded.stderr_lines if "allows any code" in ln]
    assert len(warnings) == 1, list(site.guarded.stderr_lines)
    assert "/bin/sh" in warnings[0] and PYTHON not in warnings[0]  # pinned: no warning
    assert "/usr/bin/python3 /opt/train.py" in warnings[0]  # and the way out


def test_an_entry_that_is_not_a_path_stops_the_agent_with_one_line(tmp_path: Path) -> None:
    for flags, needle in [
        (["--allow-entrypoint", "python3"], "give an absolute path"),
        (["--allow-entrypoint", "'/bin/sh"], "No closing quotation"),
        (["--allow-env", "LD_PRELOAD"], "--allow-env applies only with --allow-entrypoint"),
        (["--allow-entrypoint", "/bin/true", "--allow-env", "A=1"], "give a variable's name"),
    ]:
        with pytest.raises(AgentStartError) as info:
            start_agent(tmp_path / "logs", *flags)
        assert needle in str(info.value), (flags, str(info.value))


# -- variables that load code ---------------------------------------------------------------

REFUSED = [
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "BASH_ENV",
    "ENV",
    "BASH_FUNC_ls%%",
    "SHELLOPTS",
    "PS4",
    "PATH",
    "HOME",
    "PYTHONSTARTUP",
    "PYTHONWARNINGS",
    "PYTHONHOME",
    "PYTHONUSERBASE",
    "PYTHONPYCACHEPREFIX",
    "PYTHONBREAKPOINT",
    "PYTHON_PRESITE",
    "BROWSER",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "NODE_OPTIONS",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "GCONV_PATH",
    "LUA_INIT",
    "GIT_CONFIG_COUNT",
    "GIT_SSH_COMMAND",
    "OPENSSL_CONF",
    "CUDA_INJECTION64_PATH",
    "NCCL_NET_PLUGIN",
    "TORCHINDUCTOR_CACHE_DIR",
]
PASSED = {
    "PYTHONUNBUFFERED": "1",
    "PYTHONHASHSEED": "0",
    "PYTHONFAULTHANDLER": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONIOENCODING": "utf-8:replace",
    "PYTHONUTF8": "1",
    "PYTHONPATH": "/nonexistent",  # --allow-env PYTHONPATH
    "NCCL_DEBUG": "INFO",
    "GIT_COMMIT": "0123abc",
    "OMP_NUM_THREADS": "1",
}


def test_each_code_loading_variable_is_refused_by_name(site: Site) -> None:
    out = str(site.root / "env-out")
    for i, name in enumerate(REFUSED):
        for where in ("env", "default_env", "rank_env"):
            env = {"OK": "1", name: "x"}
            kw: dict[str, Any] = (
                {"rank_env": {0: pb.RankEnv(env=env)}} if where == "rank_env" else {where: env}
            )
            job = spec(f"env-{i}-{where}", PYTHON, [site.script, out], **kw)
            message = refused(site.guarded, job)
            assert f"environment variable {name} in the job's {where}" in message, message
            assert f"--allow-env {name}" in message, message
    succeeded(site.guarded, spec("passed", PYTHON, [site.script, out], env=PASSED))


@pytest.mark.skipif(shutil.which("cc") is None, reason="LD_PRELOAD needs a C compiler")
def test_the_refused_variables_do_run_code_without_the_guard(site: Site) -> None:
    """Each trick writes its marker on the agent without the guard (so this test could
    fail); on the guarded agent the same Start is refused by the variable's name, and
    runs once the variable is gone."""
    preload = site.root / "preload.so"
    source = site.root / "preload.c"
    marker = site.root / "marker-ld"
    source.write_text(
        "#include <fcntl.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void ran(void) {\n"
        f'  close(open("{marker}", O_CREAT | O_WRONLY, 0600));\n}}\n'
    )
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", str(preload), str(source)], check=True, timeout=60
    )
    out = str(site.root / "trick-out")
    tricks = [
        # (name, marker, entrypoint and args on the guarded agent, env)
        ("LD_PRELOAD", marker, [site.allowed, out], {"LD_PRELOAD": str(preload)}),
        (
            "BASH_ENV",
            site.root / "marker-bash",
            [site.bash],
            {"BASH_ENV": f"$(: > {site.root / 'marker-bash'})"},  # no file needed
        ),
        (
            "BROWSER",
            site.root / "marker-py",
            [PYTHON, site.script, out],
            {
                "PYTHONWARNINGS": "all:0:antigravity.x:0:0",
                "BROWSER": f'/bin/sh -c "echo > {site.root / "marker-py"}" #%s',
            },
        ),
    ]
    for name, mark, argv, env in tricks:
        # the unguarded agent: the rank lives until the marker shows, so that a helper
        # the trick starts in the background is not stopped with the job
        plain = [PYTHON, site.await_marker, str(mark)] if argv[0] == PYTHON else argv
        start(site.plain, spec(f"plain-{name}", plain[0], plain[1:], env=env))
        wait_until(mark.exists, timeout=15, what=f"{name} to run code on an unguarded agent")
        ended(site.plain, f"plain-{name}")
        mark.unlink()
        message = refused(site.guarded, spec(f"guarded-{name}", argv[0], argv[1:], env=env))
        assert f"environment variable {name}" in message, message
        succeeded(site.guarded, spec(f"guarded-{name}-without", argv[0], argv[1:]))
        assert not mark.exists(), name


def test_a_default_launch_runs_on_a_guarded_agent(site: Site) -> None:
    """`rankd launch` sends the torchrun environment (and its defaults, OMP_NUM_THREADS
    among them): none of it is refused."""
    out = site.root / "launch-out"
    done = subprocess.run(
        [
            RANKD_BIN,
            "launch",
            *("--nodes", site.guarded.address, "--nproc-per-node", "2"),
            *("--env", "PYTHONUNBUFFERED=1", "--run-id", "default-launch"),
            *("--", PYTHON, site.script, str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"},
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() == sys.prefix
