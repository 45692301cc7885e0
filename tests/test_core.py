"""The experiment's core on the CPU: harness (data, clock, hand-over), training then evaluation, constants.

    python -m pytest tests/test_core.py -q

End-to-end tests train a tiny variant of train.py for a couple of seconds in a
subprocess, exactly as `python train.py` or a scheduler trial runs it. The
evaluation's own tests are in test_evaluate.py, the hand-over's in test_handover.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from scheduler import harness, protocol
from scheduler.constants import override

SUMMARY_KEYS = (
    "val_bpc", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent",
    "total_tokens_M", "num_steps", "num_params_M", "depth", "precision",
)


# ---------------------------------------------------------------------------- helpers


def clean_env(**values: object) -> dict[str, str]:
    """os.environ without any SCHEDULER_* variable, plus `values`.

    One thread per process: on a busy machine (tests run beside other work) several
    spinning OpenMP threads can make a step of the tiny model take seconds instead of ~30 ms.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in values.items()})
    return env


def run_python(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """`python ARGS` in cwd, stdout and stderr together as text."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def summary_block(output: str) -> list[tuple[str, str]]:
    """The (key, value) lines after the last `---` line of the output."""
    lines = output.splitlines()
    start = len(lines) - 1 - lines[::-1].index("---")
    pairs = []
    for line in lines[start + 1 :]:
        key, _, value = line.partition(":")
        pairs.append((key, value.strip()))
    return pairs


@pytest.fixture
def harness_env(monkeypatch, tmp_path):
    """An in-process harness environment: no SCHEDULER_* from outside, CPU, a trial (no hand-over to evaluation)."""
    for name in list(os.environ):
        if name.startswith("SCHEDULER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SCHEDULER_DEVICE", "cpu")
    monkeypatch.setenv("SCHEDULER_TRIAL", "1")
    monkeypatch.setenv("SCHEDULER_OUT", str(tmp_path / "out"))
    return monkeypatch


def train_only_folder(tmp_path: Path, data_dir: Path) -> Path:
    """A folder that holds the train split and nothing else."""
    folder = tmp_path / "train_only"
    folder.mkdir()
    (folder / "train.bin").write_bytes((data_dir / "train.bin").read_bytes())
    return folder


# ---------------------------------------------------------------------------- 1, 2: end to end


@pytest.mark.slow
def test_train_py_trains_and_is_scored(tmp_path, tiny_train, data_dir):
    """`python train.py` outside the scheduler: trains for the budget, then hands over to the evaluation."""
    out = tmp_path / "out"
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=out,
                    SCHEDULER_BUDGET=2, SCHEDULER_DEVICE="cpu")
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 0, proc.stdout

    block = summary_block(proc.stdout)
    assert [key for key, _ in block] == list(SUMMARY_KEYS), proc.stdout
    printed = dict(block)
    assert printed["precision"] == "fp32" and printed["depth"] == "2"
    assert printed["total_seconds"] != "n/a"  # the hand-over passes the run's start

    result = json.loads((out / protocol.RESULT_FILE).read_text())  # a standalone run's figures: in out/
    stats = json.loads((out / protocol.STATS_FILE).read_text())
    assert math.isfinite(result["val_bpc"]) and result["val_bpc"] > 0
    if stats["num_steps"] >= 20:  # ~60 on an idle 2-core machine; an untrained model scores ~8.1
        assert result["val_bpc"] < 8.0, proc.stdout
    assert float(printed["val_bpc"]) == pytest.approx(result["val_bpc"], abs=1e-6)
    assert stats["precision"] == "fp32" and stats["depth"] == 2
    assert stats["training_seconds"] >= 2.0
    assert stats["num_steps"] > harness.WARMUP_STEPS
    assert stats["total_tokens"] == stats["num_steps"] * 4 * 256
    assert stats["check_seconds"] > 0 and stats["export_seconds"] > 0
    assert result["bytes_scored"] == (data_dir / "val.bin").stat().st_size - 1
    assert result["parameters"] == stats["num_params"] + 16  # the weights add the rotary frequencies (a buffer)
    assert result["total_seconds"] >= stats["training_seconds"]
    assert (out / protocol.PROGRAM_FILE).is_file() and (out / protocol.WEIGHTS_FILE).is_file()


def processes_mentioning(text: str) -> list[str]:
    """Command lines of running processes that contain `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if text in cmdline and entry.name != str(os.getpid()):
            found.append(cmdline)
    return found


PEEKING_BUILD = '''
class Peeks(torch.nn.Module):
    """The model plus a confident guess of the byte it predicts, read from the input itself."""

    def __init__(self):
        super().__init__()
        self.inner = _build()

    def forward(self, x):
        return self.inner(x) + 20.0 * F.one_hot(torch.roll(x, -1, dims=1), 256).to(torch.float32)

    def muon_parameters(self):
        return self.inner.muon_parameters()


_build = build_model
build_model = Peeks

if __name__ == "__main__":
    main()'''


@pytest.mark.slow
def test_standalone_run_exits_with_the_evaluations_code(tmp_path, tiny_train, data_dir):
    """`python train.py` hands over to the evaluation it started beside training; when the evaluation refuses
    the model (here: it reads the byte it predicts), the run's exit code says so."""
    tiny_train.write_text(tiny_train.read_text().replace('if __name__ == "__main__":\n    main()', PEEKING_BUILD))
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=tmp_path / "out",
                    SCHEDULER_BUDGET=1, SCHEDULER_DEVICE="cpu")
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == protocol.EXIT_REFUSED, proc.stdout
    assert f"{protocol.REFUSED_TAG}not causal" in proc.stdout
    assert (tmp_path / "out" / protocol.PROGRAM_FILE).is_file()
    assert not (tmp_path / "out" / protocol.RESULT_FILE).exists()


@pytest.mark.slow
def test_standalone_run_that_crashes_leaves_no_evaluation_behind(tmp_path, tiny_train, data_dir):
    """Training that fails before finish(): the waiting evaluation sees its input close and exits."""
    tiny_train.write_text(tiny_train.read_text().replace("    run = harness.Run()\n",
                                                         "    run = harness.Run()\n    raise SystemExit(7)\n"))
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=tmp_path / "out",
                    SCHEDULER_BUDGET=1, SCHEDULER_DEVICE="cpu")
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 7, proc.stdout
    deadline = time.time() + 30
    while processes_mentioning(str(tmp_path / "out")) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning(str(tmp_path / "out"))


@pytest.mark.slow
def test_trial_saves_only_and_evaluation_is_deterministic(tmp_path, tiny_train, data_dir):
    """Under the scheduler (SCHEDULER_TRIAL) training only hands over, from a folder holding nothing but
    the train split; the evaluation, a separate process, gives the same figure every time (each in its own
    secret window order)."""
    out = tmp_path / "out"
    env = clean_env(SCHEDULER_TRAIN_DATA=train_only_folder(tmp_path, data_dir) / "train.bin",
                    SCHEDULER_OUT=out, SCHEDULER_BUDGET=1, SCHEDULER_DEVICE="cpu", SCHEDULER_TRIAL=1)
    proc = run_python(["train.py"], cwd=tmp_path, env=env, timeout=90)
    assert proc.returncode == 0, proc.stdout
    assert "val_bpc" not in proc.stdout and "---" not in proc.stdout.splitlines()
    assert sorted(p.name for p in out.iterdir()) == sorted([protocol.PROGRAM_FILE, protocol.WEIGHTS_FILE,
                                                            protocol.STATS_FILE])
    stats = json.loads((out / protocol.STATS_FILE).read_text())
    assert stats["precision"] == "fp32" and stats["training_seconds"] >= 1.0

    scores = []
    tiny_train.unlink()  # the evaluation never needs the candidate's file
    for i in range(2):
        result_file = tmp_path / f"result{i}.json"
        proc = run_python(protocol.evaluation_command(out, result_file, data_dir, "cpu")[1:], cwd=tmp_path,
                          env=clean_env(), timeout=120)
        assert proc.returncode == 0, proc.stdout
        block = dict(summary_block(proc.stdout))
        assert list(block) == list(SUMMARY_KEYS)
        assert block["num_steps"] == str(stats["num_steps"])  # the training's claims are shown
        result = json.loads(result_file.read_text())
        assert "num_steps" not in result  # and not recorded as figures
        scores.append(result["val_bpc"])
    assert math.isfinite(scores[0]) and scores[0] > 0
    assert scores[0] == scores[1]  # CPU: bit-identical, whatever order the windows went in


# ---------------------------------------------------------------------------- 5: NaN

NAN_SCRIPT = """
import torch
from scheduler import harness

run = harness.Run()
while not run.done():
    bad = run.steps >= {bad_from}
    run.step(torch.tensor(float("{value}") if bad else 1.0), tokens=1)
run.finish(torch.nn.Linear(1, 1))
"""


@pytest.mark.slow
@pytest.mark.parametrize("value,bad_from", [("nan", 0), ("inf", 20)])
def test_non_finite_loss_exits_with_exit_nan(tmp_path, data_dir, value, bad_from):
    """From the first step (checked at once) or after the warmup (checked within SYNC_EVERY);
    the default 300 s budget is far from spent."""
    (tmp_path / "cand.py").write_text(NAN_SCRIPT.format(value=value, bad_from=bad_from))
    env = clean_env(SCHEDULER_TRAIN_DATA=data_dir / "train.bin", SCHEDULER_OUT=tmp_path / "out",
                    SCHEDULER_DEVICE="cpu")
    started = time.monotonic()
    proc = run_python(["cand.py"], cwd=tmp_path, env=env, timeout=30)
    assert proc.returncode == protocol.EXIT_NAN, proc.stdout
    assert time.monotonic() - started < 15
    assert f"loss is {value}" in proc.stdout
    assert not (tmp_path / "out" / protocol.PROGRAM_FILE).exists()


def test_nan_in_a_loop_that_never_asks_done(harness_env, data_dir):
    """A loop of run.step() calls without run.done() still has its loss checked (no TypeError)."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    run = harness.Run()
    with pytest.raises(SystemExit) as exit_info:
        for _ in range(10):
            run.step(torch.tensor(float("nan")), tokens=1)
    assert exit_info.value.code == protocol.EXIT_NAN


# ---------------------------------------------------------------------------- 6: train split only


def test_run_reads_only_the_train_split(harness_env, tmp_path, data_dir):
    folder = train_only_folder(tmp_path, data_dir)
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(folder / "train.bin"))
    read = []
    real_fromfile = np.fromfile
    harness_env.setattr(harness.np, "fromfile", lambda path, *a, **k: read.append(Path(path)) or real_fromfile(path, *a, **k))

    run = harness.Run()
    assert read == [folder / "train.bin"]
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint8)
    assert run.train.numel() == train.size and run.train.device.type == "cpu"

    batch = run.batch(8, 64)
    assert batch.shape == (8, 65) and batch.dtype == torch.long
    haystack = train.tobytes()
    for row in batch:  # each row is a contiguous window of the train split
        assert bytes(row.to(torch.uint8).tolist()) in haystack


def test_run_without_train_split_says_how_to_fix(harness_env, tmp_path):
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(tmp_path / "nowhere" / "train.bin"))
    with pytest.raises(SystemExit) as exit_info:
        harness.Run()
    assert "prepare" in str(exit_info.value.code)


def test_batches_follow_the_seed(harness_env, data_dir):
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    harness_env.setenv("SCHEDULER_SEED", "7")
    a, b = harness.Run().batch(4, 32), harness.Run().batch(4, 32)
    harness_env.setenv("SCHEDULER_SEED", "8")
    c = harness.Run().batch(4, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------- 6b: the hand-over


class DataDependent(torch.nn.Module):
    """Branches on the data: torch.export cannot trace one graph for every input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) if x.sum() > 0 else -self.emb(x)


class Noisy(DataDependent):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) + torch.randn(x.shape[0], x.shape[1], 256)


@pytest.mark.parametrize("model,reason", [(DataDependent(), "data-dependent"), (Noisy(), "aten.randn.default")])
def test_watch_fails_fast_for_a_model_that_cannot_be_handed_over(harness_env, data_dir, capsys, model, reason):
    """Right after build_model(), not after training: one EXPORT_FAILED line with the exporter's reason."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    run = harness.Run()
    with pytest.raises(SystemExit) as exit_info:
        run.watch(model, seq_len=64)
    assert exit_info.value.code == protocol.EXIT_EXPORT
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(protocol.EXPORT_TAG)]
    assert len(lines) == 1 and reason.lower() in lines[0].lower(), lines


def test_finish_hands_the_model_over_as_data(harness_env, tmp_path, data_dir):
    """finish(): the graph and the weights (no pickle anywhere), the statistics with the export's seconds."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    run = harness.Run()
    model = torch.nn.Sequential(torch.nn.Embedding(256, 32), torch.nn.Linear(32, 256))
    run.watch(model, seq_len=64)
    run.step(torch.tensor(1.0), tokens=64)
    run.finish(model, precision="fp32")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([protocol.PROGRAM_FILE, protocol.WEIGHTS_FILE,
                                                            protocol.STATS_FILE])
    stats = json.loads((out / protocol.STATS_FILE).read_text())
    assert stats["check_seconds"] > 0 and stats["export_seconds"] > 0 and stats["num_params"] == 256 * 32 * 2 + 256
    program = json.loads((out / protocol.PROGRAM_FILE).read_text())
    assert [node["op"] for node in program["nodes"]] == ["aten.embedding.default", "aten.linear.default"]
    assert sorted(program["weights"]) == ["0.weight", "1.bias", "1.weight"]


# ---------------------------------------------------------------------------- 7: peak TFLOP/s


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
    ("cpu", None),
])
def test_peak_tflops(name, tflops):
    assert harness.peak_tflops(name) == tflops


# ---------------------------------------------------------------------------- 8: the budget clock


@pytest.mark.slow
def test_budget_counts_training_time_only(harness_env, tmp_path, data_dir):
    """First steps that take 0.3 s each (a "compilation") are warmup; the loop stops after ~1 s counted."""
    harness_env.setenv("SCHEDULER_TRAIN_DATA", str(data_dir / "train.bin"))
    harness_env.setenv("SCHEDULER_BUDGET", "1")
    run = harness.Run()
    model = torch.nn.Embedding(256, 256)  # LongTensor[B, T] -> logits[B, T, 256]: a model that can be handed over
    progress = []
    started = time.perf_counter()
    while not run.done():
        time.sleep(0.3 if run.steps < harness.WARMUP_STEPS else 0.002)
        progress.append(run.progress)
        run.step(torch.tensor(1.0), tokens=10)
    wall = time.perf_counter() - started
    run.finish(model, precision="fp32")

    stats = json.loads((tmp_path / "out" / protocol.STATS_FILE).read_text())
    assert 1.0 <= stats["training_seconds"] <= 1.5
    assert stats["warmup_seconds"] >= 0.85  # three 0.3 s steps, not counted
    assert wall >= stats["training_seconds"] + stats["warmup_seconds"] - 0.01
    assert stats["num_steps"] > harness.WARMUP_STEPS + 100
    assert stats["total_tokens"] == 10 * stats["num_steps"]
    assert stats["budget"] == 1.0 and stats["precision"] == "fp32" and stats["gpu_name"] == "cpu"
    assert progress[: harness.WARMUP_STEPS] == [0.0] * harness.WARMUP_STEPS
    assert progress == sorted(progress) and 0.5 < progress[-1] <= 1.0
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / protocol.WEIGHTS_FILE)
    assert torch.equal(saved["weight"], model.weight.detach()) and list(saved) == ["weight"]
    assert model.training  # the export traced it in eval mode and put it back


# ---------------------------------------------------------------------------- 9: constants.override

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


def test_attention_backward_counts_twice_the_forward():
    """MFU's FLOPs: a fused attention backward counts twice its forward, whatever kernel recomputes inside."""
    from torch.utils.flop_counter import sdpa_flop_count

    q, k, v = (2, 6, 1024, 64), (2, 6, 1024, 64), (2, 6, 1024, 32)
    assert harness.attention_backward_flops(q, q, k, v) == 2 * sdpa_flop_count(q, k, v)


def load_train_module():
    """The repository's train.py as a fresh module (its constants can be changed without touching others)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_module", Path(__file__).resolve().parents[1] / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    return train


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("lr_scale", [1.0, 0.25])
def test_batched_optimizer_matches_the_library(weight_decay, lr_scale):
    """train.py's BatchedMuonAdamAtan2 takes the same steps as adam_atan2_pytorch's MuonAdamAtan2."""
    import copy

    from adam_atan2_pytorch import MuonAdamAtan2

    train = load_train_module()
    train.MODEL_DIM, train.MODEL_DEPTH, train.MODEL_HEADS, train.DROPOUT = 64, 2, 2, 0.0  # no random masks
    train.NEWTON_SCHULZ_DTYPE = torch.float32  # the library's precision
    torch.manual_seed(0)
    library_model = train.build_model()
    batched_model = copy.deepcopy(library_model)
    initial = copy.deepcopy(library_model)
    settings = dict(lr=2e-3, muon_lr=3e-3, weight_decay=weight_decay)
    library = MuonAdamAtan2(muon_params=library_model.muon_parameters(), params=library_model.parameters(),
                            **settings)
    for group in library.param_groups:  # what the batched optimizer's lr_scale does to every group
        group["lr"] *= lr_scale
    batched = train.BatchedMuonAdamAtan2(muon_params=batched_model.muon_parameters(),
                                         params=batched_model.parameters(), **settings)
    batched.lr_scale.fill_(lr_scale)
    pairs = [(library_model, library), (batched_model, batched)]
    for _ in range(4):
        batch = torch.randint(0, 256, (2, 33))
        for model, optimizer in pairs:
            logits = model(batch[:, :-1])
            torch.nn.functional.cross_entropy(logits.view(-1, 256), batch[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad()
    moved = max((p - q).abs().max().item() for p, q in zip(library_model.parameters(), initial.parameters()))
    assert moved > 1e-3  # the steps did something, so agreeing means something
    for p, q in zip(library_model.parameters(), batched_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert batched.steps.item() == 4


def test_batched_optimizer_refuses_options_it_does_not_implement():
    train = load_train_module()
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="use adam_atan2_pytorch.MuonAdamAtan2 with CUDA_GRAPHS = False"):
        train.BatchedMuonAdamAtan2(muon_params=[model.weight], params=model.parameters(), cautious_factor=0.5)


@pytest.mark.slow
def test_einops_calls_enter_the_compiled_graph_whole():
    """train.trace_einops_whole keeps Dynamo out of einops' pattern parsing; the compiled model computes the same."""
    import einops

    train = load_train_module()
    train.MODEL_DIM, train.MODEL_DEPTH, train.MODEL_HEADS = 32, 1, 2
    model = train.build_model().eval()
    batch = torch.randint(0, 256, (2, 16))
    called = []

    def capture(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        called.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    train.trace_einops_whole()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, backend=capture)(batch)
        torch.testing.assert_close(compiled, model(batch))
    assert einops.rearrange in called
