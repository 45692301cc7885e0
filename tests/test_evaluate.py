"""The evaluation (scheduler/evaluate.py): every byte scored, in a secret order, with a causality check that a
pure function cannot dodge; its command line, result file and exit codes.

    python -m pytest tests/test_evaluate.py -q
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scheduler import evaluate, handover, protocol

CPU = torch.device("cpu")
W = protocol.WINDOW
B = protocol.EVAL_BATCH


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))


class Uniform(torch.nn.Module):
    """Zero logits: every byte gets probability 1/256, i.e. exactly 8 bits. Records the shapes it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return torch.zeros(*x.shape, evaluate.VOCAB)


class Successor(torch.nn.Module):
    """Confidently predicts byte (x + shift) % 256 after byte x."""

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 50.0 * torch.nn.functional.one_hot((x + self.shift) % 256, evaluate.VOCAB).float()


class Table(torch.nn.Module):
    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


class PeeksAhead(Table):
    """Sees the byte it predicts at positions p with p % every == 0."""

    def __init__(self, every: int = 1) -> None:
        super().__init__()
        self.every = every

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        future = torch.roll(x, shifts=-1, dims=1)
        peeks = (torch.arange(x.shape[1]) % self.every == 0)[None, :, None]
        return self.emb(x) + 10.0 * torch.nn.functional.one_hot(future, 256).float() * peeks


