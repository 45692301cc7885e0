"""scheduler.constants.override: a train.py variant by its module-level constants."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from scheduler.constants import override

SOURCE = textwrap.dedent("""\
    MODEL_DIM = 768           # hidden width
    LEARNING_RATE = 2e-3      # AdamAtan2 part
    MUON_LEARNING_RATE = 2e-3 # Muon part
    NAME = "base"
    USE_FP8 = False


    def f():
        MODEL_DIM = 1
        return MODEL_DIM
""")


def test_override_changes_values_and_keeps_comments():
    new = override(SOURCE, MODEL_DIM=32, LEARNING_RATE=0.01, NAME="x y", USE_FP8=True)
    lines = new.splitlines()
    assert lines[0] == "MODEL_DIM = 32           # hidden width"
    assert lines[1] == "LEARNING_RATE = 0.01      # AdamAtan2 part"
    assert lines[2] == "MUON_LEARNING_RATE = 2e-3 # Muon part"  # a name that ends like another is untouched
    assert lines[3] == "NAME = 'x y'" and lines[4] == "USE_FP8 = True"
    assert "    MODEL_DIM = 1" in lines  # not module level
    namespace: dict = {}
    exec(new, namespace)
    assert (namespace["MODEL_DIM"], namespace["LEARNING_RATE"], namespace["f"]()) == (32, 0.01, 1)


def test_override_unknown_name_is_an_error():
    with pytest.raises(KeyError, match="MODEL_WIDTH"):
        override(SOURCE, MODEL_WIDTH=32)
    with pytest.raises(KeyError):
        override(SOURCE, DIM=32)  # a suffix of MODEL_DIM is not MODEL_DIM


def test_override_of_the_real_train_py(tiny_train_source):
    real = (Path(__file__).resolve().parents[1] / "train.py").read_text()
    assert override(real) == real
    assert "MODEL_DIM = 32           # hidden width" in tiny_train_source
    assert "MAX_SEQ_LEN = 256        # context length in bytes" in tiny_train_source
