"""What launch and its parts tell the person watching: one line each on standard error, under one prefix."""

from __future__ import annotations

import sys

PREFIX = "[scheduler]"


def say(message: str) -> None:
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)
