"""
Character-level language model on enwik8: the baseline every agent starts from.

    python train.py                        # BF16 on a GPU (FP32 on the CPU), 300 s of training, then scored
    SCHEDULER_BUDGET=60 python train.py    # a shorter run (the harness reads SCHEDULER_*; its docstring says which)

Every switch is a constant below: edit it (USE_FP8 = True for FP8 matmuls
through torchao on Hopper / Ada and newer, USE_FP16 = True for FP16 with a
gradient scaler on GPUs without BF16). A trial gets this file and not your
environment, so a switch read from the environment would never reach it.

The scheduler runs this file (and every variant of it) through the harness in
scheduler/harness.py, which owns the data, the clock and the hand-over: the
trained model leaves as data (its graph, traced with torch.export, and its
weights), and the score (bits per character over the whole validation split)
is computed from them in a fresh process that runs none of this file.
Everything in this file is yours to change, as long as `build_model()` stays
at module level and returns a module that maps LongTensor[B, T] to
logits[B, T, 256] as a pure function in eval mode, and training runs under
`if __name__ == "__main__":` through the harness.
"""

import os
from collections.abc import Callable

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import einops
import torch
import torch.nn.functional as F
from adam_atan2_pytorch import MuonAdamAtan2
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
DROPOUT = 0.1             # on each block's output (GPT-2's residual dropout): the budget makes several passes over
                          # the train split, and without it the model memorises (docs/design.md)
SHIFT_TOKENS = 1          # token shift: half of each layer's input features come from the previous byte (0: off)
VALUE_RESIDUAL = True     # later attention layers mix in the first layer's values (ResFormer)
# PyTorch attention kernels x-transformers may use (torch.nn.attention.sdpa_kernel): cuDNN's is the fastest on
# Hopper (docs/design.md); math is the fallback
SDPA_BACKENDS = dict(enable_cudnn=True, enable_math=True)

# Optimization
LEARNING_RATE = 2e-3      # AdamAtan2 part: embeddings, norms, output layer
MUON_LEARNING_RATE = 2e-3 # Muon part: attention and feed-forward matrices
BATCH_SIZE = 64           # sequences per micro-batch
GRADIENT_ACCUMULATE_EVERY = 1
WEIGHT_DECAY = 0.1        # decoupled, scaled by the learning rate: with dropout, what keeps the passes from memorising
GRAD_CLIP = 1.0
NEWTON_SCHULZ_DTYPE = torch.bfloat16  # Muon's orthogonalisation, as Keller Jordan's Muon: faster than fp32

# Learning-rate schedule, as fractions of the time budget
WARMUP_RATIO = 0.02
WARMDOWN_RATIO = 0.4
FINAL_LR_FRAC = 0.0

# Precision and compilation
USE_FP8 = False           # FP8 matmuls through torchao (compute capability 8.9+, else BF16)
USE_FP16 = False          # FP16 autocast with a gradient scaler, for GPUs without BF16
USE_COMPILE = True        # torch.compile the loss on a GPU
# Inductor compiles one configuration per element-wise kernel instead of timing several: a shorter cold start at
# the same speed (docs/design.md)
INDUCTOR_OPTIONS = {"triton.autotune_pointwise": False}
# Record the whole step (forward, backward, clipping, optimizer) as one CUDA graph after the first compiled
# steps and replay it: small models are otherwise limited by Python launching hundreds of kernels a step
CUDA_GRAPHS = True
EAGER_STEPS = 2           # steps run before the capture (compilation); the harness does not time the first 3

# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def build_model() -> torch.nn.Module:
    """LongTensor[B, T] -> logits[B, T, 256]."""
    return TransformerWrapper(
        num_tokens=VOCAB_SIZE,
        max_seq_len=MAX_SEQ_LEN,
        attn_layers=Decoder(
            dim=MODEL_DIM,
            depth=MODEL_DEPTH,
            heads=MODEL_HEADS,
            rotary_pos_emb=True,   # relative positions; nothing to learn per position
            attn_flash=True,       # PyTorch's fused scaled-dot-product attention
            attn_attend_sdp_kwargs=SDPA_BACKENDS,
            # dropout on the 768-wide block outputs, not on attention weights or the 3072-wide hidden layer, where it
            # slows the step (cuDNN attention is faster without dropout; 4x fewer random numbers; docs/design.md)
            attn_sublayer_dropout=DROPOUT,
            ff_sublayer_dropout=DROPOUT,
            ff_no_bias=True,       # no feed-forward biases: their gradients cost a pass over the activations
            attn_qk_norm=True,     # keeps attention logits bounded at high learning rates
            ff_relu_squared=True,  # ReLU^2 (Primer): cheap and strong
            use_rmsnorm=True,
            shift_tokens=SHIFT_TOKENS,
            add_value_residual=VALUE_RESIDUAL,
        ),
    )