class ReadsOtherRows(Table):
    """Each row's logits also depend on the next row of the batch (causal within the row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) + 0.1 * self.emb(torch.roll(x, shifts=1, dims=0))


# ---------------------------------------------------------------------------- score


@pytest.mark.parametrize("n", [W + 1, W + 2, 3 * W + 1, 3 * W + 500, (B + 6) * W + 501])
def test_score_covers_every_byte_but_the_first(n):
    model = Uniform()
    scored = evaluate.score(model, random_bytes(n, n), CPU)
    assert scored.bytes_scored == n - 1
    assert scored.bpc == pytest.approx(8.0, abs=1e-5)  # float32 log(256) per position
    windows = -(-(n - 1) // W)
    batches = -(-windows // B)
    assert set(model.shapes) == {(B, W)}  # one shape for every forward: the last batch filled up
    assert len(model.shapes) == batches + min(batches, evaluate.CHECK_BATCHES)  # scoring + checking forwards
    assert scored.rows_checked == min(batches, evaluate.CHECK_BATCHES) * B and scored.largest_difference == 0


def test_score_targets_are_the_next_byte():
    """On a counting sequence, predicting x + 1 after x is right everywhere, including across windows
    and in the partial last window; predicting x itself is wrong everywhere."""
    data = torch.arange(5 * W + 300, dtype=torch.int64).remainder(256).to(torch.uint8)
    assert evaluate.score(Successor(1), data, CPU).bpc < 1e-6
    assert evaluate.score(Successor(0), data, CPU).bpc > 50


def test_the_order_is_secret_and_the_figure_does_not_depend_on_it():
    """Each evaluation feeds the windows in a fresh order; the score is the same to the last bit."""
    torch.manual_seed(0)
    model = Table()
    data = random_bytes((B + 3) * W + 77, 1)
    seen: list[torch.Tensor] = []
    recorder = lambda x: seen.append(x[:, :8].clone()) or model(x)  # noqa: E731 - the first bytes of each row
    first = evaluate.score(recorder, data, CPU)
    first_order = torch.cat(seen)
    seen.clear()
    second = evaluate.score(recorder, data, CPU)
    assert first.bpc == second.bpc
    assert not torch.equal(first_order, torch.cat(seen))  # 67 windows: the same order twice is out of question


def test_padding_rows_are_real_text():
    """The rows that fill up the last batch, and the end of the last window, are bytes of the split: no row of
    zeros tells the model that it is looking at the end."""
    data = (torch.arange(W + 10) % 200 + 50).to(torch.uint8)  # no zero byte anywhere
    fed: list[torch.Tensor] = []
    evaluate.score(lambda x: fed.append(x) or torch.zeros(*x.shape, 256), data, CPU)
    scoring_batch = fed[0]  # (the check's batch changes one byte per row to any value)
    assert bool((scoring_batch >= 50).all())


# ---------------------------------------------------------------------------- causality


@pytest.mark.parametrize("model", [PeeksAhead(1), PeeksAhead(5), ReadsOtherRows()])
def test_a_model_that_sees_later_bytes_or_other_rows_is_caught(model):
    data = random_bytes(20 * W, 2)
    scored = evaluate.score(model, data, CPU)
    assert scored.largest_difference > evaluate.CAUSAL_TOLERANCE, scored
    assert "position" in scored.where and "cut after" in scored.where


def test_a_causal_model_passes_exactly():
    torch.manual_seed(0)
    scored = evaluate.score(torch.nn.Sequential(torch.nn.Embedding(256, 64), torch.nn.Linear(64, 256)),
                            random_bytes(20 * W, 3), CPU)
    assert scored.largest_difference == 0.0


def test_the_check_changes_the_byte_after_every_cut():
    """A model that peeks only at positions where the next byte is one value is still caught: the byte after the
    cut always changes, so peeking at the cut always shows."""
    data = torch.full((20 * W,), 7, dtype=torch.uint8)  # every replacement from another window would be a 7 too
    scored = evaluate.score(PeeksAhead(1), data, CPU)
    assert scored.largest_difference > 1.0


# ---------------------------------------------------------------------------- the command


def hand_over(out: Path, model: torch.nn.Module) -> Path:
    handover.export_program(model, out, CPU)
    return out


def run_main(capsys, out: Path, result: Path, data_dir: Path, *extra: str) -> tuple[int, list[str]]:
    code = evaluate.main([str(out), "--result", str(result), "--data-dir", str(data_dir), "--device", "cpu", *extra])
    return code, capsys.readouterr().out.splitlines()


SUMMARY_KEYS = ("val_bpc", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "precision")


def test_a_good_program_is_scored(tmp_path, data_dir, capsys):
    out = hand_over(tmp_path / "out", Table())
    (out / protocol.STATS_FILE).write_text(json.dumps({"num_steps": 12, "precision": "fp32", "val_bpc": 0.001,
                                                       "depth": {"not": "a number"}, "training_seconds": 3.0}))
    result = tmp_path / "trial" / "result.json"
    result.parent.mkdir()
    code, lines = run_main(capsys, out, result, data_dir)
    assert code == 0, lines
    figures = json.loads(result.read_text())
    assert math.isfinite(figures["val_bpc"]) and figures["val_bpc"] > 1  # not the training's claim of 0.001
    assert figures["bytes_scored"] == (data_dir / "val.bin").stat().st_size - 1
    assert figures["parameters"] == 256 * 256 and figures["forward_flops_per_token"] == 0
    assert figures["causal_rows_checked"] == B and figures["causal_largest_difference"] == 0
    assert "num_steps" not in figures  # the training's claims are shown, never recorded as figures
    assert not (out / protocol.RESULT_FILE).exists()  # nothing written into the candidate's folder
    block = dict(line.split(":", 1) for line in lines[lines.index("---") + 1 :])
    assert list(block) == list(SUMMARY_KEYS)
    assert block["num_steps"].strip() == "12" and block["depth"].strip() == "n/a"
    assert float(block["val_bpc"]) == figures["val_bpc"]
    assert math.isfinite(figures["train_bpc"])
    assert lines[lines.index("---") - 1].startswith(f"train_bpc: {figures['train_bpc']:.6f} ")


def test_the_train_sample_is_windows_of_the_train_split_from_places_the_candidate_cannot_know(data_dir):
    """train_bpc anchors a control run's own loss curve: windows of the train split, drawn afresh each time."""
    train = (data_dir / "train.bin").read_bytes()
    count = evaluate.train_sample_windows((data_dir / "val.bin").stat().st_size)
    samples = [evaluate.load_train_sample(data_dir / "train.bin", CPU, count).numpy().tobytes() for _ in range(2)]
    size = count * protocol.WINDOW
    assert all(len(sample) == size for sample in samples) and samples[0] != samples[1]
    windows = [samples[0][i:i + protocol.WINDOW] for i in range(0, size, protocol.WINDOW)]
    assert all(window in train for window in windows) and len({train.index(w) for w in windows}) > 1
    assert evaluate.load_train_sample(data_dir / "missing.bin", CPU, count) is None


