"""
Character-level language model on enwik8: the baseline every agent starts from.

    python train.py                 # BF16 on a GPU (FP32 on the CPU), 300 s of training, then scored
    USE_FP8=1 python train.py       # FP8 matmuls through torchao (Hopper / Ada and newer)
    USE_FP16=1 python train.py      # FP16 with a gradient scaler (GPUs without BF16)

The scheduler runs this file (and every variant of it) through the harness in
scheduler/harness.py, which owns the data, the clock and the saving; the
score (bits per character over the whole validation split) is computed from
the saved weights in a fresh process. Everything in this file is yours to
change, as long as `build_model()` stays at module level and returns a module
that maps LongTensor[B, T] to logits[B, T, 256], and training runs under
`if __name__ == "__main__":` through the harness.
"""

import os

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F
from adam_atan2_pytorch import MuonAdamAtan2
from adam_atan2_pytorch.muon_adam_atan2 import newtonschulz5
from x_transformers import Decoder, TransformerWrapper

from scheduler import harness

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly; no command-line flags)
# ---------------------------------------------------------------------------

# Model (x-transformers Decoder)
MODEL_DIM = 768           # hidden width
MODEL_DEPTH = 8           # transformer layers
MODEL_HEADS = 6           # attention heads, each 64 wide (x-transformers' default attn_dim_head)
MAX_SEQ_LEN = 1024        # context length in bytes
VOCAB_SIZE = 256          # one token per byte value
DROPOUT = 0.1             # attention and feed-forward dropout: 300 s is 3 passes over the train split
SHIFT_TOKENS = 1          # token shift: half of each layer's input features come from the previous byte (0: off)
VALUE_RESIDUAL = True     # later attention layers mix in the first layer's values (ResFormer)

# Optimization
LEARNING_RATE = 2e-3      # AdamAtan2 part: embeddings, norms, output layer
MUON_LEARNING_RATE = 2e-3 # Muon part: attention and feed-forward matrices
BATCH_SIZE = 64           # sequences per micro-batch
GRADIENT_ACCUMULATE_EVERY = 1
WEIGHT_DECAY = 0.0
GRAD_CLIP = 1.0

# Learning-rate schedule, as fractions of the time budget
WARMUP_RATIO = 0.02
WARMDOWN_RATIO = 0.4
FINAL_LR_FRAC = 0.0

# Precision: BF16 by default; the environment can ask for FP8 or FP16
USE_FP8 = os.environ.get("USE_FP8") == "1"
USE_FP16 = os.environ.get("USE_FP16") == "1"
USE_COMPILE = os.environ.get("USE_COMPILE", "1") == "1"
# "reduce-overhead" adds CUDA graphs: a 4x1024 micro-batch's forward and backward went from 12.4 to 4.2 ms on an
# H100 (bench/profile_step.py); worth trying when batches are small and steps many. It needs
# GRADIENT_ACCUMULATE_EVERY = 1: a graph's next replay overwrites the gradients accumulation still holds
COMPILE_MODE = "default"

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def build_model() -> torch.nn.Module:
    """LongTensor[B, T] -> logits[B, T, 256]. The evaluation calls this too."""
    return TransformerWrapper(
        num_tokens=VOCAB_SIZE,
        max_seq_len=MAX_SEQ_LEN,
        attn_layers=Decoder(
            dim=MODEL_DIM,
            depth=MODEL_DEPTH,
            heads=MODEL_HEADS,
            rotary_pos_emb=True,   # relative positions; nothing to learn per position
            attn_flash=True,       # PyTorch's fused scaled-dot-product attention
            attn_dropout=DROPOUT,
            ff_dropout=DROPOUT,
            attn_qk_norm=True,     # keeps attention logits bounded at high learning rates
            ff_relu_squared=True,  # ReLU^2 (Primer): cheap and strong
            use_rmsnorm=True,
            shift_tokens=SHIFT_TOKENS,
            add_value_residual=VALUE_RESIDUAL,
        ),
    )


