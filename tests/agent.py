"""An agent process of the load tests: submits files through intake as fast as it can.

A module of its own so that the processes the tests spawn import only intake,
not the test modules (which pull in torch: seconds of start-up for each process).
"""

from __future__ import annotations

from pathlib import Path

from scheduler import intake
from scheduler.layout import Layout


def submit_many(root: str, agent: str, sources: list[str]) -> list[str]:
    """Submit each source in turn; returns the candidate ids."""
    layout = Layout.at(root)
    ids = []
    for i, source in enumerate(sources):
        path = Path(root) / f"src-{agent}-{i}.py"
        path.write_text(source)
        ids.append(intake.submit(layout, path, agent, f"variant {i}", "base-x"))
    return ids
