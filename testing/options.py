"""Agent options as Python keywords: ``max_jobs=3`` -> ``--max-jobs 3``.

The flags are read from the real ``rankd-agent --help`` of the agent that will run, so
the check cannot drift from the agent: a new agent flag works at once, a misspelt one
is a ``TypeError`` before any agent starts.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from collections.abc import Mapping, Sequence

__all__ = ["MANAGED", "agent_args", "agent_flags"]

#: Flags that local clusters set themselves (loopback, a free port, a log dir per agent),
#: or that make the agent exit at once.
MANAGED = frozenset({"host", "port", "log_dir", "help", "version"})

# One usage entry: `[--max-jobs MAX_JOBS]`, `[--log-level {DEBUG,INFO}]`, `[--insecure]`.
# argparse wraps usage lines between entries, never inside one.
_ENTRY = re.compile(r"\[--([a-z0-9][a-z0-9-]*)( [^\]\[]+)?\]")


@functools.cache
def agent_flags(command: tuple[str, ...]) -> Mapping[str, bool]:
    """Every long option of ``command --help``, as its keyword name (``max_jobs``)
    mapped to whether it takes a value. Cached per command."""
    done = subprocess.run(
        [*command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "80"},
    )
    usage = done.stdout.split("\n\n", 1)[0]
    flags = {m[1].replace("-", "_"): bool(m[2]) for m in _ENTRY.finditer(usage)}
    if done.returncode != 0 or not flags:
        raise RuntimeError(
            f"cannot read the options of {' '.join(command)} (exit code {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return flags


def agent_args(options: Mapping[str, object], command: Sequence[str]) -> list[str]:
    """The command-line arguments for ``options``: ``name=value`` -> ``--name value``;
    ``True`` -> the bare flag, ``False``/``None`` -> nothing; a list or tuple -> the flag
    once per item. Raises ``TypeError`` naming an option the agent does not have, one
    local clusters set themselves, or a value of the wrong kind."""
    if not options:
        return []
    flags = agent_flags(tuple(command))
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if name in MANAGED:
            raise TypeError(f"agent option {name!r} ({flag}) is set by rankd.testing itself")
        if name not in flags:
            known = ", ".join(sorted(set(flags) - MANAGED))
            raise TypeError(f"rankd-agent has no option {name!r} ({flag}); it has: {known}")
        takes_value = flags[name]
        if value is None or value is False:
            continue
        if not takes_value:
            if value is not True:
                raise TypeError(f"agent option {name!r} is a switch: pass True, not {value!r}")
            args.append(flag)
            continue
        if value is True:
            raise TypeError(f"agent option {name!r} needs a value, not True")
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            args += [flag, str(item)]
    return args