def test_the_train_sample_is_a_fifth_of_the_validation_split_and_never_small():
    """64 windows left a 300 s H200 run's anchor 11% off its training loss; enwik8's validation split (5 MB) gets
    976, a test corpus's few windows still 64."""
    assert evaluate.train_sample_windows(5_000_000) == 976
    assert evaluate.train_sample_windows(5 * 2**20) == 1024
    assert evaluate.train_sample_windows(10_000) == evaluate.MIN_TRAIN_SAMPLE_WINDOWS == 64


def test_the_train_sample_is_drawn_only_after_go(tmp_path, data_dir, capsys, monkeypatch):
    """The sandbox binds the very train.bin the evaluation samples, and the evaluation starts beside the training:
    a candidate that evicts the file from the page cache (posix_fadvise DONTNEED, read-only) and then asks which
    pages came back (mincore; preadv2 RWF_NOWAIT) learns where the sample lies (to within the readahead) if the
    evaluation reads it while the candidate runs. After "go" the training, and its sandbox, are gone."""
    events: list[str] = []
    draw = evaluate.load_train_sample
    monkeypatch.setattr(evaluate, "load_train_sample", lambda *a: events.append("drawn") or draw(*a))

    class Stdin:
        def __init__(self, line: str) -> None:
            self.line = line

        def readline(self) -> str:
            events.append("go" if self.line else "end of input")
            return self.line

    out = hand_over(tmp_path / "out", Table())
    monkeypatch.setattr(sys, "stdin", Stdin(""))  # training failed: nothing is drawn at all
    assert run_main(capsys, out, tmp_path / "none.json", data_dir, "--wait")[0] == 0 and events == ["end of input"]
    events.clear()
    monkeypatch.setattr(sys, "stdin", Stdin(protocol.GO + "\n"))
    code, lines = run_main(capsys, out, tmp_path / "result.json", data_dir, "--wait")
    assert code == 0 and events == ["go", "drawn"], lines
    assert math.isfinite(json.loads((tmp_path / "result.json").read_text())["train_bpc"])


def test_a_peeking_program_is_refused(tmp_path, data_dir, capsys):
    out = hand_over(tmp_path / "out", PeeksAhead(1))
    code, lines = run_main(capsys, out, tmp_path / "result.json", data_dir)
    assert code == protocol.EXIT_REFUSED
    assert lines[-1].startswith(protocol.REFUSED_TAG + "not causal") and "must not see the bytes" in lines[-1]
    assert not (tmp_path / "result.json").exists()


class PeeksOnTrainText(Table):
    """Causal on text it does not know; sees the byte it predicts once its row holds a byte only the train split
    has (a real cheat would recognise memorised n-grams of the train split): a train_bpc near 0, which lets any
    loss curve pass the early-stop anchor, and a validation score no check can fault."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        known = ((x == 0).float().cumsum(1) > 0).float()[:, :, None]
        return self.emb(x) + 50.0 * torch.nn.functional.one_hot(torch.roll(x, shifts=-1, dims=1), 256).float() * known


def test_a_program_that_peeks_only_on_train_text_is_refused(tmp_path, capsys):
    """The train sample is one more forward of the candidate's model: unchecked, the one batch a model could tell
    from the validation split's by its text."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    rng.integers(0, 256, 64 * W, dtype=np.uint8).tofile(data / "train.bin")
    rng.integers(1, 256, 2 * W, dtype=np.uint8).tofile(data / "val.bin")  # no byte 0: the model stays causal
    out = hand_over(tmp_path / "out", PeeksOnTrainText())
    code, lines = run_main(capsys, out, tmp_path / "result.json", data)
    assert code == protocol.EXIT_REFUSED, lines
    assert lines[-1].startswith(protocol.REFUSED_TAG + "not causal") and "train split" in lines[-1]
    assert not (tmp_path / "result.json").exists()


