"""examples/README.md, run as written: two agents on loopback, then `rankd launch`
of examples/ddp_train.py, then the agents are stopped.

Only the fixed ports (29601, 29602) become free ones and the log directories move
under tmp_path; "with the virtualenv active" becomes the venv's bin first on PATH.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.agents import Agent, closed_port

pytest.importorskip("torch", reason="runs ddp_train.py; the torch extra (make test) installs it")
REPO = Path(__file__).resolve().parents[2]
README = REPO / "examples" / "README.md"
STEPS = 10
FINAL = re.compile(
    r"^\[default0\]:done: 10 steps on 4 ranks, mean final loss \d+\.\d{4}, "
    r"replicas in sync: True$"
)


def readme_commands() -> list[str]:
    """The command lines of the first ```bash block: comments and blanks dropped."""
    text = README.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [
        line.strip()
        for line in block.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def active_venv_env() -> dict[str, str]:
    """The environment of a shell that ran `. .venv/bin/activate`."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
    env["VIRTUAL_ENV"] = str(Path(bin_dir).parent)
    return env


def start_background(argv: list[str], env: dict[str, str], log_dir: Path) -> Agent:
    """`argv &` from the README; returns once the agent said where it listens."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the agent's first line, flushed; EOF if it died
    if not line.startswith("listening on "):
        proc.kill()
        proc.wait()
        raise AssertionError(f"{argv} did not start: first line {line!r}")
    agent = Agent(proc, line.split()[-1], log_dir)
    stdout = proc.stdout
    threading.Thread(target=lambda: agent.output.extend(stdout), daemon=True).start()
    return agent


@pytest.fixture
def started() -> Iterator[list[Agent]]:
    """The agents the README starts; stopped whatever the test did."""
    running: list[Agent] = []
    yield running
    for agent in running:
        agent.stop()


@pytest.mark.timeout(90)
def test_readme_runs_ddp_train_on_two_agents(started: list[Agent], tmp_path: Path) -> None:
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["rankd-agent", "rankd-agent", "rankd", "kill"]
    agent_lines, launch_line, kill_line = commands[:2], commands[2], commands[3]
    env = active_venv_env()

    ports: dict[str, str] = {}
    for line in agent_lines:
        assert line.endswith(" &"), line
        argv = shlex.split(line[:-2])
        port = argv[argv.index("--port") + 1]
        ports[port] = str(closed_port())
        argv[argv.index("--port") + 1] = ports[port]
        readme_dir = argv[argv.index("--log-dir") + 1]
        log_dir = tmp_path / Path(readme_dir).name
        argv[argv.index("--log-dir") + 1] = str(log_dir)
        started.append(start_background(argv, env, log_dir))

    assert launch_line.startswith("rankd launch ")
    for readme_port, port in ports.items():
        assert f"127.0.0.1:{readme_port}" in launch_line
        launch_line = launch_line.replace(f"127.0.0.1:{readme_port}", f"127.0.0.1:{port}")
    argv = shlex.split(launch_line.replace('"$PWD"', shlex.quote(str(REPO))))
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr

    out = done.stdout.splitlines()
    for rank in range(4):
        steps = [line for line in out if line.startswith(f"[default{rank}]:rank {rank} step ")]
        assert len(steps) == STEPS, (rank, out)
    # Lines of different nodes arrive in any order; rank 0's own end with the summary.
    rank0 = [line for line in out if line.startswith("[default0]:")]
    assert FINAL.match(rank0[-1]), rank0[-1]
    assert sum(1 for line in out if ":done: " in line) == 1  # rank 0 only

    # `kill %1 %2`: SIGTERM to both background jobs; they stop in order, then end by that
    # same signal (what a shell and systemd count as a clean stop on SIGTERM).
    assert shlex.split(kill_line) == ["kill", "%1", "%2"]
    for agent in started:
        agent.proc.send_signal(signal.SIGTERM)
    for agent in started:
        assert agent.proc.wait(timeout=20) == -signal.SIGTERM
