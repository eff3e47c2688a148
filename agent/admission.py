"""What a Start must pass before anything is made: a valid spec that the agent's policy
allows, then room on the node (running ranks, descriptors, log disk space).

The policy (`--allow-entrypoint`, `--allow-env`) is a guard against mistakes, not a
boundary: whoever holds the token runs code as the agent's user, and code that is not
trusted belongs in an OS sandbox. What the guard checks, it holds to exactly:
- the program that runs is the one checked: the allowed path as the operator wrote it
  when the request names that path, else the real path (symlinks resolved) that was
  compared; never a path the request could re-point between the check and the exec;
- an entry may pin the arguments every rank starts with (`"/usr/bin/python3
  /opt/train.py"`), compared as strings; a bare interpreter allows any code (`-c`) and
  is warned about at startup;
- variables that make a program load code from elsewhere (`loads_code`) are refused in
  a job's env, rank_env and default_env unless `--allow-env` names them. The agent's
  own environment is the operator's, and trusted.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from rankd.agent import resources
from rankd.agent.errors import LimitExceeded, PermissionDenied, SpecError
from rankd.agent.specs import JobSpec, Limits, validate_job_id

__all__ = ["Admission", "AllowedEntrypoint", "loads_code"]

logger = logging.getLogger(__name__)

# Variables that make a program load or run code that its command line does not name.
# Not every such variable of every program (any program may read a plugin path of its
# own): those of the dynamic linker, the shells, the language runtimes a job runs, and
# the libraries of a training node that load shared objects or run commands.
_CODE_NAMES = frozenset(
    {
        # shells: BASH_ENV and ENV are expanded (command substitution) and sourced;
        # SHELLOPTS=xtrace with PS4='$(…)' runs PS4; ZDOTDIR holds .zshenv
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "ZDOTDIR",
        "BASH_LOADABLES_PATH",
        # where programs and per-user startup code are found: PATH picks every program a
        # script runs by name; HOME and XDG_CONFIG_HOME hold Python's user site (its .pth
        # files run code), ~/.zshenv, git's config
        "PATH",
        "HOME",
        "XDG_CONFIG_HOME",
        # glibc's iconv modules are shared objects
        "GCONV_PATH",
        # Python's webbrowser runs $BROWSER (reached from PYTHONWARNINGS by importing
        # `antigravity`)
        "BROWSER",
        # Perl, Ruby, Node, Java: options and library paths that load modules or agents
        "PERL5OPT",
        "PERL5LIB",
        "PERLLIB",
        "PERL5DB",
        "RUBYOPT",
        "RUBYLIB",
        "NODE_OPTIONS",
        "NODE_PATH",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        # git (which training scripts run to log their commit) runs these commands, and
        # the hooks and config of the repository GIT_DIR names
        "GIT_DIR",
        "GIT_COMMON_DIR",
        "GIT_EXEC_PATH",
        "GIT_TEMPLATE_DIR",
        "GIT_SSH",
        "GIT_SSH_COMMAND",
        "GIT_ASKPASS",
        "SSH_ASKPASS",
        "GIT_EXTERNAL_DIFF",
        "GIT_PAGER",
        "GIT_EDITOR",
        "GIT_PROXY_COMMAND",
        # OpenSSL loads engines and providers (shared objects) named by its config
        "OPENSSL_CONF",
        "OPENSSL_ENGINES",
        "OPENSSL_MODULES",
        # compiled kernels and extensions that torch loads from these directories
        "TORCH_EXTENSIONS_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
    }
)
_CODE_PREFIXES = (
    "LD_",  # LD_PRELOAD, LD_LIBRARY_PATH, LD_AUDIT, …: the dynamic linker
    "BASH_FUNC_",  # exported bash functions, which replace the commands a script runs
    "LUA_INIT",  # code run by lua at startup (also LUA_INIT_5_4)
    "LUA_PATH",
    "LUA_CPATH",
    "GIT_CONFIG",  # git config from the environment: core.fsmonitor, core.sshCommand… run
    "CUDA_INJECTION",  # CUDA_INJECTION64_PATH: a library loaded into every CUDA process
)
# PYTHON*: PYTHONPATH, PYTHONHOME, PYTHONUSERBASE, PYTHONPLATLIBDIR and
# PYTHONPYCACHEPREFIX say where code comes from; PYTHONSTARTUP, PYTHONBREAKPOINT,
# PYTHON_PRESITE and PYTHONWARNINGS (it imports a warning category's module) import or
# run it. These only switch behaviour: buffering, bytecode writing, fault handler, hash
# seed, the stdio encoding (codec names are looked up in the stdlib's `encodings`
# package only), UTF-8 mode, and two that only take directories away (user site, the
# script's directory).
_PYTHON_SAFE = frozenset(
    {
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONFAULTHANDLER",
        "PYTHONHASHSEED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "PYTHONNOUSERSITE",
        "PYTHONSAFEPATH",
    }
)
# NCCL_NET_PLUGIN, NCCL_TUNER_PLUGIN, …: shared objects NCCL loads
_NCCL_PLUGIN = re.compile(r"NCCL_\w*PLUGIN")

# Interpreters and launchers: given any arguments, they run any code (`python3 -c`,
# `sh -c`, `env prog`, `numactl -- prog`). A bare entry of one allows exactly that.
_RUNS_ANY = re.compile(
    r"(python|pypy|perl|ruby|node|nodejs|deno|bun|php|lua|luajit|tclsh|wish|julia|R|"
    r"Rscript|java|bash|sh|dash|zsh|ksh|mksh|csh|tcsh|fish|busybox|env|awk|gawk|mawk|"
    r"nawk|xargs|find|nice|nohup|timeout|stdbuf|setsid|taskset|numactl|chrt|ionice|"
    r"sudo|doas|strace|ltrace|gdb|valgrind|torchrun|mpirun|mpiexec|srun|uv|conda)"
    r"[0-9.]*(-[a-z]+)?"
)


def loads_code(name: str) -> bool:
    """Whether the environment variable `name` can make a program load or run code
    beyond its command line (see the tables above; exact case, as Linux reads them)."""
    if name.startswith("PYTHON"):
        return name not in _PYTHON_SAFE
    return (
        name in _CODE_NAMES
        or name.startswith(_CODE_PREFIXES)
        or _NCCL_PLUGIN.fullmatch(name) is not None
    )


@dataclass(frozen=True)
class AllowedEntrypoint:
    """One `--allow-entrypoint`: an absolute path, and the arguments every rank's argv
    must start with after it (none: any arguments)."""

    path: str
    args: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowedEntrypoint:
        """`/opt/run.sh` or `/usr/bin/python3 /opt/train.py` (shell quoting for spaces).
        Raises SpecError."""
        try:
            words = shlex.split(text)
        except ValueError as err:
            raise SpecError(f"--allow-entrypoint {text!r}: {err}") from None
        if not words or not os.path.isabs(words[0]):
            raise SpecError(
                f"--allow-entrypoint {text!r}: give an absolute path, optionally followed "
                "by the arguments every rank must start with"
            )
        return cls(words[0], tuple(words[1:]))

    def __str__(self) -> str:
        return shlex.join((self.path, *self.args))

    @property
    def runs_any_code(self) -> bool:
        """A bare interpreter or launcher: any arguments, so any code."""
        if self.args:
            return False
        names = {os.path.basename(self.path), os.path.basename(os.path.realpath(self.path))}
        return any(_RUNS_ANY.fullmatch(n) for n in names)

    def admits_args(self, spec: JobSpec) -> bool:
        """Every rank's arguments (`args`, then its `rank_args`) start with `args`."""
        need = self.args
        common = tuple(spec.args[: len(need)])
        if len(common) == len(need):
            return common == need
        if common != need[: len(common)]:
            return False
        rest = need[len(common) :]
        return all(
            tuple(spec.rank_args.get(r, ())[: len(rest)]) == rest for r in range(spec.nprocs)
        )


