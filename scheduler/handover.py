"""The trained model as data: how training hands it over and how the evaluation loads it without running it.

Training (untrusted, in the sandbox) calls, through the harness:

    check_exportable(model, device)          # right after build_model(): fails in seconds, not after training
    export_program(model, out_dir, device)   # at the end: out_dir/program.json + out_dir/weights.safetensors

The evaluation (trusted) calls:

    program = load_program(out_dir, device)  # a pure function LongTensor[B, T] -> logits[B, T, 256]
    logits = program(x)

`export_program` traces the module with `torch.export` at the one shape the
evaluation uses (LongTensor[EVAL_BATCH, WINDOW], static), in eval mode, and
keeps its first graph (the "training IR": the aten operators the Python code
called, `linear`, `reshape` and `scaled_dot_product_attention` whole). The
program is traced in FP32 and the evaluation applies its own autocast (BF16 on
a GPU); regions the code runs with autocast turned off stay marked as such
(x-transformers computes its rotary positions so; run in BF16 they cost a
briefly trained default model 0.017 bpc on an H200), other autocast and
no_grad regions are inlined. Only a graph with in-place operators is
functionalised (`run_decompositions({})`, about as long again as the trace:
1-1.5 s on the GPU machine for the default model), so that writes to intermediates become pure operators and
writes to weights or the input show up and are refused. PROGRAM_FILE is that
graph as JSON: a list of operator calls whose arguments are references to
earlier calls, to the input or to a weight (by its tensor key), and plain
values (ints, floats with inf/nan spelled out, bools, None, short strings,
lists, dtypes, devices, layouts, memory formats). WEIGHTS_FILE holds every
tensor the graph names (parameters, buffers, lifted constants) as safetensors.

`load_program` never unpickles anything and never imports candidate code. It
opens both files refusing symbolic links and anything but a regular file,
under a size cap; parses the JSON and checks every field against the format
below; looks every operator up in ALLOWED_OPS (pure tensor operators of the
`aten` namespace, by name: no custom namespaces, no I/O, no randomness, no
in-place or `out=` variants, no uninitialised memory, no tensor values read
into Python); builds a `torch.fx.Graph` itself, with its own node names; reads the
weights with `safetensors` (no pickle) and checks they are exactly the tensors
the program declares, in an allowed dtype. Every device argument becomes the
evaluation's device. Whatever it refuses raises `RefusedError`, whose message
names what was wrong; the evaluation reports it as the trial's reason.

The program file, version 1:

    {"format": "scheduler.program/1",
     "input": {"shape": [EVAL_BATCH, WINDOW], "dtype": "int64"},
     "weights": {KEY: {"shape": [int, ...], "dtype": "float32"}, ...},
     "nodes": [{"op": "aten.linear.default", "args": [VALUE, ...], "kwargs": {NAME: VALUE}}, ...],
     "output": {"node": INDEX}}

    VALUE: {"node": i} (an earlier node's result) | {"input": 0} | {"weight": KEY} | int | float | bool | null
           | string | [VALUE, ...] | {"float": "inf" | "-inf" | "nan"} | {"dtype": NAME} | {"device": TYPE}
           | {"layout": "strided"} | {"memory_format": NAME}

A node {"op": "getitem", "args": [{"node": i}, k]} takes item k of a node that returns several tensors.
{"op": "autocast_off.enter", "args": []} and {"op": "autocast_off.exit", "args": [{"node": ENTER}]} enclose calls
that run with autocast turned off; regions nest and all are closed before the output.
"""

from __future__ import annotations

import json
import math
import operator
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch.utils.flop_counter import FlopCounterMode

from scheduler.atomic import atomic_path, atomic_write
from scheduler.protocol import EVAL_BATCH, PROGRAM_FILE, WEIGHTS_FILE, WINDOW

FORMAT = "scheduler.program/1"
VOCAB = 256

MAX_PROGRAM_BYTES = 64 * 2**20      # the default model's graph is ~0.2 MB
MAX_WEIGHTS_BYTES = 4 * 2**30       # 1 billion float32 numbers (read whole into memory); the default has 48 million
MAX_HEADER_BYTES = 16 * 2**20       # the safetensors header (names, shapes, offsets)
MAX_NODES = 200_000
MAX_WEIGHTS = 100_000
MAX_LIST = 100_000                  # elements of one list argument
MAX_DEPTH = 4                       # lists in lists in arguments
MAX_STRING = 256                    # an einsum equation, a padding mode, a rounding mode
MAX_KEY = 512                       # a weight's name
MAX_DIMS = 8
INT_RANGE = 2**63

# Names in the file -> torch objects. Only these are ever constructed from the file.
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SAFETENSORS_DTYPES = {  # the header's names for the same dtypes
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d,
}
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}

