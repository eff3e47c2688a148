"""Helpers for the real-PyTorch tests: torch worker scripts and a `rankd` runner.

Every script reads only the torchrun environment that rankd sets (RANK,
WORLD_SIZE, MASTER_ADDR, ...) and uses the gloo backend on loopback, so the
same file runs unchanged under `torchrun`. Agents come from `helpers.agents`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers.agents import RANKD_BIN

# Gloo binds the loopback interface: no dependence on how the host name resolves.
GLOO_ENV = {"GLOO_SOCKET_IFNAME": "lo"}

# The torchrun variables whose values must match torchrun's, rank by rank.
TORCHRUN_KEYS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "OMP_NUM_THREADS",
)
# Present under both launchers, with values that legitimately differ.
OTHER_KEYS = ("TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_USE_AGENT_STORE")

ALL_REDUCE = """\
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
dist.barrier()
print(f"rank {rank} of {world}: all_reduce sum {int(value.item())}", flush=True)
dist.destroy_process_group()
"""

# Global rank 3 raises inside @record (torch writes its error file); the other
# ranks wait for a message that never comes, so rankd has to terminate them.
RECORD_FAIL = """\
import time

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record


def check_batch(rank):
    if rank == 3:
        raise ValueError(f"bad batch 42 on rank {rank}")


@record
def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"rank {rank} initialized", flush=True)
    check_batch(rank)
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
"""

# Global rank 1 dies by SIGSEGV after a collective; nothing writes an error file.
SEGFAULT = """\
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.ones(1)
dist.all_reduce(value)
if rank == 1:
    print(f"rank 1 saw all_reduce {int(value.item())}, crashing now", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
while True:
    time.sleep(0.05)
"""

# Attempt 0: global rank 1 fails after init while the others wait (rankd stops
# them). Attempt 1: every rank succeeds.
FAIL_THEN_SUCCEED = """\
import os
import sys
import time

import torch
import torch.distributed as dist

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist.init_process_group("gloo")
rank = dist.get_rank()
print(f"rank {rank} attempt {attempt}", flush=True)
if attempt == 0:
    if rank == 1:
        sys.exit(f"rank 1 fails in attempt {attempt}")
    while True:
        time.sleep(0.05)
value = torch.ones(1)
dist.all_reduce(value)
print(f"rank {rank} attempt {attempt} sum {int(value.item())}", flush=True)
dist.destroy_process_group()
"""

# Prints the launcher's environment, then proves torch.distributed works with it.
ENV_AND_ALL_REDUCE = f"""\
import json
import os

import torch
import torch.distributed as dist

KEYS = {list(TORCHRUN_KEYS + OTHER_KEYS)!r}


def say(line):  # one write per line: under torchrun the ranks share one stdout pipe
    os.write(1, (line + "\\n").encode())


say("ENV " + json.dumps({{k: os.environ.get(k) for k in KEYS}}))
dist.init_process_group("gloo")
value = torch.ones(1)
dist.all_reduce(value)
say(f"rank {{dist.get_rank()}} sum {{int(value.item())}}")
dist.destroy_process_group()
"""


def rankd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `rankd` CLI as a user would; never picks up a Slurm node list."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_NODELIST"}
    return subprocess.run(
        [RANKD_BIN, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def env_dumps(lines: list[str]) -> dict[str, dict[str, str | None]]:
    """``ENV {...}`` lines (prefix allowed) -> {RANK: env}."""
    dumps = [json.loads(line.split("ENV ", 1)[1]) for line in lines if "ENV {" in line]
    return {d["RANK"]: d for d in dumps}


def attempt_dirs(log_dir: Path, run_id: str) -> list[Path]:
    """``<log_dir>/<run_id>_<random>/attempt_*`` of one job on one agent, sorted."""
    (job_dir,) = log_dir.glob(f"{run_id}_*")
    return sorted(job_dir.glob("attempt_*"))