class Admission:
    """The agent's limits and policy. `allowed_entrypoints` (None: any program, any
    environment) are `AllowedEntrypoint` texts; `allowed_env`: variables that `loads_code`
    would refuse but the operator permits; `min_free_space` (bytes, 0: none) is what the
    log directory's file system must have free for a Start. Raises SpecError for an
    entry it cannot read."""

    def __init__(
        self,
        log_dir: str,
        *,
        limits: Limits | None = None,
        max_running_ranks: int = 4096,
        allowed_entrypoints: Iterable[str] | None = None,
        allowed_env: Iterable[str] = (),
        min_free_space: int = 0,
    ) -> None:
        self.log_dir = log_dir
        self.limits = limits or Limits()
        self.max_running_ranks = max_running_ranks
        self.min_free_space = min_free_space
        self._allowed = (
            None
            if allowed_entrypoints is None
            else tuple(AllowedEntrypoint.parse(str(p)) for p in allowed_entrypoints)
        )
        self._allowed_env = frozenset(allowed_env)
        for name in self._allowed_env:
            if not name or "=" in name or "\0" in name:
                raise SpecError(f"--allow-env {name!r}: give a variable's name (no '=')")
        if self._allowed_env and self._allowed is None:
            raise SpecError("--allow-env applies only with --allow-entrypoint")
        loose = [str(e) for e in self._allowed or () if e.runs_any_code]
        if loose:
            logger.warning(
                "--allow-entrypoint %s: an interpreter or launcher without arguments "
                "allows any code (e.g. -c); allow its script instead, e.g. "
                '--allow-entrypoint "/usr/bin/python3 /opt/train.py"',
                ", ".join(loose),
            )

    def spec(self, spec: JobSpec) -> JobSpec:
        """The validated spec, its entrypoint the program to execute (see the module's
        doc). Raises SpecError or PermissionDenied; changes nothing."""
        validate_job_id(spec.job_id)
        spec = spec.validate(self.limits)
        if self._allowed is None:
            return spec
        program = self._program(spec, self._allowed)
        self._check_env(spec)
        if program == spec.entrypoint:
            return spec
        return replace(spec, entrypoint=program)

    def _program(self, spec: JobSpec, allowed: tuple[AllowedEntrypoint, ...]) -> str:
        asked = os.path.normpath(spec.entrypoint)
        real = os.path.realpath(spec.entrypoint)
        fits = [e for e in allowed if e.admits_args(spec)]
        for entry in fits:
            if os.path.normpath(entry.path) == asked:
                return entry.path  # the operator's path: a venv's python keeps its venv
        for entry in fits:
            if os.path.realpath(entry.path) == real:
                return real  # what was compared, not the request's (re-pointable) path
        named = [
            e
            for e in allowed
            if os.path.normpath(e.path) == asked or os.path.realpath(e.path) == real
        ]
        if named:
            raise PermissionDenied(
                f"entrypoint {spec.entrypoint} is allowed on this agent only as: "
                f"{'; '.join(map(str, named))} (every rank's arguments must start with "
                "those given; see --allow-entrypoint)"
            )
        raise PermissionDenied(
            f"entrypoint {spec.entrypoint} is not allowed on this agent "
            f"(allowed: {'; '.join(map(str, allowed))}; see --allow-entrypoint)"
        )

    def _check_env(self, spec: JobSpec) -> None:
        places: list[tuple[str, Mapping[str, str]]] = [
            ("env", spec.env),
            ("default_env", spec.default_env),
            *((f"rank_env[{r}]", env) for r, env in sorted(spec.rank_env.items())),
        ]
        for where, env in places:
            bad = sorted(k for k in env if loads_code(k) and k not in self._allowed_env)
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise PermissionDenied(
                    f"environment variable {bad[0]}{more} in the job's {where} can make a "
                    "rank load code that --allow-entrypoint did not allow; this agent "
                    f"refuses it unless started with --allow-env {bad[0]}"
                )

    def room(self, spec: JobSpec, running: int) -> None:
        """Raises LimitExceeded, with the arithmetic, when the node has no room for the
        spec's ranks beside the `running` ones: the running-ranks limit, file
        descriptors, free space on the log disk."""
        if running + spec.nprocs > self.max_running_ranks:
            raise LimitExceeded(
                f"starting {spec.nprocs} ranks would exceed this agent's limit of "
                f"{self.max_running_ranks} running ranks ({running} running)"
            )
        resources.check_fds(spec.nprocs)
        resources.check_free_space(self.log_dir, self.min_free_space)

    def free_space(self) -> int:
        """Bytes free on the log directory's file system (-1: unknown)."""
        try:
            return resources.free_bytes(self.log_dir)
        except OSError:
            return -1