# The operators a handed-over graph may call, as `aten.NAME.OVERLOAD`. What qualifies: a pure function of its
# tensor arguments, the same result every time (no random numbers, no uninitialised memory), writes nothing
# (no in-place or out= variants), reads nothing but its arguments (no files), and an output shape that follows
# from the input shapes alone (no item(), nonzero(), masked_select()). The list covers what x-transformers
# 2.31.10 produces for train.py and the options AGENTS.md names (measured: GELU, SwiGLU/GEGLU, LayerNorm,
# RMSNorm, ScaleNorm, DynamicTanh, gates, QK norms, memory key/values, talking heads, top-k, ALiBi, relative and
# dynamic position bias, CoPE, hyper-connections, GRU gating, mixture of softmaxes, ...) plus common pure tensor
# operators a hand-written model uses. Each entry is checked at import: its schema must not be mutable and
# it must not be tagged random, in-place, out= or data-dependent (scaled_dot_product_attention and dropout are
# tagged random for their dropout, which ARGUMENT_RULES allows only when off).
ALLOWED_OPS = (
    # arithmetic and comparisons
    "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor", "aten.sub.Scalar", "aten.subtract.Tensor",
    "aten.rsub.Tensor", "aten.rsub.Scalar", "aten.mul.Tensor", "aten.mul.Scalar", "aten.div.Tensor",
    "aten.div.Scalar", "aten.div.Tensor_mode", "aten.div.Scalar_mode", "aten.true_divide.Tensor",
    "aten.floor_divide.default", "aten.floor_divide.Scalar", "aten.remainder.Tensor", "aten.remainder.Scalar",
    "aten.fmod.Tensor", "aten.fmod.Scalar", "aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar",
    "aten.neg.default", "aten.abs.default", "aten.sign.default", "aten.sgn.default", "aten.signbit.default",
    "aten.copysign.Tensor", "aten.reciprocal.default", "aten.square.default", "aten.sqrt.default",
    "aten.rsqrt.default", "aten.exp.default", "aten.exp2.default", "aten.expm1.default", "aten.log.default",
    "aten.log2.default", "aten.log10.default", "aten.log1p.default", "aten.logaddexp.default", "aten.xlogy.Tensor",
    "aten.hypot.default", "aten.sin.default", "aten.cos.default", "aten.tan.default", "aten.asin.default",
    "aten.acos.default", "aten.atan.default", "aten.atan2.default", "aten.sinh.default", "aten.cosh.default",
    "aten.tanh.default", "aten.asinh.default", "aten.acosh.default", "aten.atanh.default", "aten.sinc.default",
    "aten.erf.default", "aten.erfc.default", "aten.erfinv.default", "aten.logit.default", "aten.floor.default",
    "aten.ceil.default", "aten.round.default", "aten.round.decimals", "aten.trunc.default", "aten.frac.default",
    "aten.clamp.default", "aten.clamp.Tensor", "aten.clamp_min.default", "aten.clamp_min.Tensor",
    "aten.clamp_max.default", "aten.clamp_max.Tensor", "aten.minimum.default", "aten.maximum.default",
    "aten.max.other", "aten.min.other", "aten.lerp.Scalar", "aten.lerp.Tensor", "aten.addcmul.default",
    "aten.addcdiv.default", "aten.nan_to_num.default", "aten.where.self", "aten.where.ScalarSelf",
    "aten.where.ScalarOther", "aten.where.Scalar", "aten.masked_fill.Scalar", "aten.masked_fill.Tensor",
    "aten.eq.Tensor", "aten.eq.Scalar", "aten.ne.Tensor", "aten.ne.Scalar", "aten.lt.Tensor", "aten.lt.Scalar",
    "aten.le.Tensor", "aten.le.Scalar", "aten.gt.Tensor", "aten.gt.Scalar", "aten.ge.Tensor", "aten.ge.Scalar",
    "aten.isnan.default", "aten.isinf.default", "aten.isfinite.default", "aten.logical_and.default",
    "aten.logical_or.default", "aten.logical_not.default", "aten.logical_xor.default", "aten.bitwise_and.Tensor",
    "aten.bitwise_and.Scalar", "aten.bitwise_or.Tensor", "aten.bitwise_or.Scalar", "aten.bitwise_xor.Tensor",
    "aten.bitwise_xor.Scalar", "aten.bitwise_not.default", "aten.__and__.Tensor", "aten.__or__.Tensor",
    "aten.__xor__.Tensor",
    # activations
    "aten.relu.default", "aten.relu6.default", "aten.gelu.default", "aten.silu.default", "aten.mish.default",
    "aten.sigmoid.default", "aten.log_sigmoid.default", "aten.softplus.default", "aten.elu.default",
    "aten.selu.default", "aten.celu.default", "aten.leaky_relu.default", "aten.prelu.default",
    "aten.hardtanh.default", "aten.hardswish.default", "aten.hardsigmoid.default", "aten.softshrink.default",
    "aten.hardshrink.default", "aten.threshold.default", "aten.glu.default",
    "aten.dropout.default", "aten.feature_dropout.default", "aten.alpha_dropout.default",  # with train=False only
    # normalisation, softmax, reductions
    "aten.layer_norm.default", "aten.native_layer_norm.default", "aten.rms_norm.default", "aten.group_norm.default",
    "aten.native_group_norm.default", "aten._native_batch_norm_legit_no_training.default", "aten.softmax.int",
    "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default", "aten.logsumexp.default",
    "aten.sum.default", "aten.sum.dim_IntList", "aten.mean.default", "aten.mean.dim", "aten.prod.default",
    "aten.prod.dim_int", "aten.var.correction", "aten.std.correction", "aten.var_mean.correction", "aten.var.dim",
    "aten.std.dim", "aten.norm.ScalarOpt_dim", "aten.amax.default", "aten.amin.default", "aten.max.default",
    "aten.max.dim", "aten.min.default", "aten.min.dim", "aten.argmax.default", "aten.argmin.default",
    "aten.any.default", "aten.any.dim", "aten.any.dims", "aten.all.default", "aten.all.dim",
    "aten.linalg_vector_norm.default", "aten.cumsum.default", "aten.cumprod.default", "aten.sort.default",
    "aten.sort.stable", "aten.topk.default",
    # matrix products, convolutions, recurrent cells, attention
    "aten.linear.default", "aten.matmul.default", "aten.mm.default", "aten.bmm.default", "aten.addmm.default",
    "aten.baddbmm.default", "aten.mv.default", "aten.dot.default", "aten.outer.default", "aten.einsum.default",
    "aten.tensordot.default", "aten.conv1d.default", "aten.conv1d.padding", "aten.conv2d.default",
    "aten.conv2d.padding", "aten.convolution.default", "aten.gru_cell.default", "aten.lstm_cell.default",
    "aten.scaled_dot_product_attention.default",
    # shapes, views, copies, indexing
    "aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.view_as.default",
    "aten.reshape_as.default", "aten.expand.default", "aten.expand_as.default", "aten.contiguous.default",
    "aten.permute.default", "aten.transpose.int", "aten.swapaxes.default", "aten.t.default", "aten.numpy_T.default",
    "aten.mT.default", "aten.unsqueeze.default", "aten.squeeze.default", "aten.squeeze.dim", "aten.squeeze.dims",
    "aten.flatten.using_ints", "aten.unflatten.int", "aten.movedim.int", "aten.moveaxis.int", "aten.slice.Tensor",
    "aten.select.int", "aten.narrow.default", "aten.diagonal.default", "aten.split.Tensor", "aten.split.sizes",
    "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int", "aten.cat.default",
    "aten.stack.default", "aten.repeat.default", "aten.repeat_interleave.self_int", "aten.tile.default",
    "aten.flip.default", "aten.roll.default", "aten.tril.default", "aten.triu.default", "aten.pad.default",
    "aten.constant_pad_nd.default", "aten.clone.default", "aten.alias.default", "aten.detach.default",
    "aten.copy.default", "aten.lift_fresh_copy.default", "aten._to_copy.default", "aten.to.dtype",
    "aten.to.dtype_layout", "aten.to.device", "aten.to.other", "aten.type_as.default", "aten.embedding.default",
    "aten.one_hot.default", "aten.index.Tensor", "aten.index_select.default", "aten.gather.default",
    "aten.take_along_dim.default", "aten.scatter.src", "aten.scatter.value", "aten.scatter_add.default",
    "aten.index_put.default", "aten.select_scatter.default", "aten.slice_scatter.default",
    # new tensors of given values (every device argument becomes the evaluation's device)
    "aten.arange.default", "aten.arange.start", "aten.arange.start_step", "aten.linspace.default",
    "aten.zeros.default", "aten.ones.default", "aten.full.default", "aten.zeros_like.default",
    "aten.ones_like.default", "aten.full_like.default", "aten.new_zeros.default", "aten.new_ones.default",
    "aten.new_full.default", "aten.scalar_tensor.default", "aten.eye.default",
)
GETITEM = "getitem"  # operator.getitem on a node that returns several tensors (split, unbind, max.dim, ...)
AUTOCAST_OFF = "autocast_off.enter"   # the calls up to the matching exit run with autocast turned off
AUTOCAST_RESTORE = "autocast_off.exit"
# Tags that disqualify an operator (checked at import). Not "dynamic_output_shape": `index.Tensor` carries it
# for boolean masks, and a shape that depends on the data is still a pure function (the logits' shape is checked)
UNSAFE_TAGS = ("nondeterministic_seeded", "data_dependent_output", "inplace", "out", "inplace_view")


