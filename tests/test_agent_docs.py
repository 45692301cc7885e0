"""AGENTS.md and program.md give the figures they share alike, and AGENTS.md stays a short reference.

Agents read both documents on every loop, so a figure edited in one place only would tell them two
things. Each shared figure (the budget, the run-to-run noise, the default's speed, the promotion
thresholds, the clock's allowances, the evaluation's shape) is found in each document by a pattern that
names it in words. A test fails when a document no longer states a figure as its pattern expects,
when the two documents differ, when AGENTS.md states it twice, or when it differs from the value the
code decides. Rewording a sentence therefore means updating its pattern here: that is the point.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import code_snippets, scheduler_commands

ROOT = Path(__file__).resolve().parents[1]
AGENTS_MD = ROOT / "AGENTS.md"
PROGRAM_MD = ROOT / "program.md"
AGENTS_MAX_BYTES = 14 * 1024   # issue 19: AGENTS.md is a reference of at most 14 KB
DEFAULT_ROW = "default `train.py`"  # first cell of the sizing table's row for the current default


def launch_default(dest: str) -> float:
    """The default of one of `launch`'s options, from the real parser."""
    from scheduler.cli import build_parser

    parser = build_parser()
    launch = next(a for a in parser._actions if a.dest == "command").choices["launch"]
    return next(a for a in launch._actions if a.dest == dest).default


def rule(name: str) -> Callable[[], float]:
    """A default of the promotion rule (scheduler/promotion.py)."""
    def value() -> float:
        from scheduler.promotion import RuleConfig

        return getattr(RuleConfig(), name)
    return value


def default_overrun_margin() -> float:
    from scheduler import trial

    return trial.HANDOVER_MARGIN


def protocol(name: str) -> Callable[[], float]:
    def value() -> float:
        from scheduler import protocol

        return getattr(protocol, name)
    return value


def sizing_cell(text: str, column: str) -> str:
    """A cell of the default's row in AGENTS.md's sizing table, by column header."""
    lines = text.splitlines()
    row = next((i for i, line in enumerate(lines) if line.startswith(f"| {DEFAULT_ROW}")), None)
    assert row is not None, f"AGENTS.md has no sizing-table row starting with {DEFAULT_ROW!r}"
    header = next(lines[i] for i in range(row, -1, -1) if lines[i].startswith("| configuration"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in lines[row].split("|")]))
    assert column in cells, f"the sizing table has no column {column!r}"
    return cells[column]


@dataclass(frozen=True)
class Figure:
    agents: str                                # where AGENTS.md states it: a pattern with one group
    program: str | None = None                 # the same in program.md, when program.md states it too
    code: Callable[[], float] | None = None    # the value the code decides, when the code decides one
    scale: float = 1.0                         # document value x scale = code value (percent -> fraction)


W = r"\s+"  # words of a sentence may be split across lines
FIGURES = {
    "budget seconds": Figure(
        agents=rf"The{W}budget{W}is{W}(\d+){W}s{W}of{W}training",
        program=rf"fixed{W}budget{W}of{W}(\d+){W}s{W}of{W}training",
        code=lambda: launch_default("budget")),
    "run-to-run noise of the default (σ, bpc)": Figure(
        agents=rf"mean{W}of{W}3{W}seeds,{W}σ{W}(\d\.\d+)",
        program=rf"σ{W}(\d\.\d+){W}bpc{W}for{W}the{W}default"),
    "the default's tokens/s": Figure(
        agents="table:tokens/s",
        program=rf"the{W}default:{W}([\d.]+-[\d.]+M){W}tokens/s"),
    "the default's MFU": Figure(
        agents="table:MFU",
        program=rf"tokens/s{W}and{W}([\d.]+-[\d.]+%){W}MFU"),
    "screening margin (σ)": Figure(
        agents=rf"by{W}more{W}than{W}([\d.]+){W}σ{W}earns",
        program=rf"by{W}more{W}than{W}([\d.]+){W}σ,{W}the{W}scheduler",
        code=rule("screen_sigmas")),
    "confirmation reruns": Figure(
        agents=rf"earns{W}(\d+){W}reruns",
        program=rf"with{W}(\d+){W}other{W}seeds",
        code=rule("confirmations")),
    "least gain to promote (bpc)": Figure(
        agents=rf"mean{W}gain{W}exceeds{W}([\d.]+){W}bpc",
        program=rf"mean{W}gain{W}exceeds{W}([\d.]+){W}bpc",
        code=rule("min_delta")),
    "test level (%)": Figure(
        agents=rf"one-sided{W}test{W}at{W}(\d+)%",
        code=rule("confidence"), scale=0.01),
    "prior σ (bpc)": Figure(
        agents=rf"σ{W}is{W}taken{W}as{W}at{W}least{W}([\d.]+){W}bpc",
        code=rule("prior_sigma")),
    "overrun margin (s)": Figure(
        agents=rf"the{W}budget{W}plus{W}a{W}(\d+){W}s{W}margin",
        code=default_overrun_margin),
    "start-up allowance (s)": Figure(
        agents=rf"--startup-allowance`,{W}default{W}(\d+){W}s",
        code=lambda: launch_default("startup_allowance")),
    "evaluation window (bytes)": Figure(
        agents=rf"(\d+)-byte{W}windows,{W}\d+{W}per{W}forward",
        code=protocol("WINDOW")),
    "evaluation batch (windows)": Figure(
        agents=rf"\d+-byte{W}windows,{W}(\d+){W}per{W}forward",
        code=protocol("EVAL_BATCH")),
}


