"""The docs' commands compose: every `python -m jobs.<job> <overrides>` in README.md, docs/, benchmarks/README.md and
the jobs' own docstrings is composed by Hydra exactly as the job would (a key that does not exist or a config group
option that is not there fails here), so a renamed or removed option cannot stay documented. Placeholders
(`experiment=<name>`) are left out and the rest of the command is still checked. Inline overrides in the prose
(`prepare.shards=16`) are checked as a shell and Hydra would read them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted((ROOT / "jobs").glob("*.py"))  # their docstrings show commands too
HYDRA_JOBS = {p.stem for p in (ROOT / "jobs").glob("*.py")
              if 'config_name="' in p.read_text() and p.stem not in ("__init__", "cli")}
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.")


def _snippets(text: str) -> list[str]:
    """Code the reader copies: lines of fenced blocks (backslash continuations joined) and inline code spans
    (which may wrap across a line break in prose)."""
    out = []
    parts = re.split(r"^[ \t]*```[^\n]*\n", text, flags=re.M)
    for i, part in enumerate(parts):
        if i % 2:  # inside a fenced block
            out += part.replace("\\\n", " ").splitlines()
        else:
            out += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", part)]
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS + SOURCES:
        for snippet in _snippets(doc.read_text()) if doc.suffix == ".md" else doc.read_text().splitlines():
            for cmd in snippet.split("&&"):
                m = re.search(r"python -m jobs\.(\w+)(.*)", cmd)
                if not m or m.group(1) not in HYDRA_JOBS:
                    continue
                # up to a comment; in a docstring also up to the prose (`python -m jobs.x ...: what it does`)
                end = r"\s#" if doc.suffix == ".md" else r"\s#|: |\"\"\""
                job, rest = m.group(1), re.split(end, m.group(2))[0]
                rest = PLACEHOLDER.sub("<>", rest)  # `<reviews dataset>` is one placeholder, spaces and all
                try:
                    args = shlex.split(rest)
                except ValueError:  # an unbalanced quote: a span cut by the prose, not a command
                    continue
                if any(a.startswith("-") for a in args):
                    continue  # `--config-dir <folder>`: a folder the reader makes first
                args = [a.strip("[]") for a in args if not PLACEHOLDER.search(a)]  # `[optional]` is checked too
                found.append((f"{doc.relative_to(ROOT)}: {' '.join(cmd.split())}", job, args))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check() -> None:
    assert len(COMMANDS) > 40 and {job for _, job, _ in COMMANDS} >= {"prepare", "train", "tune", "deploy",
                                                                       "evaluate", "pipeline", "batch_predict"}


@pytest.mark.parametrize("where,job,overrides", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_documented_command_composes(where: str, job: str, overrides: list[str]) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=CONF):
        compose(config_name=job, overrides=overrides)


# An inline override in the prose (`prepare.shards=16`, `'serve.routes={recommend: {num_replicas: 2}}'`) is copied
# into a shell as it is: a value with spaces must be quoted, and each override must be one Hydra can parse.
OVERRIDE_WORD = re.compile(r"^[+~]{0,2}[a-z_][\w.@/]*=")
DOTTED_OVERRIDE = re.compile(r"^[+~]{0,2}[a-z_]\w*\.[\w.]*=")


def documented_override_spans() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for part in re.split(r"^[ \t]*```[^\n]*\n", doc.read_text(), flags=re.M)[::2]:   # prose, not fenced blocks
            for span in re.findall(r"`([^`]+)`", part):
                span = " ".join(span.split())
                try:
                    words = shlex.split(span)
                except ValueError:
                    continue
                if words and OVERRIDE_WORD.match(words[0]) and not PLACEHOLDER.search(span):
                    found.append((f"{doc.relative_to(ROOT)}: {span}", span))
    return found


OVERRIDE_SPANS = documented_override_spans()


def test_the_docs_have_inline_overrides_to_check() -> None:
    assert len(OVERRIDE_SPANS) > 50


@pytest.mark.parametrize("where,span", OVERRIDE_SPANS, ids=[w for w, _ in OVERRIDE_SPANS])
def test_an_inline_override_survives_the_shell(where: str, span: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words = shlex.split(span)
    assert all(OVERRIDE_WORD.match(w) for w in words), f"{where}: quote the override, the shell splits it: {words}"
    OverridesParser.create().parse_overrides([w for w in words if DOTTED_OVERRIDE.match(w)])
