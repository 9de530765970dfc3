"""The README and docs/ stay true to the code (issue 18, item 7): every `legato ...` command
they show names a command that exists, with options that command takes, and every repository
path they name exists."""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from legato import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TOP_DIRS = ("legato/", "tests/", "benchmarks/", "scripts/", "docs/", "native/", "requirements/",
            ".ci/")


def _commands(text: str) -> list[str]:
    """`legato ...` lines of fenced blocks (continuations joined) and inline code spans."""
    found = []
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    for block in fenced:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("legato "):
                found.append(line.split(" #")[0])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`(legato [^`]+)`", prose.replace("\n", " "))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


PARSER = cli.build_parser()
COMMANDS = _subparsers(PARSER)
CASES = [(doc.name, c) for doc in DOCS for c in _commands(doc.read_text())]


def _tokens(command: str) -> list[str]:
    text = command.replace("[", " ").replace("]", " ").replace("\\|", " ").replace("|", " ")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def test_the_docs_show_commands():
    assert len(CASES) > 50, len(CASES)


@pytest.mark.parametrize("doc,command", CASES, ids=[f"{d}:{c[:40]}" for d, c in CASES])
def test_a_documented_command_exists_with_those_options(doc, command):
    tokens = _tokens(command)[1:]
    top = {s for a in PARSER._actions for s in a.option_strings}
    while tokens and tokens[0] in top:   # legato -v rewrite ...
        tokens.pop(0)
    if not tokens or tokens[0].startswith("-"):
        return
    name = tokens[0]
    assert name in COMMANDS, f"{doc}: `{command}`: no command {name!r}"
    sub = COMMANDS[name]
    known = {s for a in sub._actions for s in a.option_strings}
    for token in tokens[1:]:
        if token == "--":
            break                        # bench: the rest goes to the benchmark script
        if token.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", token):
            option = token.split("=", 1)[0]
            assert option in known, f"{doc}: `{command}`: legato {name} has no {option}"
    positional = [a for a in sub._actions if not a.option_strings and a.choices]
    words = [t for t in tokens[1:] if not t.startswith("-")]
    if positional and words and positional[0].dest in ("action", "name"):
        choices = list(positional[0].choices)
        if words[0].islower() and words[0].isalpha() or words[0] in choices:
            assert words[0] in choices, f"{doc}: `{command}`: {words[0]!r} not in {choices}"


def _paths(doc: Path) -> set[str]:
    """Repository paths in code spans and links (relative links resolved from the doc)."""
    text = doc.read_text()
    spans = {s.rstrip(".,:;") for s in re.findall(r"`([^`\s]+)`", text)}
    found = {s for s in spans if s.startswith(TOP_DIRS) and "://" not in s}
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in link or link.startswith(("#", "mailto:")):
            continue
        target = (doc.parent / link.split("#")[0]).resolve()
        found.add(str(target.relative_to(ROOT)) if target.is_relative_to(ROOT) else link)
    return found


def _expand(path: str) -> list[str]:
    """Brace lists (a/{b,c}.py) into each path."""
    m = re.search(r"\{([^}]*)\}", path)
    if m is None:
        return [path]
    return list(itertools.chain.from_iterable(
        _expand(path[:m.start()] + part + path[m.end():]) for part in m[1].split(",")))


PATHS = sorted({(doc.name, p) for doc in DOCS for p in _paths(doc)})


def test_the_docs_name_paths():
    assert len(PATHS) > 20, len(PATHS)


@pytest.mark.parametrize("doc,path", PATHS, ids=[f"{d}:{p}" for d, p in PATHS])
def test_a_path_the_docs_name_exists(doc, path):
    for one in _expand(path.split("::")[0].split("#")[0]):
        one = re.sub(r":\d+(-\d+)?$", "", one)           # file.py:12 names a line
        if any(ch in one for ch in "*?"):
            assert list(ROOT.glob(one)), f"{doc}: nothing matches {one}"
        elif not (ROOT / one).exists():
            # what a command writes (docs/api/, results) is git-ignored, not missing
            ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", one], cwd=ROOT,
                                     timeout=30).returncode == 0
            assert ignored, f"{doc}: {one} does not exist"
