"""Stop requests, as files under results/control/ so that `python -m scheduler stop` needs no Ray client.

    drain      finish the running trials, start no new ones (`stop`, first Ctrl-C)
    stop-now   stop the running trials too (`stop --now`, second Ctrl-C)
"""

from __future__ import annotations

from pathlib import Path

from scheduler.layout import Layout

DRAIN, STOP_NOW = "drain", "stop-now"


def request(layout: Layout, what: str) -> Path:
    layout.control.mkdir(parents=True, exist_ok=True)
    path = layout.control / what
    path.touch()
    if what == STOP_NOW:
        (layout.control / DRAIN).touch()
    return path


def clear(layout: Layout) -> None:
    for what in (DRAIN, STOP_NOW):
        (layout.control / what).unlink(missing_ok=True)


def drain_requested(layout: Layout) -> bool:
    return (layout.control / DRAIN).exists()