def _sdpa_without_dropout(args: list, kwargs: dict) -> str | None:
    dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
    return None if dropout == 0 else f"dropout_p={dropout!r}: attention dropout is random; it must be 0 in eval mode"


def _dropout_off(args: list, kwargs: dict) -> str | None:
    train = kwargs.get("train", args[2] if len(args) > 2 else None)
    if train is False:
        return None
    return f"train={train!r}: dropout is random in training mode; the model is exported in eval mode, where it is off"


# Operators allowed only with some arguments: a check that returns why the call is refused, or None. (These
# operators are tagged random; with these arguments they are not.)
ARGUMENT_RULES = {
    "aten.scaled_dot_product_attention.default": _sdpa_without_dropout,
    "aten.dropout.default": _dropout_off,
    "aten.feature_dropout.default": _dropout_off,
    "aten.alpha_dropout.default": _dropout_off,
}
# Operators the evaluation runs as another one. A view's validity depends on the strides the tracer saw, and the
# evaluation's kernels may return other strides (attention in BF16 does, against the FP32 trace); reshape gives
# the same values whatever the strides, and in a graph without writes a copy cannot be told from a view.
REBUILT_AS = {"aten.view.default": "aten.reshape.default", "aten._unsafe_view.default": "aten.reshape.default"}
# Higher-order operators of the traced graph whose subgraph the export inlines, by the subgraph's argument index:
# autocast regions (those that turn it off are marked) and grad-mode regions (the evaluation computes no gradients).
INLINED = {"wrap_with_autocast": 4, "wrap_with_set_grad_enabled": 1}
AUTOCAST_ENABLED_ARG = 2  # wrap_with_autocast(device_type, dtype, enabled, cache_enabled, subgraph, *inputs)