def newton_schulz(stack: torch.Tensor, steps: int, eps: float, coefs: tuple[float, float, float]) -> torch.Tensor:
    """The library's `newtonschulz5` (Muon's quintic iteration towards the nearest orthogonal matrix) for a stack
    of same-shaped matrices, its scalar multiplies and additions done inside the matmuls (baddbmm): 3 kernels an
    iteration instead of 8."""
    a, b, c = coefs
    tall = stack.shape[-2] > stack.shape[-1]  # iterate on the smaller Gram matrix
    x = stack.mT if tall else stack
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b*A + c*A@A
        x = torch.baddbmm(x, poly, x, beta=a)                    # a*X + B@X
    return x.mT if tall else x


class BatchedMuonAdamAtan2(MuonAdamAtan2):
    """MuonAdamAtan2's update computed for many tensors at once, with its state on the device.

    The library steps parameter by parameter in Python: a small GPU kernel at a
    time, as long as the forward and backward pass together for the default
    model (docs/design.md). This step does the same arithmetic
    with foreach ops and one batched Newton-Schulz per matrix shape (in
    NEWTON_SCHULZ_DTYPE; the library's is float32). The step
    count and the schedule's factor (`lr_scale`, which multiplies every
    group's `lr`) are device tensors, so a CUDA graph of the step reads their
    current values at every replay. It implements the options train.py uses;
    for the library's others (cautious updates, NorMuon, regenerative
    regularisation, decoupled weight decay) use MuonAdamAtan2 itself, set each
    group's `lr` from the schedule, and set CUDA_GRAPHS = False.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.decoupled_wd or any(g["regen_reg_rate"] > 0 or g["cautious_factor"] < 1 or g["use_normuon"]
                                    for g in self.param_groups):
            raise ValueError("BatchedMuonAdamAtan2 does not implement decoupled_wd, regen_reg_rate, cautious_factor "
                             "or use_normuon: use adam_atan2_pytorch.MuonAdamAtan2 with CUDA_GRAPHS = False")
        device = self.param_groups[0]["params"][0].device
        self.lr_scale = torch.ones((), device=device)  # the schedule's factor: fill_() it before each step
        self.steps = torch.zeros((), device=device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr = self.lr_scale * group["lr"]
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
                    if not group["use_muon"]:
                        self.state[p]["exp_avg_sq"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - group["beta1"])
            if group["use_muon"]:
                self._muon_update(group, params, exp_avgs, lr)
            else:
                self._adam_atan2_update(group, params, grads, exp_avgs, lr)
        return loss

    def _adam_atan2_update(self, group: dict, params: list, grads: list, exp_avgs: list, lr: torch.Tensor) -> None:
        beta1, beta2, a, b = group["beta1"], group["beta2"], group["a"], group["b"]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1.0 - beta2)
        den = torch._foreach_mul(exp_avg_sqs, b * b / (1.0 - beta2 ** self.steps))
        torch._foreach_sqrt_(den)
        updates = torch._foreach_div(exp_avgs, 1.0 - beta1 ** self.steps)
        for update, d in zip(updates, den):  # there is no foreach atan2
            update.atan2_(d)
        torch._foreach_mul_(updates, -a * lr)
        torch._foreach_add_(params, updates)

    def _muon_update(self, group: dict, params: list, exp_avgs: list, lr: torch.Tensor) -> None:
        by_shape: dict[torch.Size, list[int]] = {}
        for i, exp_avg in enumerate(exp_avgs):
            by_shape.setdefault(exp_avg.shape, []).append(i)
        for shape, index in by_shape.items():
            stacked = torch.stack([exp_avgs[i] for i in index])
            if not self.muon_bypass_update_fn(len(shape)):
                orthogonal = newton_schulz(stacked.to(NEWTON_SCHULZ_DTYPE), group["muon_steps"], group["muon_eps"],
                                           group["muon_newton_schulz5_coefs"])
                stacked = orthogonal.to(stacked.dtype)
            scale = max(shape[-2:]) ** 0.5 * group["muon_rms_factor"]  # match AdamW's update RMS (Kimi)
            torch._foreach_add_([params[i] for i in index], list((stacked * (-scale * lr)).unbind(0)))


def build_optimizer(model: torch.nn.Module) -> BatchedMuonAdamAtan2:
    """Muon on the hidden matrices x-transformers names, AdamAtan2 on the rest."""
    return BatchedMuonAdamAtan2(
        muon_params=model.muon_parameters(),
        params=model.parameters(),
        lr=LEARNING_RATE,
        muon_lr=MUON_LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
    )


def lr_multiplier(progress: float) -> float:
    """Warmup, constant, then a linear warmdown to FINAL_LR_FRAC, by fraction of the time budget.
    It scales every group's learning rate (the optimizer's `lr_scale`)."""
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


def without_float8(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh build_model() holding the trained weights: what the harness hands over after FP8 training, since
    torchao's float8 layers do not export to plain operators (they keep nn.Linear's parameter names)."""
    with next(model.parameters()).device:
        plain = build_model()
    plain.load_state_dict(model.state_dict())
    return plain


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def next_byte_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats) of predicting each byte of `batch` [B, T + 1] from the bytes before it."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))


