"""Shared fixtures: a small prepared corpus and a tiny variant of train.py that trains on the CPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scheduler.constants import override
from scheduler.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
CORPUS_BYTES = 200_000  # splits 180_000 / 10_000 / 10_000: the val split ends in a partial window


def make_corpus(n: int, seed: int = 0) -> bytes:
    """Random but compressible text: sentences of words drawn from a small vocabulary, with markup."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvk"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf-like, as in real text
    parts: list[str] = []
    size = 0
    while size < n:
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 14)))
        line = f"<p>{sentence.capitalize()}.</p>\n" if rng.random() < 0.2 else sentence.capitalize() + ". "
        parts.append(line)
        size += len(line)
    return "".join(parts).encode()[:n]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data folder (train.bin, val.bin, test.bin, meta.json) of a ~200 KB generated corpus."""
    root = tmp_path_factory.mktemp("corpus")
    source = root / "corpus.txt"
    source.write_bytes(make_corpus(CORPUS_BYTES))
    data = root / "data"
    meta = prepare(data, source=source)
    assert meta["corpus"] == "custom" and meta["size"] == CORPUS_BYTES
    return data


@pytest.fixture(scope="session")
def tiny_train_source() -> str:
    """train.py with a model small enough to take a few dozen steps a second on a CPU.

    MAX_SEQ_LEN is shorter than the evaluation's 1024-byte windows: the model has
    rotary positions and no absolute position embedding, so it is length-agnostic
    (the end-to-end tests check that such weights are scored on 1024-byte windows).
    """
    return override(
        (ROOT / "train.py").read_text(),
        MODEL_DIM=32, MODEL_DEPTH=2, MODEL_HEADS=2, BATCH_SIZE=4, MAX_SEQ_LEN=256,
    )


@pytest.fixture
def tiny_train(tmp_path, tiny_train_source) -> Path:
    """The tiny variant written as tmp_path/train.py."""
    path = tmp_path / "train.py"
    path.write_text(tiny_train_source)
    return path