def find(pattern: str, text: str, document: str, figure: str) -> str:
    """The one value `pattern` finds; fails when the document states the figure zero or several times."""
    if pattern.startswith("table:"):
        return sizing_cell(text, pattern.removeprefix("table:"))
    found = re.findall(pattern, text)
    assert found, (f"{document} no longer states {figure!r} as /{pattern}/: put it back, or update the "
                   f"pattern here and the other document")
    assert len(found) == 1, f"{document} states {figure!r} {len(found)} times ({found}): give it once"
    return found[0]


def number(value: str) -> float:
    return float(value.rstrip("%"))


PARAMS = [pytest.param(name, figure, id=name) for name, figure in FIGURES.items()]


def check(name: str, figure: Figure, agents_text: str, program_text: str) -> None:
    """Fails when the documents do not state the figure once each, alike, and as the code decides it."""
    in_agents = find(figure.agents, agents_text, "AGENTS.md", name)
    if figure.program is not None:
        in_program = find(figure.program, program_text, "program.md", name)
        assert in_program == in_agents, f"{name}: program.md says {in_program}, AGENTS.md says {in_agents}"
    if re.fullmatch(r"\d+\.\d+", in_agents):  # a decimal figure appears once in AGENTS.md, wherever it is used
        uses = len(re.findall(rf"(?<![\d.]){re.escape(in_agents)}(?![\d])", agents_text))
        assert uses == 1, f"AGENTS.md gives {in_agents} ({name}) {uses} times: give it once"
    if figure.code is not None:
        decided = figure.code()
        assert math.isclose(number(in_agents) * figure.scale, decided), \
            f"{name}: the documents say {in_agents}, the code decides {decided}"


@pytest.mark.parametrize("name,figure", PARAMS)
def test_shared_figure_agrees(name: str, figure: Figure):
    check(name, figure, AGENTS_MD.read_text(), PROGRAM_MD.read_text())


def edited_once(pattern: str, text: str) -> str:
    """`text` with the figure `pattern` finds changed in its last digit: an edit made in one place."""
    if pattern.startswith("table:"):
        value = sizing_cell(text, pattern.removeprefix("table:"))
        start = text.index(f"| {value} |") + 2
        end = start + len(value)
    else:
        match = re.search(pattern, text)
        start, end, value = match.start(1), match.end(1), match.group(1)
    last = max(i for i, c in enumerate(value) if c.isdigit())
    value = value[:last] + str((int(value[last]) + 1) % 10) + value[last + 1:]
    return text[:start] + value + text[end:]


@pytest.mark.parametrize("name,figure", PARAMS)
def test_an_edit_in_one_place_is_caught(name: str, figure: Figure):
    """The check above fails when one document's figure changes and nothing else does."""
    agents_text, program_text = AGENTS_MD.read_text(), PROGRAM_MD.read_text()
    with pytest.raises(AssertionError):
        check(name, figure, edited_once(figure.agents, agents_text), program_text)
    if figure.program is not None:
        with pytest.raises(AssertionError):
            check(name, figure, agents_text, edited_once(figure.program, program_text))


def test_program_md_states_the_budget_in_minutes_alike():
    text = PROGRAM_MD.read_text()
    seconds = float(find(FIGURES["budget seconds"].program, text, "program.md", "budget seconds"))
    minutes = re.findall(rf"(\d+){W}minutes", text)
    assert minutes, "program.md no longer gives the budget in minutes: update this test"
    assert all(float(m) * 60 == seconds for m in minutes), f"program.md: {minutes} minutes against {seconds} s"


def test_program_md_waits_with_a_timeout_it_explains():
    """Every `wait` in program.md carries the same --timeout, and the prose says why that many seconds."""
    snippets, prose = code_snippets(PROGRAM_MD.read_text())
    waits = [words for snippet in snippets for words in scheduler_commands(snippet) if words[:1] == ["wait"]]
    assert waits, "program.md shows no `wait`"
    timeouts = {words[words.index("--timeout") + 1] for words in waits if "--timeout" in words}
    assert all("--timeout" in words for words in waits), f"a `wait` without --timeout: {waits}"
    assert len(timeouts) == 1, f"program.md's waits use different timeouts: {timeouts}"
    assert re.search(rf"the{W}{timeouts.pop()}{W}s{W}keep", prose), "program.md does not say why that timeout"


def test_program_md_lists_every_exit_code_of_wait():
    """program.md's line on `wait` names each exit code scheduler/cli.py defines, and no other."""
    from scheduler import cli

    defined = {cli.OK, cli.FAILED, cli.BAD_INPUT, cli.TIMEOUT}
    line = re.search(r"^- `wait`: (.*?)(?=^- |\n\n)", PROGRAM_MD.read_text(), flags=re.M | re.S)
    assert line, "program.md has no exit-code line for `wait`"
    listed = {int(code) for code in re.findall(r"(?:^|; )(\d) ", line.group(1))}
    assert listed == defined, f"program.md lists {sorted(listed)} for wait, cli.py defines {sorted(defined)}"


def status_table(text: str) -> list[str]:
    """The statuses in the first column of AGENTS.md's table under "When a trial fails"."""
    section = text.split("## When a trial fails", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


def test_agents_md_explains_every_status():
    from scheduler.results import STATUSES

    assert sorted(status_table(AGENTS_MD.read_text())) == sorted(STATUSES)


def test_agents_md_is_a_short_reference():
    size = len(AGENTS_MD.read_bytes())
    assert size <= AGENTS_MAX_BYTES, (f"AGENTS.md is {size} bytes, over {AGENTS_MAX_BYTES}: move history and "
                                      f"measurements to docs/design.md")
