"""Where one training step of train.py spends its time: forward+backward, gradient clipping, optimizer.

    python bench/profile_step.py                          # the default train.py, on a GPU
    python bench/profile_step.py MODEL_DIM=1024 MODEL_HEADS=8 --steps 30

Builds the model and optimizer with train.py's own functions (constants
overridden as given), compiles the loss as train.py does, and times each part
of a step on its own, waiting for the GPU after each part, so the parts add up
to a step with no overlap between CPU and GPU. `--mode reduce-overhead` compiles
the loss with CUDA graphs instead. Random bytes stand in for data: speed does
not depend on them.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 5  # compiled steps not timed


def load_train(overrides: dict) -> object:
    spec = importlib.util.spec_from_file_location("train_under_profile", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key, value in overrides.items():
        if not hasattr(module, key):
            raise SystemExit(f"train.py has no constant {key}; see the Hyperparameters section of train.py")
        setattr(module, key, value)
    return module


def timed(part: str, fn, totals: dict) -> None:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    totals[part] = totals.get(part, 0.0) + time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("constants", nargs="*", help="K=V overrides of train.py's constants")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default="default", help="torch.compile mode for the loss")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA GPU")
    overrides = {k: ast.literal_eval(v) for k, v in (c.split("=", 1) for c in args.constants)}
    train = load_train(overrides)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    model = train.build_model().to(device)
    optimizer = train.build_optimizer(model)
    batch_size, seq_len, vocab = train.BATCH_SIZE, train.MAX_SEQ_LEN, train.VOCAB_SIZE

    @torch.compile(mode=args.mode)
    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.float().view(-1, vocab), batch[:, 1:].reshape(-1))

    def forward_backward() -> None:
        batch = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()

    parts = {"forward+backward": forward_backward,
             "clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), train.GRAD_CLIP),
             "optimizer.step": optimizer.step,
             "zero_grad": lambda: optimizer.zero_grad(set_to_none=True)}
    totals: dict[str, float] = {}
    for step in range(WARMUP_STEPS + args.steps):
        if step == WARMUP_STEPS:
            totals.clear()
        for name, fn in parts.items():
            timed(name, fn, totals)

    step_seconds = sum(totals.values()) / args.steps
    tokens = batch_size * seq_len
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, batch {batch_size}x{seq_len}, "
          f"{torch.cuda.get_device_name()}, compile mode {args.mode}; {args.steps} steps")
    print("| part | ms per step | share |\n| --- | --- | --- |")
    for name, seconds in totals.items():
        print(f"| {name} | {1e3 * seconds / args.steps:.2f} | {seconds / args.steps / step_seconds:.0%} |")
    print(f"\nserial step {1e3 * step_seconds:.1f} ms = {tokens / step_seconds:,.0f} tokens/s with no overlap")


if __name__ == "__main__":
    main()
