"""Where one training step of train.py spends its time, and where its first compiled step spends its time.

    python bench/profile_step.py                          # the default train.py, on a GPU
    python bench/profile_step.py MODEL_DIM=1024 MODEL_HEADS=8 --steps 30
    python bench/profile_step.py MODEL_DIM=512 MODEL_DEPTH=6 MODEL_HEADS=8 BATCH_SIZE=4 GRADIENT_ACCUMULATE_EVERY=4
    python bench/profile_step.py --eager                  # parts launched from Python, as without CUDA graphs
    python bench/profile_step.py --kernels 25             # also the 25 GPU kernels that take longest in a step

Builds the model and optimizer with train.py's own functions (constants
overridden as given) and compiles the loss as train.py does. Then times the
parts of a step (forward and backward of every micro-batch, clipping, the
optimizer step, zero_grad) each on its own, waiting for the GPU after each, so
the parts add up to a step with no overlap. By default each part is captured
as a CUDA graph and replayed, as train.py replays its whole step: the times are
the GPU's, without Python's launches (`--eager` keeps those). The whole step as
one graph is timed too. Random bytes stand in for data: speed does not depend
on them. Also prints the phases of the first compilation that took 0.5 s or
more (torch's own counters): Dynamo's tracing, AOT autograd, Inductor.
`--kernels N` lists the kernels a step spends its GPU time in (torch's profiler
over eagerly launched steps: a graph's replay hides its kernels from it).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 5  # steps run before timing: compilation, and the optimizer's state
SHOWN_PHASE_SECONDS = 0.5  # compile phases shorter than this are not printed


def load_train(overrides: dict) -> object:
    spec = importlib.util.spec_from_file_location("train_under_profile", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks up the globals of its functions by module name
    spec.loader.exec_module(module)
    for key, value in overrides.items():
        if not hasattr(module, key):
            raise SystemExit(f"train.py has no constant {key}; see the Hyperparameters section of train.py")
        setattr(module, key, value)
    return module


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """`fn` captured as a CUDA graph (after it has run on the side stream, as capture requires); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def milliseconds(fn: Callable[[], object], steps: int) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started) / steps


def compile_phases() -> list[tuple[str, float]]:
    """torch's aggregated compile-time counters (name, seconds), longest first."""
    from torch._dynamo.utils import compile_times

    names, seconds = compile_times(repr="csv", aggregate=True)  # "str" is laid out by tabulate when installed
    return sorted(zip(names, map(float, seconds)), key=lambda phase: -phase[1])


def kernel_table(step: Callable[[], None], steps: int, rows: int) -> str:
    """The `rows` GPU kernels with the most time in `step`, as a table: ms per step, calls per step, share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in profiler.key_averages() if e.device_type == DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in kernels)
    lines = [f"{len(kernels)} distinct kernels, {total / steps / 1e3:.2f} ms of GPU time a step\n",
             "| kernel | ms per step | calls per step | share |", "| --- | --- | --- | --- |"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:rows]:
        lines.append(f"| {e.key[:100]} | {e.self_device_time_total / steps / 1e3:.3f} | {e.count / steps:g} "
                     f"| {e.self_device_time_total / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("constants", nargs="*", help="K=V overrides of train.py's constants")
    parser.add_argument("--steps", type=int, default=20, help="timed repetitions of each part")
    parser.add_argument("--eager", action="store_true", help="launch each part from Python instead of a CUDA graph")
    parser.add_argument("--kernels", type=int, default=0, metavar="N", help="list the N kernels that take longest")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA GPU")
    overrides = {k: ast.literal_eval(v) for k, v in (c.split("=", 1) for c in args.constants)}
    train = load_train(overrides)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    with device:
        model = train.build_model()
    optimizer = train.build_optimizer(model)
    batch_size, seq_len, vocab = train.BATCH_SIZE, train.MAX_SEQ_LEN, train.VOCAB_SIZE
    micro_batches = train.GRADIENT_ACCUMULATE_EVERY

    train.trace_einops_whole()

    loss_of = torch.compile(lambda batch: train.next_byte_loss(model, batch), options=train.INDUCTOR_OPTIONS)

    def forward_backward() -> None:
        for _ in range(micro_batches):
            batch = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_of(batch) / micro_batches
            loss.backward()

    # zero_grad keeps the gradient tensors (set_to_none=False): the graphs of the other parts read and write them
    parts = {f"forward+backward x{micro_batches}": forward_backward,
             "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), train.GRAD_CLIP),
             "optimizer.step": optimizer.step,
             "zero_grad": lambda: optimizer.zero_grad(set_to_none=False)}

    def whole_step() -> None:
        for fn in parts.values():
            fn()

    model.train()
    started = time.perf_counter()
    whole_step()
    torch.cuda.synchronize()
    first_step = time.perf_counter() - started
    phases = compile_phases()
    for _ in range(WARMUP_STEPS):
        whole_step()
    runnable = parts if args.eager else {name: graphed(fn) for name, fn in parts.items()}
    times = {name: milliseconds(fn, args.steps) for name, fn in runnable.items()}
    step_ms = milliseconds(whole_step if args.eager else graphed(whole_step), args.steps)

    tokens = batch_size * seq_len * micro_batches
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch {batch_size}x{seq_len}"
          f"x{micro_batches}, {torch.cuda.get_device_name()}, {'eager launches' if args.eager else 'CUDA graphs'}; "
          f"{args.steps} repetitions\n")
    print("| part | ms per step | share |\n| --- | --- | --- |")
    for name, ms in times.items():
        print(f"| {name} | {ms:.2f} | {ms / sum(times.values()):.0%} |")
    print(f"\nparts one after another: {sum(times.values()):.2f} ms; the whole step as one "
          f"{'sequence of launches' if args.eager else 'graph'}: {step_ms:.2f} ms = {tokens / step_ms * 1e3:,.0f} tokens/s")
    print(f"\nfirst step {first_step:.1f} s; compile phases of {SHOWN_PHASE_SECONDS} s or more (they nest):")
    for name, seconds in phases:
        if seconds >= SHOWN_PHASE_SECONDS:
            print(f"  {seconds:6.1f} s  {name}")
    if args.kernels:
        print("\n" + kernel_table(whole_step, args.steps, args.kernels))


if __name__ == "__main__":
    main()
