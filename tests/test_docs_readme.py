"""The README documents what exists: its sections, the flags it shows, its sources.

Every `rankd ...` and `rankd-agent ...` command the README shows (in code blocks and
inline code) may only use flags that the real `--help` of that command lists; the
comparison table cites sources that are listed under it. (The commands of the tested
blocks also run: tests/test_readme.py.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from rankd.client.cli_jobs import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
SUBCOMMANDS = ("launch", "status", "logs", "kill")
SECTIONS = (
    "Concepts",
    "Quick start",
    "CLI",
    "Python API",
    "Deploying",
    "Security",
    "Guarantees",
    "Performance",
    "Compared with torchrun, Slurm srun, Ray Jobs",
    "Troubleshooting",
)
# A command ends at the separator of its own command, a pipe, a list or a redirection.
_END = {"--", "2>", "2>&1"}
_PREFIX = {"do", "then", "else", "exec", "time", "!"}


def _sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)\n", README.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


@cache
def _help_flags(*command: str) -> frozenset[str]:
    done = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-z])\b", done.stdout))


def _commands(text: str) -> list[list[str]]:
    """Every `rankd`/`rankd-agent` command in ``text``, as its words up to its end."""
    text = text.replace("\\\n", " ")
    while True:  # $(...) and $((...)) are other commands: drop them, innermost first
        text, subs = re.subn(r"\$\(\(?[^()]*\)?\)", "SUBST", text)
        if not subs:
            break
    found = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#\s.*$", "", line)  # a shell comment
        for simple in re.split(r"\|\||&&|[;|&(`]", line):
            words = simple.split()
            while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0]) or words[0] in _PREFIX):
                words.pop(0)  # VAR=value, `do`, `exec`: the command comes after
            if not words or words[0] not in ("rankd", "rankd-agent"):
                continue
            end = next((i for i, w in enumerate(words) if w in _END or w.startswith(">")), None)
            found.append(words[:end])
    return found


def _documented_commands() -> list[list[str]]:
    sections = _sections()
    sections.pop("Performance", None)  # bench commands, not rankd's
    commands: list[list[str]] = []
    for body in sections.values():
        for block in re.findall(r"^```\w*\n(.*?)^```", body, flags=re.S | re.M):
            commands += _commands(block)
        prose = re.sub(r"^```\w*\n.*?^```", "", body, flags=re.S | re.M)
        for span in re.findall(r"`([^`]+)`", prose):
            if span.startswith(("rankd ", "rankd-agent ")):
                commands += _commands(span)
    return commands


def test_readme_has_every_section_of_the_issue() -> None:
    titles = list(_sections())
    for title in SECTIONS:
        assert title in titles, title
    order = [titles.index(t) for t in SECTIONS]
    assert order == sorted(order), titles


def test_the_readme_shows_real_commands() -> None:
    commands = _documented_commands()
    assert len(commands) > 20  # the parser finds them
    assert any(c[0] == "rankd-agent" for c in commands)
    assert {c[1] for c in commands if c[0] == "rankd" and len(c) > 1} >= set(SUBCOMMANDS)


@pytest.mark.timeout(120)
def test_documented_flags_exist() -> None:
    unknown = []
    for words in _documented_commands():
        if words[0] == "rankd-agent":
            known = _help_flags("rankd-agent")
        elif len(words) > 1 and words[1] in SUBCOMMANDS:
            known = _help_flags("rankd", words[1])
        else:  # `rankd ... --tls-cert client.pem`: any subcommand's flag
            known = frozenset().union(*(_help_flags("rankd", s) for s in SUBCOMMANDS))
        for word in words[1:]:
            flag = word.split("=", 1)[0].strip("`\"'[](),")
            if re.fullmatch(r"--?[a-z][a-z0-9-]*", flag) and flag not in known:
                unknown.append((" ".join(words), flag))
    assert unknown == []


def test_exit_codes_are_the_cli_s() -> None:
    text = _sections()["CLI"]
    paragraph = " ".join(text[text.index("Exit codes:") :].split("\n\n", 1)[0].split())
    for code, words in (
        (0, "succeeded"),
        (EXIT_FAILED, "failed"),
        (EXIT_USAGE, "unreachable node"),
        (EXIT_AUTH, "refused this client"),
        (EXIT_INTERRUPTED, "Ctrl-C"),
        (EXIT_TERMINATED, "SIGTERM"),
    ):
        assert re.search(rf"`{code}` [^`]*{re.escape(words)}", paragraph), (code, paragraph)


def test_comparison_cites_its_sources() -> None:
    text = _sections()["Compared with torchrun, Slurm srun, Ray Jobs"]
    table, _, sources = text.partition("Sources")
    cited = set(re.findall(r"\[(\d+)\]", table))
    listed = set(re.findall(r"\[(\d+)\] ", sources))
    assert cited and cited == listed, (cited, listed)
    for number in listed:
        entry = sources.split(f"[{number}] ", 1)[1].split("; [", 1)[0]
        assert re.search(r"<https://[^>]+>", entry), entry
    header = table.strip().splitlines()[0]
    for tool in ("rankd", "torchrun", "srun", "Ray Jobs"):
        assert tool in header