class BatchedMuonAdamAtan2(MuonAdamAtan2):
    """MuonAdamAtan2's update, computed for many tensors at once.

    The library steps parameter by parameter in Python: about 1,200 small GPU
    kernels a step for the default model, 45 ms on an H100, as long as the
    forward and backward pass together. This step does the same arithmetic
    with foreach ops and one batched Newton-Schulz per matrix shape. Options
    train.py does not use (regenerative regularisation, cautious updates,
    NorMuon, decoupled weight decay) take the library's own step.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if self.decoupled_wd or any(g["regen_reg_rate"] > 0 or g["cautious_factor"] < 1 or g["use_normuon"]
                                    for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, wd = group["lr"], group["weight_decay"]
            if wd > 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["steps"] = 0
                    state["exp_avg"] = torch.zeros_like(p.grad)
                    if not group["use_muon"]:
                        state["exp_avg_sq"] = torch.zeros_like(p.grad)
                state["steps"] += 1
            exp_avgs = [state["exp_avg"] for state in states]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - group["beta1"])
            if group["use_muon"]:
                self._muon_update(group, params, exp_avgs)
            else:
                self._adam_atan2_update(group, params, grads, states)
        return loss

    def _adam_atan2_update(self, group: dict, params: list, grads: list, states: list) -> None:
        beta1, beta2, a, b = group["beta1"], group["beta2"], group["a"], group["b"]
        exp_avg_sqs = [state["exp_avg_sq"] for state in states]
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        den = torch._foreach_mul(exp_avg_sqs, [b * b / (1.0 - beta2 ** s["steps"]) for s in states])
        torch._foreach_sqrt_(den)
        updates = torch._foreach_mul([s["exp_avg"] for s in states], [1.0 / (1.0 - beta1 ** s["steps"]) for s in states])
        for update, d in zip(updates, den):  # there is no foreach atan2
            update.atan2_(d)
        torch._foreach_add_(params, updates, alpha=-group["lr"] * a)

    def _muon_update(self, group: dict, params: list, exp_avgs: list) -> None:
        by_shape: dict[torch.Size, list[int]] = {}
        for i, exp_avg in enumerate(exp_avgs):
            by_shape.setdefault(exp_avg.shape, []).append(i)
        for shape, index in by_shape.items():
            stacked = torch.stack([exp_avgs[i] for i in index])
            if not self.muon_bypass_update_fn(len(shape)):
                stacked = newtonschulz5(stacked, steps=group["muon_steps"], eps=group["muon_eps"],
                                        coefs=group["muon_newton_schulz5_coefs"])
            scale = max(shape[-2:]) ** 0.5 * group["muon_rms_factor"]  # match AdamW's update RMS (Kimi)
            torch._foreach_add_([params[i] for i in index], list(stacked.unbind(0)), alpha=-group["lr"] * scale)


def build_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Muon on the hidden matrices x-transformers names, AdamAtan2 on the rest."""
    optimizer = BatchedMuonAdamAtan2(
        muon_params=model.muon_parameters(),
        params=model.parameters(),
        lr=LEARNING_RATE,
        muon_lr=MUON_LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]  # the schedule scales each group from its own start
    return optimizer


def lr_multiplier(progress: float) -> float:
    """Warmup, constant, then a linear warmdown to FINAL_LR_FRAC, by fraction of the time budget."""
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


# ---------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------


def choose_precision(device: torch.device) -> str:
    """The precision this run really uses: the summary must not claim FP8 on a GPU without it."""
    if device.type != "cuda":
        return "fp32"
    if USE_FP8:
        if torch.cuda.get_device_capability(device) >= (8, 9):
            return "fp8"
        print(f"FP8: {torch.cuda.get_device_name(device)} has no FP8 matmuls (needs compute capability 8.9+); running BF16")
    if USE_FP16:
        return "fp16"
    return "bf16"


def to_float8(model: torch.nn.Module) -> None:
    """Swap the hidden Linear layers for torchao's float8 training layers (the output layer stays BF16)."""
    from torchao.float8 import convert_to_float8_training

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and "to_logits" not in name
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=wanted)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def main() -> None:
    run = harness.Run()
    device = run.device
    precision = choose_precision(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    model = build_model().to(device)
    run.watch(model, seq_len=MAX_SEQ_LEN)
    optimizer = build_optimizer(model)
    if precision == "fp8":
        to_float8(model)
    print(f"device: {device} | precision: {precision} | parameters: {run.num_params / 1e6:.1f}M "
          f"| batch: {BATCH_SIZE}x{MAX_SEQ_LEN}x{GRADIENT_ACCUMULATE_EVERY} | budget: {run.budget:.0f}s", flush=True)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))

    autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                              enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def optimizer_step() -> None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()

    if USE_COMPILE and device.type == "cuda":
        if COMPILE_MODE == "reduce-overhead" and GRADIENT_ACCUMULATE_EVERY > 1:
            raise SystemExit("COMPILE_MODE = 'reduce-overhead' (CUDA graphs) cannot accumulate gradients: set "
                             "GRADIENT_ACCUMULATE_EVERY = 1 and put the whole batch in BATCH_SIZE, or use "
                             "COMPILE_MODE = 'default'")
        loss_of = torch.compile(loss_of, mode=COMPILE_MODE)

    tokens_per_step = BATCH_SIZE * MAX_SEQ_LEN * GRADIENT_ACCUMULATE_EVERY
    model.train()
    while not run.done():
        step_loss = torch.zeros((), device=device)
        for _ in range(GRADIENT_ACCUMULATE_EVERY):
            with autocast:
                loss = loss_of(run.batch(BATCH_SIZE, MAX_SEQ_LEN)) / GRADIENT_ACCUMULATE_EVERY
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        multiplier = lr_multiplier(run.progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
        optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        run.step(step_loss, tokens=tokens_per_step)

    run.finish(model, precision=precision, depth=MODEL_DEPTH)


if __name__ == "__main__":
    main()