class RefusedError(Exception):
    """What the candidate handed over is refused; the message says what and why, in one line."""


class ExportError(Exception):
    """The model cannot be handed over as a program; the message says why and what to change."""


def _resolve(name: str) -> torch._ops.OpOverload:
    namespace, packet, overload = name.split(".")
    op = getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    tags = {tag.name for tag in op.tags} - ({"nondeterministic_seeded"} if name in ARGUMENT_RULES else set())
    if op._schema.is_mutable or tags & set(UNSAFE_TAGS):
        raise AssertionError(f"ALLOWED_OPS names {name}, which is not pure: {sorted(tags)}")
    return op


OPS = {name: _resolve(name) for name in ALLOWED_OPS}
BUILT = {name: OPS[REBUILT_AS.get(name, name)] for name in ALLOWED_OPS}


def _why_not_allowed(name: str) -> str:
    """The refusal of an operator outside ALLOWED_OPS, with the likely reason for the common kinds."""
    shown = repr(name[:120])
    parts = name.split(".")
    packet, overload = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
    if len(parts) != 3 or parts[0] != "aten":
        reason = "only operators of torch's aten namespace are allowed (no custom or library operators)"
    elif overload == "out" or packet.endswith("_"):
        reason = "in-place and out= operators write into tensors; the model must be a pure function"
    elif any(word in packet for word in ("rand", "bernoulli", "dropout", "normal", "multinomial", "uniform",
                                         "poisson", "exponential", "rrelu")):
        reason = "random operators make the score random; put dropout and noise in training only"
    elif packet.startswith("empty") or packet.startswith("new_empty"):
        reason = "uninitialised memory is not a pure function"
    else:
        reason = "it is not on the list of pure tensor operators (scheduler/handover.py ALLOWED_OPS)"
    return f"operator {shown} is not allowed: {reason}"


# ---------------------------------------------------------------------------------------------- export side


def _training_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    return [(module, module.training) for module in model.modules()]


def _writes_in_place(program: torch.export.ExportedProgram) -> bool:
    return any(isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
               for module in program.graph_module.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes)


def trace(model: torch.nn.Module, device: torch.device | str) -> torch.export.ExportedProgram:
    """`model` (a torch.compile wrapper unwrapped) traced in eval mode at the evaluation's input shape;
    functionalised only if it writes in place. Each module's train/eval mode is restored afterwards."""
    model = getattr(model, "_orig_mod", model)
    modes = _training_modes(model)
    model.eval()
    try:
        x = torch.zeros(EVAL_BATCH, WINDOW, dtype=torch.long, device=device)
        program = torch.export.export(model, (x,), strict=False)
        return program.run_decompositions({}) if _writes_in_place(program) else program
    finally:
        for module, training in modes:
            module.training = training


def _encode(value: Any, env: dict[torch.fx.Node, Any], where: str) -> Any:
    """One argument of a traced call as a VALUE of the program file."""
    if isinstance(value, torch.fx.Node):
        encoded = env[value]
        if not isinstance(encoded, dict):
            raise ExportError(f"{where}: an argument is the result of a {type(encoded).__name__}, not a tensor")
        return encoded
    if value is None or isinstance(value, (bool, int, str)):
        if isinstance(value, str) and len(value) > MAX_STRING:
            raise ExportError(f"{where}: a string argument of {len(value)} characters (at most {MAX_STRING})")
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (list, tuple)):
        return [_encode(item, env, where) for item in value]
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES:
            raise ExportError(f"{where}: dtype {value} is not one of {sorted(DTYPES)}")
        return {"dtype": DTYPE_NAMES[value]}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        if value != torch.strided:
            raise ExportError(f"{where}: layout {value}; only strided tensors can be handed over")
        return {"layout": "strided"}
    if isinstance(value, torch.memory_format):
        names = {fmt: name for name, fmt in MEMORY_FORMATS.items()}
        return {"memory_format": names[value]}
    raise ExportError(f"{where}: an argument of type {type(value).__name__} ({str(value)[:80]}) cannot be handed "
                      "over; with static shapes only plain numbers, strings, dtypes and tensors appear")


def _emit(module: torch.fx.GraphModule, inputs: list, nodes: list[dict]) -> list:
    """Append the calls of `module`'s graph to `nodes`, its placeholders bound to `inputs` (encoded values);
    returns its outputs. Inlined regions are emitted in place; a getitem of one becomes the item itself."""
    env: dict[torch.fx.Node, Any] = {}
    placeholders = iter(inputs)
    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":  # a subgraph, the argument of an inlined region
            env[node] = getattr(module, node.target)
        elif node.op == "output":
            return [env.get(value) if isinstance(value, torch.fx.Node) else value for value in node.args[0]]
        elif node.op != "call_function":
            raise ExportError(f"the traced graph has a {node.op} node ({node.name}); expected operator calls only")
        elif isinstance(node.target, torch._ops.HigherOrderOperator):
            index = INLINED.get(node.target.name())
            if index is None:
                raise ExportError(f"the traced graph uses {node.target.name()} (control flow or a compiled region), "
                                  "which cannot be handed over; write the forward in plain tensor operations")
            region = env[node.args[index]]
            turns_off = node.target.name() == "wrap_with_autocast" and node.args[AUTOCAST_ENABLED_ARG] is False
            if turns_off:
                nodes.append({"op": AUTOCAST_OFF, "args": [], "kwargs": {}})
                enter = {"node": len(nodes) - 1}
            env[node] = _emit(region, [env[arg] for arg in node.args[index + 1 :]], nodes)
            if turns_off:
                nodes.append({"op": AUTOCAST_RESTORE, "args": [enter], "kwargs": {}})
        elif node.target is operator.getitem and isinstance(env[node.args[0]], list):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined region
        elif node.target is torch.ops.aten._assert_tensor_metadata.default and not node.users:
            continue  # a check of a tensor's dtype that computes nothing
        else:
            if node.target is operator.getitem:
                name = GETITEM
            elif isinstance(node.target, torch._ops.OpOverload):
                name = str(node.target)
            else:
                raise ExportError(f"the traced graph calls {node.target}, which is not an operator")
            trace_line = node.meta.get("stack_trace", "").strip().splitlines()[-1:]
            where = f"{name} ({trace_line[0].strip() if trace_line else node.name})"
            nodes.append({"op": name, "args": _encode(list(node.args), env, where),
                          "kwargs": {key: _encode(value, env, where) for key, value in node.kwargs.items()}})
            env[node] = {"node": len(nodes) - 1}
    raise ExportError("the traced graph has no output")


