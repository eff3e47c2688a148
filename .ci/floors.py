"""The runtime floors of pyproject.toml, as pins or as a check of what is installed.

    python .ci/floors.py pins    # prints `name==floor` per runtime dependency (a constraints file)
    python .ci/floors.py check   # exits 1 unless each runtime dependency is installed at its floor
    python .ci/floors.py extra NAME   # prints the requirements of the optional dependencies NAME
    python .ci/floors.py python  # prints the oldest Python that requires-python admits: 3.11

Both read `[project] dependencies`, so the versions `make test-min` installs cannot drift
from what pyproject.toml declares. Every runtime dependency must have exactly one `>=`
floor: one without a floor could not be tested at its oldest and is refused.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# name, then comma-separated specifiers; markers and extras are not used by rankd and refused.
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*((?:[<>=!~]=?\s*[^,;\s\[]+\s*,?\s*)+)$")


def _project(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads(pyproject.read_text())["project"]
    return project


def oldest_python(pyproject: Path = PYPROJECT) -> str:
    """The X.Y of `requires-python = ">=X.Y"`; ValueError for any other form."""
    text = _project(pyproject)["requires-python"]
    match = re.fullmatch(r">=\s*(3\.\d+)", text.strip())
    if match is None:
        raise ValueError(f"requires-python {text!r}: not of the form '>=3.N'")
    return match.group(1)


def floors(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """{distribution name: floor version} of every runtime dependency; ValueError if one
    has no single `>=` floor or is not a plain `name>=X[,...]` requirement."""
    deps = _project(pyproject)["dependencies"]
    found: dict[str, str] = {}
    for dep in deps:
        match = _REQ.match(dep)
        if match is None:
            raise ValueError(f"{dep!r}: not a plain 'name>=version' requirement")
        name, specs = match.group(1), match.group(2)
        lows = [s.strip()[2:].strip() for s in specs.split(",") if s.strip().startswith(">=")]
        if len(lows) != 1:
            raise ValueError(f"{dep!r}: needs exactly one '>=' floor, found {len(lows)}")
        found[name] = lows[0]
    return found


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _same(have: str, floor: str) -> bool:
    """PEP 440 equality for plain release numbers: 5.9 == 5.9.0."""

    def key(v: str) -> tuple[str | int, ...]:
        parts: list[str | int] = [int(p) if p.isdigit() else p for p in v.split(".")]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    return key(have) == key(floor)


def check(wanted: dict[str, str]) -> list[str]:
    """One line per runtime dependency not installed at exactly its floor."""
    wrong = []
    for name, floor in wanted.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: not installed, floor {floor}")
            continue
        if not _same(have, floor):
            wrong.append(f"{name}: {have} installed, floor {floor}")
    return wrong


def _extra(name: str) -> list[str]:
    extras: dict[str, list[str]] = _project().get("optional-dependencies", {})
    if name not in extras:
        raise ValueError(f"no optional-dependencies {name!r}")
    return extras[name]


def _report(wanted: dict[str, str]) -> int:
    wrong = check(wanted)
    for name, floor in wanted.items():
        if not any(line.startswith(f"{name}:") for line in wrong):
            print(f"  {name} {floor} (its floor)")
    for line in wrong:
        print(f"  WRONG {line}", file=sys.stderr)
    return 1 if wrong else 0


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if (command, len(args)) not in {("pins", 0), ("check", 0), ("python", 0), ("extra", 1)}:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if command == "python":
            print(oldest_python())
        elif command == "extra":
            print("\n".join(_extra(args[0])))
        elif command == "pins":
            print("\n".join(f"{_canon(n)}=={v}" for n, v in floors().items()))
        else:
            return _report(floors())
    except (ValueError, KeyError) as exc:
        print(f"pyproject.toml: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
