"""Keep docs/adjustable_params.md in step with the installed x-transformers.

Run from anywhere:

    python docs/generate_params.py            # rewrite the name and default columns in place
    python docs/generate_params.py --check    # exit 1 and print the differences if the doc is out of date

The doc holds two table regions, each between HTML comment markers
(`<!-- params:decoder -->` ... `<!-- /params:decoder -->`, the same for `wrapper`).
Inside a region every row `` | `name` | `default` | description | `` is keyed by
its name: the script rewrites the default from the installed library, keeps the
hand-written description and everything else in the file, drops rows whose name
the library no longer accepts, and appends rows for new names (description
"TODO: describe") to the last table of the region. Each change is reported.

Which names count as accepted is decided by `accepted_decoder_kwargs()`, which
asks the library itself (see there); `wrapper_kwargs()` does the same for
`TransformerWrapper`.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from x_transformers import Decoder, TransformerWrapper
from x_transformers.x_transformers import Attention, AttentionLayers, FeedForward

DOC_PATH = Path(__file__).with_name("adjustable_params.md")
TODO_DESCRIPTION = "TODO: describe"


class Required:
    """Default of a parameter that has none (shown as `required`)."""

    def __repr__(self) -> str:
        return "required"


REQUIRED = Required()

# The smallest decoder that still has one attention and one feed-forward layer,
# so that every `attn_*` and `ff_*` keyword really reaches its module.
PROBE_BASE: dict[str, Any] = {"dim": 16, "depth": 1, "heads": 2}


def _signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """Named parameters of `fn` (not self, *args or **kwargs) and their defaults."""
    params = inspect.signature(fn).parameters.values()
    return {
        p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default)
        for p in params
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _candidate_decoder_kwargs() -> dict[str, Any]:
    """Every name Decoder might accept, read from the signatures it routes to.

    `AttentionLayers.__init__` takes its own parameters and sends the rest
    through `groupby_prefix_and_trim`: `attn_<x>` to `Attention(x=...)` and
    `ff_<x>` to `FeedForward(x=...)`. Its own parameters bind first, so they win
    over a routed name that happens to share a prefix.
    """
    candidates = _signature_defaults(AttentionLayers.__init__)
    for prefix, module in (("attn_", Attention), ("ff_", FeedForward)):
        for name, default in _signature_defaults(module.__init__).items():
            candidates.setdefault(prefix + name, default)
    return candidates


def decoder_rejects(**kwargs: Any) -> bool:
    """Whether `Decoder(**PROBE_BASE, **kwargs)` refuses its keywords.

    Decoder refuses either with an `assert` (on `causal`, and the
    "unrecognized kwargs" check on names left over after routing) or with a
    TypeError from Attention or FeedForward (an unknown `attn_`/`ff_` name, or
    one that AttentionLayers already passes itself, such as `attn_heads`).
    """
    try:
        Decoder(**{**PROBE_BASE, **kwargs})
    except (AssertionError, TypeError):
        return True
    return False


def accepted_decoder_kwargs() -> dict[str, Any]:
    """Keyword arguments the installed `Decoder` accepts, with their defaults.

    Candidates come from the signatures (`_candidate_decoder_kwargs`); each is
    then passed, at its default value, to a real tiny Decoder, and kept only if
    the Decoder builds. That drops what the signatures alone would wrongly
    list: `causal` (Decoder sets it and asserts) and the routed names that
    collide with arguments AttentionLayers passes itself (`attn_dim`,
    `attn_heads`, `attn_causal`, `ff_dim`, ...). The probe's own base names
    are accepted by construction.

    Not listed: `cross_attn_<x>` names, which go to cross-attention layers and
    are silently ignored by a Decoder without `cross_attend=True`.
    """
    return {
        name: default
        for name, default in _candidate_decoder_kwargs().items()
        if name in PROBE_BASE or not decoder_rejects(**{name: default})
    }


def wrapper_kwargs() -> dict[str, Any]:
    """Keyword arguments of `TransformerWrapper`, with their defaults.

    Its `__init__` has no **kwargs, so the signature is exactly what it accepts.
    """
    return _signature_defaults(TransformerWrapper.__init__)


# section name in the doc -> where its names and defaults come from
SECTIONS: dict[str, Callable[[], dict[str, Any]]] = {
    "decoder": accepted_decoder_kwargs,
    "wrapper": wrapper_kwargs,
}


def format_default(value: Any) -> str:
    """The default column as written in the doc."""
    return "required" if value is REQUIRED else f"`{value!r}`"


ROW_RE = re.compile(r"^\| `(?P<name>\w+)` \| (?P<default>required|`[^`]*`) \| (?P<description>.*) \|$")


@dataclass(frozen=True)
class Row:
    name: str
    default: str
    description: str


def parse_row(line: str) -> Row | None:
    match = ROW_RE.match(line)
    return Row(**match.groupdict()) if match else None


def format_row(name: str, default: str, description: str) -> str:
    return f"| `{name}` | {default} | {description} |"


def section_bounds(lines: list[str], section: str) -> tuple[int, int]:
    """Indices of the start and end marker lines of a section."""
    start, end = f"<!-- params:{section} -->", f"<!-- /params:{section} -->"
    try:
        return lines.index(start), lines.index(end)
    except ValueError:
        raise ValueError(f"{DOC_PATH.name}: markers {start} ... {end} not found") from None


def _section_rows(lines: list[str], section: str) -> dict[str, Row]:
    start, end = section_bounds(lines, section)
    rows: dict[str, Row] = {}
    for line in lines[start + 1 : end]:
        row = parse_row(line)
        if row is None:
            continue
        if row.name in rows:
            raise ValueError(f"{DOC_PATH.name}: `{row.name}` is documented twice in section {section}")
        rows[row.name] = row
    return rows


def documented_rows(text: str, section: str) -> dict[str, Row]:
    """Rows of a section by name; a name documented twice is an error."""
    return _section_rows(text.splitlines(), section)


@dataclass
class SectionReport:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # name, old, new default

    def lines(self, section: str) -> list[str]:
        out = [f"{section}: new name `{n}` (added with '{TODO_DESCRIPTION}')" for n in self.added]
        out += [f"{section}: `{n}` no longer accepted (row dropped)" for n in self.removed]
        out += [f"{section}: `{n}` default {old} -> {new}" for n, old, new in self.changed]
        return out


def sync_section(lines: list[str], section: str, accepted: dict[str, Any]) -> tuple[list[str], SectionReport]:
    """The section's lines with names and defaults taken from `accepted`."""
    start, end = section_bounds(lines, section)
    documented = _section_rows(lines, section)
    report = SectionReport()
    body: list[str] = []
    last_row = None
    for line in lines[start + 1 : end]:
        row = parse_row(line)
        if row is None:
            body.append(line)
            continue
        if row.name not in accepted:
            report.removed.append(row.name)
            continue
        default = format_default(accepted[row.name])
        if default != row.default:
            report.changed.append((row.name, row.default, default))
        body.append(format_row(row.name, default, row.description))
        last_row = len(body)
    report.added = [name for name in accepted if name not in documented]
    if report.added and last_row is None:
        raise ValueError(f"{DOC_PATH.name}: section {section} has no table to add new names to")
    new_rows = [format_row(n, format_default(accepted[n]), TODO_DESCRIPTION) for n in report.added]
    if new_rows:
        body[last_row:last_row] = new_rows
    return lines[: start + 1] + body + lines[end:], report