def to_program(exported: torch.export.ExportedProgram) -> tuple[dict, dict[str, torch.Tensor]]:
    """The program file's document and the tensors it names, from a traced program."""
    from torch.export.graph_signature import InputKind, OutputKind

    signature = exported.graph_signature
    mutated = [spec.target for spec in signature.output_specs if spec.kind != OutputKind.USER_OUTPUT]
    if mutated:
        raise ExportError(f"the model's forward writes to {', '.join(map(str, mutated[:5]))}: it must be a pure "
                          "function of its input in eval mode (no buffer updates, no caches)")
    if len(signature.output_specs) != 1:
        raise ExportError(f"the model returns {len(signature.output_specs)} values; it must return one tensor of "
                          "logits")

    inputs: list[dict] = []
    weights: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    for spec in signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append({"input": 0})
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            tensor = exported.state_dict.get(spec.target)
            if tensor is None:  # a non-persistent buffer
                tensor = exported.constants.get(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            tensor = exported.constants.get(spec.target)
        else:
            raise ExportError(f"the model's graph takes a {spec.kind.name} input ({spec.target}); only tensors "
                              "can be handed over")
        if not isinstance(tensor, torch.Tensor):
            raise ExportError(f"{spec.target} is a {type(tensor).__name__}, not a tensor; only tensors can be "
                              "handed over")
        if tensor.dtype not in DTYPE_NAMES:
            raise ExportError(f"{spec.target} is {tensor.dtype}; weights must be one of {sorted(DTYPES)} "
                              "(keep FP8 to the training's matmuls)")
        if spec.target in tensors:
            raise ExportError(f"two tensors of the graph are both named {spec.target}")
        tensors[spec.target] = tensor.detach().to("cpu", copy=True).contiguous()  # owns its memory: no sharing
        weights[spec.target] = {"shape": list(tensor.shape), "dtype": DTYPE_NAMES[tensor.dtype]}
        inputs.append({"weight": spec.target})

    nodes: list[dict] = []
    (output,) = _emit(exported.graph_module, inputs, nodes)
    if not isinstance(output, dict) or "node" not in output:
        raise ExportError("the model must return one tensor computed from its input")
    document = {"format": FORMAT, "input": {"shape": [EVAL_BATCH, WINDOW], "dtype": "int64"},
                "weights": weights, "nodes": nodes, "output": output}
    return document, tensors


def check_exportable(model: torch.nn.Module, device: torch.device | str) -> None:
    """Trace `model` as `export_program` does and apply the evaluation's checks to the graph (not the weights).

    Raises ExportError or RefusedError with the reason, or whatever torch.export raised."""
    document, tensors = to_program(trace(model, device))
    _checked_text(document, tensors)


def export_program(model: torch.nn.Module, out_dir: Path, device: torch.device | str) -> None:
    """Write `model` as out_dir/PROGRAM_FILE and out_dir/WEIGHTS_FILE (each replaced atomically)."""
    document, tensors = to_program(trace(model, device))
    text = _checked_text(document, tensors)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Not flushed to the disk: the evaluation reads them at once, and after a crash the trial runs again.
    with atomic_path(out_dir / WEIGHTS_FILE, fsync=False) as tmp:
        save_safetensors(tensors, tmp)
    atomic_write(out_dir / PROGRAM_FILE, text, fsync=False)


def _checked_text(document: dict, tensors: dict[str, torch.Tensor]) -> str:
    """The program file's text, refused here, with the evaluation's own words, if the evaluation would refuse it
    (the weights' sizes too; their names, shapes and dtypes come from the same tensors)."""
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    if len(text) > MAX_PROGRAM_BYTES or weight_bytes > MAX_WEIGHTS_BYTES:
        raise ExportError(f"the program is {len(text)} bytes and its weights {weight_bytes}; the evaluation reads at "
                          f"most {MAX_PROGRAM_BYTES} and {MAX_WEIGHTS_BYTES}")
    validate(json.loads(text))
    return text


# ---------------------------------------------------------------------------------------------- load side


@dataclass(frozen=True)
class Ref:
    """A reference to the input (kind "input"), a weight (key) or an earlier node (index)."""
    kind: str
    key: str | int


@dataclass(frozen=True)
class Call:
    op: Any                # an OpOverload from OPS, or operator.getitem
    name: str
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Valid:
    """A program file that passed every check: calls with resolved operators, and the declared weights."""
    weights: dict[str, tuple[tuple[int, ...], torch.dtype]]
    calls: tuple[Call, ...]
    output: int


@dataclass(frozen=True)
class Program:
    """A loaded program: call it with LongTensor[EVAL_BATCH, WINDOW] on its device to get logits."""
    module: torch.fx.GraphModule
    parameters: int                            # numbers in all its weights
    forward_flops_per_token: float | None      # FLOPs of one forward at the evaluation's shape, per position

    def __call__(self, x: torch.Tensor) -> Any:
        return self.module(x)


def _refuse_json_constant(name: str) -> None:
    raise RefusedError(f"{PROGRAM_FILE} contains {name}; write non-finite floats as {{\"float\": \"inf\"}}")


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise RefusedError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    _expect(isinstance(value, list) and len(value) <= MAX_DIMS
            and all(_is_int(n) and 0 <= n < INT_RANGE for n in value), f"{where}: shape {str(value)[:80]} is not a "
            f"list of at most {MAX_DIMS} non-negative ints")
    return tuple(value)


def _decode(value: Any, where: str, n_nodes: int, weights: dict, depth: int = 0) -> Any:
    """A VALUE of the program file as an argument; references become Ref."""
    if value is None or isinstance(value, bool):
        return value
    if _is_int(value):
        _expect(-INT_RANGE <= value < INT_RANGE, f"{where}: integer {str(value)[:40]} is outside int64")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        _expect(len(value) <= MAX_STRING, f"{where}: a string of {len(value)} characters (at most {MAX_STRING})")
        return value
    if isinstance(value, list):
        _expect(depth < MAX_DEPTH and len(value) <= MAX_LIST, f"{where}: a list nested deeper than {MAX_DEPTH} or "
                f"longer than {MAX_LIST}")
        return [_decode(item, where, n_nodes, weights, depth + 1) for item in value]
    _expect(isinstance(value, dict) and len(value) == 1, f"{where}: {str(value)[:80]} is not a value of the format")
    (kind, inner), = value.items()
    if kind == "node":
        _expect(_is_int(inner) and 0 <= inner < n_nodes, f"{where}: {{'node': {str(inner)[:20]}}} does not refer to "
                "an earlier node")
        return Ref("node", inner)
    if kind == "input":
        _expect(inner == 0 and _is_int(inner), f"{where}: the input is {{'input': 0}}")
        return Ref("input", 0)
    if kind == "weight":
        _expect(isinstance(inner, str) and inner in weights, f"{where}: weight {str(inner)[:80]!r} is not declared "
                "under \"weights\"")
        return Ref("weight", inner)
    tables = {"float": NON_FINITE, "dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
    if kind in tables:
        _expect(isinstance(inner, str) and inner in tables[kind], f"{where}: {kind} {str(inner)[:40]!r} is not one "
                f"of {sorted(tables[kind])}")
        return tables[kind][inner]
    if kind == "device":  # replaced by the evaluation's device when the graph is built
        _expect(isinstance(inner, str) and len(inner) <= 16, f"{where}: device {str(inner)[:40]!r}")
        return Ref("device", 0)
    raise RefusedError(f"{where}: {str(kind)[:40]!r} is not a kind of value of the format")


def _refers_to(value: Any, indices: set[int]) -> bool:
    if isinstance(value, Ref):
        return value.kind == "node" and value.key in indices
    return isinstance(value, list) and any(_refers_to(item, indices) for item in value)


def validate(document: Any) -> Valid:
    """Check a parsed program file against the format and ALLOWED_OPS; RefusedError names the first problem."""
    _expect(isinstance(document, dict) and set(document) == {"format", "input", "weights", "nodes", "output"},
            f"{PROGRAM_FILE} must be an object with the keys format, input, weights, nodes and output")
    _expect(document["format"] == FORMAT, f"{PROGRAM_FILE} has format {str(document['format'])[:40]!r}; expected "
            f"{FORMAT!r}")
    expected_input = {"shape": [EVAL_BATCH, WINDOW], "dtype": "int64"}
    _expect(document["input"] == expected_input, f"the program's input must be {expected_input} (the evaluation's "
            f"batch), not {str(document['input'])[:80]}")

    declared = document["weights"]
    _expect(isinstance(declared, dict) and len(declared) <= MAX_WEIGHTS, f"\"weights\" must be an object of at "
            f"most {MAX_WEIGHTS} entries")
    weights: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for key, spec in declared.items():
        where = f"weight {key[:80]!r}"
        _expect(0 < len(key) <= MAX_KEY and key != "__metadata__", f"{where}: a name of 1 to {MAX_KEY} characters")
        _expect(isinstance(spec, dict) and set(spec) == {"shape", "dtype"} and isinstance(spec["dtype"], str)
                and spec["dtype"] in DTYPES,
                f"{where}: expected {{\"shape\": [...], \"dtype\": one of {sorted(DTYPES)}}}")
        weights[key] = (_shape(spec["shape"], where), DTYPES[spec["dtype"]])

    nodes = document["nodes"]
    _expect(isinstance(nodes, list) and len(nodes) <= MAX_NODES, f"\"nodes\" must be a list of at most {MAX_NODES}")
    calls = []
    open_regions: list[int] = []  # autocast_off.enter nodes not yet closed, innermost last
    markers: set[int] = set()
    for index, node in enumerate(nodes):
        _expect(isinstance(node, dict) and set(node) == {"op", "args", "kwargs"}, f"node {index}: expected an object "
                "with the keys op, args and kwargs")
        name = node["op"]
        _expect(isinstance(name, str), f"node {index}: op must be a string")
        where = f"node {index} ({name[:120]!r})"
        _expect(isinstance(node["args"], list) and isinstance(node["kwargs"], dict), f"{where}: args must be a "
                "list and kwargs an object")
        args = [_decode(arg, where, index, weights) for arg in node["args"]]
        kwargs = {key: _decode(value, where, index, weights) for key, value in node["kwargs"].items()}
        if name == AUTOCAST_RESTORE:
            _expect(open_regions and args == [Ref("node", open_regions[-1])] and not kwargs, f"{where}: closes "
                    "no open autocast_off region (regions nest; the argument is the innermost open enter node)")
            markers.add(index)
            calls.append(Call(AUTOCAST_RESTORE, name, (Ref("node", open_regions.pop()),), {}))
            continue
        _expect(not any(_refers_to(arg, markers) for arg in (*args, *kwargs.values())), f"{where}: an argument "
                "refers to an autocast_off node, which is not a value")
        if name == AUTOCAST_OFF:
            _expect(not args and not kwargs, f"{where}: takes no arguments")
            markers.add(index)
            open_regions.append(index)
            calls.append(Call(AUTOCAST_OFF, name, (), {}))
            continue
        if name == GETITEM:
            _expect(len(args) == 2 and not kwargs and isinstance(args[0], Ref) and args[0].kind == "node"
                    and _is_int(args[1]), f"{where}: getitem takes a node and an int")
            calls.append(Call(operator.getitem, name, tuple(args), {}))
            continue
        if name not in OPS:
            raise RefusedError(f"{where}: {_why_not_allowed(name)}")
        op = OPS[name]
        arguments = op._schema.arguments
        positional = [a.name for a in arguments if not a.kwarg_only]
        _expect(len(args) <= len(positional), f"{where}: {len(args)} positional arguments; the operator takes "
                f"{len(positional)}")
        names = {a.name for a in arguments}
        for key in kwargs:  # keyword names become code in the rebuilt graph: only the schema's own are accepted
            _expect(key in names and key not in positional[: len(args)], f"{where}: no argument named {key[:40]!r}")
        rule = ARGUMENT_RULES.get(name)
        problem = rule(args, kwargs) if rule else None
        _expect(problem is None, f"{where}: {problem}")
        calls.append(Call(op, name, tuple(args), kwargs))

    _expect(not open_regions, f"node {open_regions[-1] if open_regions else ''}: an autocast_off region is not closed")
    output = document["output"]
    _expect(isinstance(output, dict) and set(output) == {"node"} and _is_int(output["node"])
            and 0 <= output["node"] < len(calls) and output["node"] not in markers,
            "\"output\" must be {\"node\": INDEX} of a node")
    return Valid(weights=weights, calls=tuple(calls), output=output["node"])


def read_regular_file(directory: int, name: str, cap: int) -> bytes:
    """The bytes of the regular file `name` in the open folder `directory`: no symbolic link, FIFO, device or
    folder, at most `cap` bytes (a file that grows while read is refused too)."""
    try:  # O_NONBLOCK: opening a FIFO returns at once instead of waiting for a writer
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        raise RefusedError(f"{name} is missing: training hands the model over through run.finish(model)") from None
    except OSError as error:
        raise RefusedError(f"{name} cannot be opened as a regular file ({error.strerror}); a symbolic link is "
                           "refused") from None
    try:
        info = os.fstat(fd)
        _expect(stat.S_ISREG(info.st_mode), f"{name} is not a regular file")
        _expect(info.st_size <= cap, f"{name} has {info.st_size} bytes; at most {cap} are read")
        chunks, size = [], 0
        while chunk := os.read(fd, min(cap + 1 - size, 2**26)):
            chunks.append(chunk)
            size += len(chunk)
            _expect(size <= cap, f"{name} has more than {cap} bytes; at most {cap} are read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_folder(out_dir: Path) -> int:
    """A descriptor of the hand-over folder itself; a symbolic link in its place is refused."""
    try:
        return os.open(out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        raise RefusedError(f"the hand-over folder {out_dir} cannot be opened as a folder ({error.strerror}); a "
                           "symbolic link is refused") from None


def read_program(directory: int) -> Valid:
    """PROGRAM_FILE of the open folder, parsed and validated."""
    raw = read_regular_file(directory, PROGRAM_FILE, MAX_PROGRAM_BYTES)
    try:
        document = json.loads(raw.decode("utf-8"), parse_constant=_refuse_json_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise RefusedError(f"{PROGRAM_FILE} is not valid JSON: {str(error)[:120]}") from None
    return validate(document)


def declared_bytes(valid: Valid) -> int:
    """Bytes of the tensors the program declares: what a weights file may hold, beside its header."""
    return sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
               for shape, dtype in valid.weights.values())


def read_weights(directory: int, valid: Valid) -> dict[str, torch.Tensor]:
    """WEIGHTS_FILE of the open folder: exactly the declared tensors, in their declared shapes and dtypes. Its size
    is checked against what the program declares before it is read (a sparse file costs a candidate no disk)."""
    declared = declared_bytes(valid)
    _expect(declared <= MAX_WEIGHTS_BYTES, f"{PROGRAM_FILE} declares {declared} bytes of weights; at most "
            f"{MAX_WEIGHTS_BYTES} are read")
    raw = read_regular_file(directory, WEIGHTS_FILE, 8 + MAX_HEADER_BYTES + declared)
    _expect(len(raw) >= 8, f"{WEIGHTS_FILE} is too short for a safetensors file")
    (header_size,) = struct.unpack("<Q", raw[:8])
    _expect(header_size <= min(MAX_HEADER_BYTES, len(raw) - 8), f"{WEIGHTS_FILE}: header of {header_size} bytes")
    try:
        header = json.loads(raw[8 : 8 + header_size].decode("utf-8"), parse_constant=_refuse_json_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise RefusedError(f"{WEIGHTS_FILE} has no valid safetensors header: {str(error)[:120]}") from None
    _expect(isinstance(header, dict), f"{WEIGHTS_FILE} has no valid safetensors header")
    header.pop("__metadata__", None)
    for key, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else info
        _expect(isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES, f"{WEIGHTS_FILE}: tensor "
                f"{key[:80]!r} has dtype {str(dtype)[:20]!r}; "
                f"allowed: {sorted(DTYPES)}")
    extra, missing = set(header) - set(valid.weights), set(valid.weights) - set(header)
    _expect(not extra, f"{WEIGHTS_FILE} holds tensors the program does not declare: {sorted(extra)[:5]}")
    _expect(not missing, f"{WEIGHTS_FILE} lacks tensors the program declares: {sorted(missing)[:5]}")
    try:
        tensors = load_safetensors(raw)
    except Exception as error:  # the parser's own refusal of a malformed file
        raise RefusedError(f"{WEIGHTS_FILE} is not a valid safetensors file: {str(error)[:160]}") from None
    for key, (shape, dtype) in valid.weights.items():
        tensor = tensors[key]
        _expect(tuple(tensor.shape) == shape and tensor.dtype == dtype, f"{WEIGHTS_FILE}: {key[:80]!r} is "
                f"{tensor.dtype} {list(tensor.shape)}; the program declares {dtype} {list(shape)}")
    return tensors


def _autocast_off(device_type: str) -> torch.autocast:
    """Enter a region without autocast (the rebuilt graph calls this at autocast_off.enter)."""
    region = torch.autocast(device_type, enabled=False)
    region.__enter__()
    return region


def _autocast_restore(region: torch.autocast) -> None:
    """Leave it (autocast_off.exit)."""
    region.__exit__(None, None, None)


def build(valid: Valid, tensors: dict[str, torch.Tensor], device: torch.device) -> torch.fx.GraphModule:
    """The program as a GraphModule on `device`: node names, weight names and devices are the loader's own."""
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    weight_nodes: dict[str, torch.fx.Node] = {}
    for i, key in enumerate(sorted(valid.weights)):
        root.register_buffer(f"w{i}", tensors[key].to(device))
        weight_nodes[key] = graph.get_attr(f"w{i}")
    nodes: list[torch.fx.Node] = []

    def resolve(value: Any) -> Any:
        if isinstance(value, Ref):
            if value.kind == "node":
                return nodes[value.key]
            if value.kind == "weight":
                return weight_nodes[value.key]
            return x if value.kind == "input" else device
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return value

    for i, call in enumerate(valid.calls):
        args = tuple(resolve(arg) for arg in call.args)
        kwargs = {key: resolve(value) for key, value in call.kwargs.items()}
        if call.op in (AUTOCAST_OFF, AUTOCAST_RESTORE):
            if device.type == "meta":  # counting FLOPs: there is no autocast on the meta device, nor a need
                nodes.append(None)
                continue
            target, args = (_autocast_off, (device.type,)) if call.op == AUTOCAST_OFF else (_autocast_restore, args)
        else:
            target = BUILT.get(call.name, call.op)
        nodes.append(graph.create_node("call_function", target, args, kwargs, name=f"v{i}"))
    graph.output(nodes[valid.output])
    return torch.fx.GraphModule(root, graph)


def count_flops(valid: Valid) -> float | None:
    """FLOPs per position of one forward, counted by running the graph on the meta device (no arithmetic)."""
    meta = torch.device("meta")
    tensors = {key: torch.empty(shape, dtype=dtype, device=meta) for key, (shape, dtype) in valid.weights.items()}
    try:
        module = build(valid, tensors, meta)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            module(torch.zeros(EVAL_BATCH, WINDOW, dtype=torch.long, device=meta))
    except Exception:  # an operator without a meta implementation: the figure is informative only
        return None
    return counter.get_total_flops() / (EVAL_BATCH * WINDOW)


def load_program(out_dir: Path, device: torch.device | str) -> Program:
    """The program that `export_program` wrote to `out_dir`, checked, on `device`. Raises RefusedError."""
    device = torch.device(device)
    directory = open_folder(Path(out_dir))
    try:
        valid = read_program(directory)
        tensors = read_weights(directory, valid)
    finally:
        os.close(directory)
    module = build(valid, tensors, device)
    parameters = sum(tensor.numel() for tensor in tensors.values())
    return Program(module=module.eval(), parameters=parameters, forward_flops_per_token=count_flops(valid))