def trace_einops_whole() -> None:
    """Let torch.compile put x-transformers' einops calls into the graph whole instead of stepping through them.

    Dynamo (torch >= 2.8, einops 0.8.2) steps through einops' Python at every call, its pattern parsing
    included: the parsing's cache does not apply while tracing, and most of Dynamo's tracing time went there
    (docs/design.md). Whole, each call is traced by AOT autograd in plain Python, where the cache works; the
    compiled graph is the same. (einops 0.8.1 and older did this on import; 0.8.2's
    `allow_ops_in_compiled_graph` does nothing on torch >= 2.8.)
    """
    for op in (einops.rearrange, einops.repeat, einops.reduce, einops.einsum, einops.pack, einops.unpack):
        torch.compiler.allow_in_graph(op)


class GraphedStep:
    """A training step recorded once as a CUDA graph, then replayed: one launch instead of the hundreds of
    kernels Python would launch. The step must read only its batch and state that lives on the device; each
    call copies the new batch into the graph's own input and replays."""

    def __init__(self, step: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> None:
        self.batch = batch.clone()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(self.batch)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.batch.copy_(batch)
        self.graph.replay()
        return self.loss


def main() -> None:
    run = harness.Run()
    device = run.device
    precision = choose_precision(device)
    use_graphs = CUDA_GRAPHS and device.type == "cuda" and precision != "fp16"  # the scaler's skip check syncs
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    with device:  # initialised where it trains: on a GPU, faster than on the CPU and a copy
        model = build_model()
    run.watch(model, seq_len=MAX_SEQ_LEN)
    optimizer = build_optimizer(model)
    if precision == "fp8":
        to_float8(model)
    print(f"device: {device} | precision: {precision} | parameters: {run.num_params / 1e6:.1f}M "
          f"| batch: {BATCH_SIZE}x{MAX_SEQ_LEN}x{GRADIENT_ACCUMULATE_EVERY} | CUDA graphs: {use_graphs} "
          f"| budget: {run.budget:.0f}s", flush=True)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        return next_byte_loss(model, batch)

    if USE_COMPILE and device.type == "cuda":
        trace_einops_whole()
        loss_of = torch.compile(loss_of, options=INDUCTOR_OPTIONS)
    autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                              enabled=precision != "fp32")
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def train_step(batch: torch.Tensor) -> torch.Tensor:
        """One optimizer step over GRADIENT_ACCUMULATE_EVERY micro-batches of `batch`; returns the mean loss.

        With CUDA graphs this runs as Python only until the capture after EAGER_STEPS steps; from then on the
        recorded kernels replay, so Python values inside the step are frozen at capture (a param group's `lr`, a
        counter, an `if` on the loss): keep what changes in device tensors, as `optimizer.lr_scale`."""
        step_loss = torch.zeros((), device=device)
        for micro_batch in batch.chunk(GRADIENT_ACCUMULATE_EVERY):
            with autocast:
                loss = loss_of(micro_batch) / GRADIENT_ACCUMULATE_EVERY
            scaler.scale(loss).backward()
            step_loss += loss.detach()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)  # before a capture: the graph then owns the gradients it writes
        return step_loss

    step = train_step
    tokens_per_step = BATCH_SIZE * MAX_SEQ_LEN * GRADIENT_ACCUMULATE_EVERY
    model.train()
    side_stream = torch.cuda.Stream() if use_graphs else None  # a graph's warm-up steps run off the default stream
    with torch.cuda.stream(side_stream):
        while not run.done():
            optimizer.lr_scale.fill_(lr_multiplier(run.progress))
            batch = run.batch(BATCH_SIZE * GRADIENT_ACCUMULATE_EVERY, MAX_SEQ_LEN)
            run.step(step(batch), tokens=tokens_per_step)
            if use_graphs and run.steps == EAGER_STEPS:
                step = GraphedStep(train_step, batch)

    run.finish(without_float8(model) if precision == "fp8" else model, precision=precision, depth=MODEL_DEPTH)


if __name__ == "__main__":
    main()