def sync(text: str, accepted: dict[str, dict[str, Any]]) -> tuple[str, list[str]]:
    """The whole doc brought up to date with `accepted` (section -> names and defaults), and a line per change."""
    lines = text.splitlines()
    messages: list[str] = []
    for section, names in accepted.items():
        lines, report = sync_section(lines, section, names)
        messages += report.lines(section)
    return "\n".join(lines) + "\n", messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if the doc is out of date")
    args = parser.parse_args(argv)

    accepted = {section: source() for section, source in SECTIONS.items()}
    text = DOC_PATH.read_text(encoding="utf-8")
    new_text, messages = sync(text, accepted)
    counts = ", ".join(f"{len(names)} {section}" for section, names in accepted.items())
    print(f"x-transformers {version('x-transformers')}: keyword arguments: {counts}")
    for message in messages:
        print(message)

    if args.check:
        if new_text == text:
            print(f"{DOC_PATH.name} is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(
            text.splitlines(keepends=True), new_text.splitlines(keepends=True),
            fromfile=f"{DOC_PATH.name} (now)", tofile=f"{DOC_PATH.name} (installed library)"))
        print(f"{DOC_PATH.name} is out of date: run python docs/generate_params.py")
        return 1

    if new_text == text:
        print(f"{DOC_PATH.name} already up to date")
    else:
        DOC_PATH.write_text(new_text, encoding="utf-8")
        print(f"rewrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
