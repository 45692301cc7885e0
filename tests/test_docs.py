"""The documents name only commands and flags that exist.

Every `python -m scheduler ...` in program.md, AGENTS.md and README.md, in fenced
blocks, indented code and inline code, is parsed with the real parser
(scheduler.cli.build_parser). Mentions must be in code, so that none escapes the check.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from scheduler.cli import build_parser

from conftest import COMMAND, PLACEHOLDERS, code_snippets, scheduler_commands

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("program.md", "AGENTS.md", "README.md")


def all_commands() -> list[tuple[str, list[str]]]:
    found = []
    for name in DOCS:
        snippets, _ = code_snippets((ROOT / name).read_text())
        for snippet in snippets:
            found.extend((name, words) for words in scheduler_commands(snippet))
    return found


COMMANDS = all_commands()


def test_documents_exist_and_mention_commands():
    by_doc = {name: [w for n, w in COMMANDS if n == name] for name in DOCS}
    for name, commands in by_doc.items():
        assert commands, f"{name} mentions no `python -m scheduler` command"
    used = {words[0] for words in by_doc["program.md"] if words}
    assert {"submit", "wait", "results", "show", "status", "baseline"} <= used


def strict_parser():
    """build_parser() without argparse's prefix matching: a doc must spell every flag out in full."""
    parser = build_parser()
    parser.allow_abbrev = False
    for sub in next(a for a in parser._actions if a.dest == "command").choices.values():
        sub.allow_abbrev = False
    return parser


@pytest.mark.parametrize("doc,words", COMMANDS, ids=[f"{d}:{' '.join(w)[:60]}" for d, w in COMMANDS])
def test_command_parses(doc, words):
    parser = strict_parser()
    try:
        args = parser.parse_args(words)
    except SystemExit as exit:
        if exit.code == 0 and ("-h" in words or "--help" in words):
            return
        pytest.fail(f"{doc}: `python -m scheduler {shlex.join(words)}` is not a valid command (argparse exit {exit.code})")
    assert callable(args.func)


def test_every_mention_is_in_code():
    """A command written in prose would escape the check above: put it in backticks or a code block."""
    for name in DOCS:
        _, prose = code_snippets((ROOT / name).read_text())
        stray = [line for line in prose.splitlines() if COMMAND.search(line + " ")]
        assert not stray, f"{name}: commands outside code: {stray}"


def test_readme_lists_every_command():
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    readme = {build_parser().parse_args(w).command for d, w in COMMANDS if d == "README.md" and "--help" not in w}
    missing = set(subcommands) - readme
    assert not missing, f"README.md does not show these commands: {sorted(missing)}"


def test_readme_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert "    pip install -e . && python -m scheduler launch --gpus all\n" in text
    assert "## Two commands" in text


def test_abbreviated_flags_are_refused():
    with pytest.raises(SystemExit):
        strict_parser().parse_args(["wait", "x", "--time", "5"])
    assert build_parser().parse_args(["wait", "x", "--time", "5"]).timeout == 5  # what the check guards against


def test_extraction_examples():
    snippets, prose = code_snippets(
        "Run `python -m scheduler wait \"$ID\" --timeout 5` or:\n\n"
        "```bash\nID=$(python -m scheduler submit f.py --agent a -m \"x (y)\")\n"
        "python -m scheduler results --json | tail -n 3  # comment\n```\n"
        "    python -m scheduler status\n"
    )
    commands = [c for s in snippets for c in scheduler_commands(s)]
    assert commands == [
        ["submit", "f.py", "--agent", "a", "-m", "x (y)"],
        ["results", "--json"],
        ["status"],
        ["wait", PLACEHOLDERS["$ID"], "--timeout", "5"],
    ]
    assert "python -m scheduler" not in prose


def test_main_job_command_without_a_gpu_says_how_to_use_the_cpu(tmp_path):
    """README's main job on a machine with no GPU: a clear message and the CPU-mode hint, no traceback."""
    import os
    import subprocess
    import sys

    (tmp_path / "train.py").write_text((Path(__file__).resolve().parent.parent / "train.py").read_text())
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no nvidia-smi
    done = subprocess.run([sys.executable, "-m", "scheduler", "launch", "--gpus", "all"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no GPU found" in done.stderr and "--pretend-gpus 2 --device cpu" in done.stderr
    assert "Traceback" not in done.stderr
