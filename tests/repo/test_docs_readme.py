"""The docs document what exists: their sections, the flags they show, their links, sources.

The docs are README.md (the front door: at most README_MAX_BYTES, its SECTIONS in order)
and every ``docs/*.md`` (each topic moved out of the README in the file DOC_TOPICS names).
Every `rankd ...` and `rankd-agent ...` command they show (in code blocks and inline
code) may only use flags that the real `--help` of that command lists; every relative
link points at a file that exists (and at a heading of it, for `file.md#anchor`); the
comparison table cites sources that are listed under it. (The commands of the tested
blocks also run: tests/e2e/test_readme.py.)
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
    EXIT_KILLED,
    EXIT_NODE_LOST,
    EXIT_TERMINATED,
    EXIT_USAGE,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_BYTES = 20_000
BIN = Path(sys.executable).parent
SUBCOMMANDS = ("launch", "status", "logs", "kill")
SECTIONS = ("Quick start", "CLI", "Python API", "Documentation")
# Each topic that left the README, and the headings its docs file must have (the first
# one is the file's title).
DOC_TOPICS = {
    "concepts.md": ("Concepts",),
    "deploying.md": ("Deploying", "Slurm", "Kubernetes", "systemd"),
    "security.md": ("Security",),
    "observability.md": ("Observability",),
    "troubleshooting.md": ("Troubleshooting",),
    "wire.md": ("The wire contract", "Log layout (torch's)", "Failure fields"),
    "guarantees.md": ("Guarantees",),
    "comparison.md": ("Compared with torchrun, Slurm srun, Ray Jobs",),
    "performance.md": ("Performance", "Latest results", "What limits each row", "Reproduce"),
}
# A command ends at the separator of its own command, a pipe, a list or a redirection.
_END = {"--", "2>", "2>&1"}
_PREFIX = {"do", "then", "else", "exec", "time", "!"}


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)\n", README.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _without_code(text: str) -> str:
    """``text`` without its fenced blocks (whose `#` lines are shell comments)."""
    return re.sub(r"^```.*?^```[^\n]*$", "", text, flags=re.S | re.M)


def _headings(path: Path) -> list[str]:
    return [
        h.strip() for h in re.findall(r"^#{1,6} (.+)$", _without_code(path.read_text()), flags=re.M)
    ]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _links(path: Path) -> list[str]:
    """The targets of the Markdown links in ``path`` outside code."""
    prose = re.sub(r"`[^`\n]*`", "CODE", _without_code(path.read_text()))
    return re.findall(r"\]\(([^)\s]+)\)", prose)


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


def _documented_commands(paths: list[Path] | None = None) -> list[list[str]]:
    """The commands shown in ``paths`` (default: README.md and every docs/*.md)."""
    commands: list[list[str]] = []
    for path in _doc_files() if paths is None else paths:
        body = path.read_text()
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


def test_readme_is_a_short_front_door() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, size
    readme = README.read_text()
    assert "make run" in readme and "make test" in readme
    assert "from rankd.client import" in readme


@pytest.mark.parametrize("name", sorted(DOC_TOPICS))
def test_each_moved_topic_has_its_docs_file(name: str) -> None:
    path = DOCS / name
    assert path.is_file(), path
    headings = _headings(path)
    assert headings[:1] == [DOC_TOPICS[name][0]], headings  # its title
    for heading in DOC_TOPICS[name][1:]:
        assert heading in headings, (name, heading, headings)
    assert f"](docs/{name})" in README.read_text(), f"README.md does not link docs/{name}"


def test_readme_links_the_testing_guide() -> None:
    text = README.read_text()
    assert "Testing distributed code with rankd" in text
    assert "](docs/testing.md)" in text


def test_relative_links_point_at_existing_files() -> None:
    broken = []
    for path in _doc_files():
        for target in _links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: {target}"
            if not linked.exists() or (
                anchor
                and linked.suffix == ".md"
                and anchor not in {_anchor(h) for h in _headings(linked)}
            ):
                broken.append(where)
    assert broken == []


def test_the_docs_show_real_commands() -> None:
    commands = _documented_commands()
    assert len(commands) > 20  # the parser finds them
    assert any(c[0] == "rankd-agent" for c in commands)
    assert {c[1] for c in commands if c[0] == "rankd" and len(c) > 1} >= set(SUBCOMMANDS)
    readme = _documented_commands([README])  # the front door shows every command
    assert any(c[0] == "rankd-agent" for c in readme)
    assert {c[1] for c in readme if c[0] == "rankd" and len(c) > 1} >= set(SUBCOMMANDS)
    docs = _documented_commands(sorted(DOCS.glob("*.md")))  # the docs' commands are read too
    assert any(c[0] == "rankd-agent" for c in docs)
    assert any(c[:2] == ["rankd", "launch"] for c in docs)


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
        (EXIT_KILLED, "killed by another client"),
        (EXIT_NODE_LOST, "node was lost"),
        (EXIT_INTERRUPTED, "Ctrl-C"),
        (EXIT_TERMINATED, "SIGTERM"),
    ):
        assert re.search(rf"`{code}` [^`]*{re.escape(words)}", paragraph), (code, paragraph)


def test_comparison_cites_its_sources() -> None:
    title, text = (DOCS / "comparison.md").read_text().split("\n", 1)
    assert title == "# Compared with torchrun, Slurm srun, Ray Jobs"
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