def test_wrong_output_shape_fails(tmp_path, data_dir, capsys):
    out = hand_over(tmp_path / "out", Table(dim=128))
    code, lines = run_main(capsys, out, tmp_path / "result.json", data_dir)
    assert code == 1
    assert lines[-1].startswith(protocol.FAIL_TAG)
    assert f"({B}, {W}, 128)" in lines[-1] and f"({B}, {W}, 256)" in lines[-1]
    assert not (tmp_path / "result.json").exists()


def test_non_finite_logits_fail(tmp_path, data_dir, capsys):
    model = Table()
    torch.nn.init.constant_(model.emb.weight, float("nan"))
    out = hand_over(tmp_path / "out", model)
    code, lines = run_main(capsys, out, tmp_path / "result.json", data_dir)
    assert code == 1 and lines[-1].startswith(protocol.FAIL_TAG) and "non-finite" in lines[-1]


def test_a_missing_hand_over_is_refused(tmp_path, data_dir, capsys):
    (tmp_path / "out").mkdir()
    code, lines = run_main(capsys, tmp_path / "out", tmp_path / "result.json", data_dir)
    assert code == protocol.EXIT_REFUSED and "program.json is missing" in lines[-1]


def test_without_the_split_it_says_how_to_fix(tmp_path, capsys):
    out = hand_over(tmp_path / "out", Table())
    code, lines = run_main(capsys, out, tmp_path / "result.json", tmp_path / "no-data")
    assert code == 1
    assert lines[-1].startswith(protocol.FAIL_TAG + "no val split at") and "scheduler prepare" in lines[-1]


def test_a_failed_test_split_leaves_the_validation_score(tmp_path, data_dir, capsys):
    """A new baseline's control run scores val, then test, in one process; a test split that fails leaves the
    validation score standing (here the folder has no test split)."""
    no_test = tmp_path / "no_test"
    no_test.mkdir()
    (no_test / "val.bin").write_bytes((data_dir / "val.bin").read_bytes())
    out = hand_over(tmp_path / "out", Table())
    code, lines = run_main(capsys, out, tmp_path / "result.json", no_test, "--split", "val", "test")
    assert code == 1 and lines[-1].startswith(f"{protocol.FAIL_TAG}no test split at"), lines
    figures = json.loads((tmp_path / "result.json").read_text())
    assert "val_bpc" in figures and "test_bpc" not in figures
    code, lines = run_main(capsys, out, tmp_path / "both.json", data_dir, "--split", "val", "test")
    both = json.loads((tmp_path / "both.json").read_text())
    assert code == 0 and both["val_bpc"] == figures["val_bpc"] and both["test_bpc"] > 0
    assert both["causal_rows_checked"] == 2 * B


def test_claims_are_read_safely(tmp_path):
    """STATS_FILE is the candidate's: numbers and short printable strings of known keys, nothing else."""
    out = tmp_path / "out"
    out.mkdir()
    stats = out / protocol.STATS_FILE
    stats.write_text(json.dumps({"num_steps": 5, "precision": "x" * 100, "depth": "8\n---\nval_bpc: 0.0",
                                 "mfu_percent": True, "peak_vram_mb": 1e999, "unknown": 1}))
    assert evaluate.read_claims(out) == {"num_steps": 5}
    stats.write_text("[" * 100_000)
    assert evaluate.read_claims(out) == {}
    stats.unlink()
    stats.symlink_to("/etc/hostname")
    assert evaluate.read_claims(out) == {}


@pytest.mark.slow
@pytest.mark.parametrize("go", [True, False])
def test_a_waiting_evaluation_reads_the_hand_over_only_after_go(tmp_path, data_dir, go):
    """--wait (started beside training) loads its libraries and the split, then waits: the hand-over is
    written at the end of training, and only what is there after "go" is scored."""
    out = tmp_path / "out"
    out.mkdir()
    result = tmp_path / "result.json"
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.evaluate", str(out), "--result", str(result),
                             "--data-dir", str(data_dir), "--device", "cpu", "--wait"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(3)
    assert proc.poll() is None
    hand_over(out, Table())  # training ends: the hand-over appears
    output, _ = proc.communicate(protocol.GO + "\n" if go else "", timeout=120)
    assert proc.returncode == 0, output
    assert result.exists() == go
