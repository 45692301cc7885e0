"""Make a variant of a train.py by changing its module-level UPPER_CASE constants.

    from scheduler.constants import override
    variant = override(Path("train.py").read_text(), MODEL_DIM=1024, LEARNING_RATE=3e-3)

Benchmarks, tests and agents use it to vary hyperparameters without editing by hand.
"""

from __future__ import annotations

import re


def override(source: str, **values: object) -> str:
    """Return `source` with each `NAME = ...` line at module level set to `repr(value)`.

    The comment after the value is kept. A name that the source does not define
    is an error, so that a typo cannot silently leave the default in place.
    """
    for name, value in values.items():
        pattern = re.compile(rf"^({re.escape(name)}\s*=\s*)([^#\n]*?)(\s*#.*)?$", re.MULTILINE)
        source, count = pattern.subn(lambda m: f"{m.group(1)}{value!r}{m.group(3) or ''}", source, count=1)
        if count == 0:
            raise KeyError(f"{name} is not a module-level constant of this train.py")
    return source
