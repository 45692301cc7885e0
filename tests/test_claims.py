"""What a training says of itself is checked against what the trusted side saw, and refused when it cannot be true."""

from __future__ import annotations

import json
import os

import pytest

from scheduler.claims import CLAIM_SLACK, check, peak_tflops, read_untrusted_json

HONEST = {"training_seconds": 300.2, "total_tokens": 343_000_000, "num_steps": 5_220, "tokens_per_second": 1_138_000,
          "peak_vram_mb": 15_900.0, "precision": "bf16"}
FIGURES = {"parameters": 47_600_000, "forward_flops_per_token": 107_400_000}  # the default model: 322M training
H200 = "NVIDIA H200"


def test_an_honest_run_passes_and_its_mfu_is_computed_here():
    fields, refusal = check(HONEST, FIGURES, window=301.0, gpu_name=H200)
    assert refusal is None
    assert fields["parameters"] == 47_600_000 and fields["tokens"] == 343_000_000 and fields["steps"] == 5_220
    assert fields["mfu_percent"] == pytest.approx(100 * 3 * 107.4e6 * 1_138_000 / 989e12, abs=0.01)


@pytest.mark.parametrize("claim,words", [
    ({"training_seconds": 1200.0}, "claim 1200.0 s of training, but the trial saw only 301.0 s"),
    ({"tokens_per_second": 9_000_000}, "do not add up"),
    ({"num_steps": 123_456_789_000}, "steps for"),
    ({"tokens_per_second": 4_000_000, "total_tokens": 10**12}, "% of the NVIDIA H200's peak"),
])
def test_claims_that_cannot_be_true_are_refused(claim, words):
    _, refusal = check({**HONEST, **claim}, FIGURES, window=301.0, gpu_name=H200)
    assert refusal and words in refusal, refusal


def test_the_window_allows_one_sync_of_slack():
    assert check({**HONEST, "training_seconds": 301.0 + CLAIM_SLACK}, FIGURES, 301.0, H200)[1] is None


def test_junk_claims_are_dropped_not_believed():
    junk = {"training_seconds": "a lot", "total_tokens": float("nan"), "num_steps": -5, "tokens_per_second": True,
            "peak_vram_mb": 1e400, "precision": "fp4-magic", "gpu_name": "NVIDIA B900", "num_params": 1}
    fields, refusal = check(junk, {}, window=None, gpu_name="cpu")
    assert refusal is None
    assert set(fields.values()) == {None}


def test_the_gpu_name_and_parameters_never_come_from_the_training():
    fields, _ = check({**HONEST, "gpu_name": "NVIDIA B900", "num_params": 1}, FIGURES, 301.0, H200)
    assert "gpu_name" not in fields and fields["parameters"] == FIGURES["parameters"]


def test_untrusted_json_is_read_only_from_a_small_regular_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": 1}))
    assert read_untrusted_json(good) == {"a": 1}
    link = tmp_path / "link.json"
    link.symlink_to(good)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # reading it would block the trial forever
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"a": "x" * 100_000}))
    not_an_object = tmp_path / "list.json"
    not_an_object.write_text("[1, 2]")
    for path in (link, fifo, big, not_an_object, tmp_path / "missing.json", tmp_path):
        assert read_untrusted_json(path) == {}, path


@pytest.mark.parametrize("name,tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce GTX 1080 Ti", None),
    ("Tesla V100-SXM2-16GB", None),
    ("Some Future GPU", None),
    ("cpu", None),
])
def test_peak_tflops(name, tflops):
    assert peak_tflops(name) == tflops
