"""The hand-over (scheduler/handover.py): export, the checks a program cannot dodge, and loading without running it.

    python -m pytest tests/test_handover.py -q
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import threading
import types
from pathlib import Path

import pytest
import torch

from scheduler import evaluate, handover, protocol
from scheduler.handover import ExportError, RefusedError

CPU = torch.device("cpu")
X_SHAPE = (protocol.EVAL_BATCH, protocol.WINDOW)


def tiny_train_module(source: str, tmp_path: Path) -> types.ModuleType:
    """The tiny train.py as a module (its training block does not run)."""
    import importlib.util

    path = tmp_path / "tiny_train.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("tiny_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Table(torch.nn.Module):
    """Logits looked up from the current byte: causal, pure, a [256, 256] weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


def bytes_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, X_SHAPE, generator=torch.Generator().manual_seed(seed))


def handed_over(tmp_path: Path, module: torch.nn.Module) -> Path:
    out = tmp_path / "out"
    handover.export_program(module, out, CPU)
    return out


def document(out: Path) -> dict:
    return json.loads((out / protocol.PROGRAM_FILE).read_text())


def write_document(out: Path, doc: dict) -> None:
    (out / protocol.PROGRAM_FILE).write_text(json.dumps(doc))


# ---------------------------------------------------------------------------- export and load


@pytest.mark.slow
def test_default_model_round_trip(tmp_path, tiny_train_source):
    """train.py's model (tiny settings) exports, reloads and gives the module's logits; its modes are restored."""
    train = tiny_train_module(tiny_train_source, tmp_path)
    train.SDPA_BACKENDS = dict(enable_flash=True, enable_math=True)  # the CPU's fused kernel: half the time
    torch.manual_seed(0)
    model = train.build_model()
    model.train()
    model.attn_layers.eval()  # a submodule in another mode than its parent keeps its own mode
    compiled = torch.compile(model)  # the harness is handed a compiled wrapper: its _orig_mod is exported
    out = handed_over(tmp_path, compiled)
    assert model.training and not model.attn_layers.training and model.token_emb.training

    program = handover.load_program(out, CPU)
    assert program.parameters == sum(t.numel() for t in model.state_dict().values())
    assert program.forward_flops_per_token > 0
    x = bytes_batch()
    with torch.no_grad():
        expected = model.eval()(x)
        got = program(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    ops = [node["op"] for node in document(out)["nodes"]]
    assert "aten.scaled_dot_product_attention.default" in ops and "aten.linear.default" in ops
    assert handover.AUTOCAST_OFF in ops  # x-transformers computes its rotary positions with autocast off
    # the rebuilt graph has the loader's own names, not the file's
    assert all(node.name.startswith(("v", "w")) or node.op in ("placeholder", "output")
               for node in program.module.graph.nodes)


def test_tied_and_non_finite_constants_round_trip(tmp_path):
    """Shared tensors are written once per name; -inf and nan arguments survive the JSON."""

    class Masked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(256, 256)
            self.out = torch.nn.Linear(256, 256, bias=False)
            self.out.weight = self.emb.weight  # tied

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits = self.out(self.emb(x))
            logits = logits.masked_fill(x[..., None] == 255, float("-inf"))
            return torch.nan_to_num(logits.clamp(max=float("inf")), nan=float("nan"), neginf=-1e4)

    model = Masked()
    out = handed_over(tmp_path, model)
    with torch.no_grad():
        torch.testing.assert_close(handover.load_program(out, CPU)(bytes_batch()), model(bytes_batch()))
    assert '{"float":"-inf"}' in (out / protocol.PROGRAM_FILE).read_text()


def test_in_place_writes_to_intermediates_are_functionalised(tmp_path):
    """In-place arithmetic on the forward's own tensors is fine (the graph is functionalised); the program
    that reaches the evaluation has no in-place operator."""

    class InPlace(Table):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.emb(x) * 1.0
            h += 1
            return torch.relu_(h)

    model = InPlace()
    out = handed_over(tmp_path, model)
    assert not any(node["op"].split(".")[1].endswith("_") for node in document(out)["nodes"])
    with torch.no_grad():
        torch.testing.assert_close(handover.load_program(out, CPU)(bytes_batch()), model(bytes_batch()))


class Stateful(Table):
    """Counts its calls in a buffer: a model that knows which batch it is scoring."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.emb(x) + self.calls


class Random(Table):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) + torch.rand_like(self.emb(x))


class DropoutInEval(Table):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(self.emb(x), 0.5, training=True)


class ItemOfData(Table):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x) * x.max().item()


@pytest.mark.parametrize("model,why", [
    (Stateful(), "writes to calls"),
    (Random(), "'aten.rand_like.default' is not allowed: random"),
    (DropoutInEval(), "train=True: dropout is random"),
    (ItemOfData(), "'aten.item.default' is not allowed"),
])
def test_impure_models_fail_the_early_check(model, why):
    """check_exportable (the harness calls it right after build_model) applies the loader's checks."""
    with pytest.raises((ExportError, RefusedError), match=why):
        handover.check_exportable(model, CPU)


def test_a_model_that_returns_two_tensors_is_not_exportable():
    class Two(Table):
        def forward(self, x):
            return self.emb(x), self.emb(x)

    with pytest.raises(ExportError, match="one tensor of logits"):
        handover.check_exportable(Two(), CPU)


# ---------------------------------------------------------------------------- what a hand-crafted file can do


def crafted(tmp_path: Path, nodes: list[dict], weights: dict | None = None, output: int | None = None) -> Path:
    """A hand-written program (and matching weights) in tmp_path/out: {"emb": [256, 256]} plus `weights`."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    tensors = {"emb": torch.zeros(256, 256), **(weights or {})}
    doc = {"format": handover.FORMAT, "input": {"shape": list(X_SHAPE), "dtype": "int64"},
           "weights": {k: {"shape": list(t.shape), "dtype": "float32"} for k, t in tensors.items()},
           "nodes": nodes, "output": {"node": len(nodes) - 1 if output is None else output}}
    write_document(out, doc)
    from safetensors.torch import save_file

    save_file(tensors, out / protocol.WEIGHTS_FILE)
    return out


LOOKUP = {"op": "aten.embedding.default", "args": [{"weight": "emb"}, {"input": 0}], "kwargs": {}}


def call(op: str, *args, **kwargs) -> dict:
    return {"op": op, "args": list(args), "kwargs": kwargs}


@pytest.mark.parametrize("node,named", [
    (call("aten.from_file.default", "/etc/passwd"), "aten.from_file.default"),
    (call("myns.evil.default", {"node": 0}), "myns.evil.default"),
    (call("aten.add_.Tensor", {"weight": "emb"}, 1), "aten.add_.Tensor"),
    (call("aten.add.out", {"node": 0}, 1, out={"node": 0}), "aten.add.out"),
    (call("aten.bernoulli.default", {"node": 0}), "aten.bernoulli.default"),
    (call("aten.randn.default", [64, 1024, 256]), "aten.randn.default"),
    (call("aten.empty.memory_format", [64, 1024, 256]), "aten.empty.memory_format"),
    (call("aten._local_scalar_dense.default", {"node": 0}), "aten._local_scalar_dense.default"),
    (call("aten.copy_.default", {"weight": "emb"}, {"node": 0}), "aten.copy_.default"),
    (call("aten.dropout.default", {"node": 0}, 0.1, True), "train=True"),
    (call("aten.native_dropout.default", {"node": 0}, 0.1, True), "aten.native_dropout.default"),
    (call("aten.scaled_dot_product_attention.default", {"node": 0}, {"node": 0}, {"node": 0}, None, 0.1),
     "dropout_p=0.1"),
    (call("../../../etc/passwd", {"node": 0}), "etc/passwd"),
    (call("x; import os; os.system('touch pwned')", {"node": 0}), "is not allowed"),
    (call("torch.ops.aten.add.Tensor", {"node": 0}, 1), "is not allowed"),
    (call("aten.add.Tensor.extra", {"node": 0}, 1), "is not allowed"),
])
def test_a_crafted_graph_with_a_forbidden_operator_is_refused(tmp_path, node, named):
    out = crafted(tmp_path, [LOOKUP, node])
    with pytest.raises(RefusedError, match="node 1") as refused:
        handover.load_program(out, CPU)
    assert named in str(refused.value)


@pytest.mark.parametrize("nodes,why", [
    ([call("aten.add.Tensor", {"node": 0}, 1)], "does not refer to an earlier node"),  # a reference to itself
    ([LOOKUP, call("aten.add.Tensor", {"node": 5}, 1)], "does not refer to an earlier node"),
    ([LOOKUP, call("aten.add.Tensor", {"node": -1}, 1)], "does not refer to an earlier node"),
    ([LOOKUP, call("aten.add.Tensor", {"weight": "other"}, 1)], "is not declared"),
    ([LOOKUP, call("aten.add.Tensor", {"input": 1}, 1)], "the input is"),
    ([LOOKUP, call("aten.div.Tensor_mode", {"node": 0}, 2, **{"x); import os; (": "floor"})], "no argument named"),
    ([LOOKUP, call("aten.add.Tensor", {"node": 0}, {"node": 0}, {"node": 0}, 1)], "positional arguments"),
    ([LOOKUP, call("aten.add.Tensor", {"node": 0}, {"code": "import os"})], "not a kind of value"),
    ([LOOKUP, call("aten.add.Tensor", {"node": 0}, 2**70)], "outside int64"),
    ([LOOKUP, call("aten.sum.dim_IntList", {"node": 0}, [[[[[0]]]]])], "nested deeper"),
    ([LOOKUP, call("aten.to.dtype", {"node": 0}, {"dtype": "float8_e4m3fn"})], "dtype 'float8_e4m3fn'"),
    ([LOOKUP, call(handover.AUTOCAST_OFF)], "not closed"),
    ([LOOKUP, call(handover.AUTOCAST_RESTORE, {"node": 0})], "closes no open"),
    ([LOOKUP, call(handover.AUTOCAST_OFF), call("aten.mul.Tensor", {"node": 1}, 2),
      call(handover.AUTOCAST_RESTORE, {"node": 1})], "refers to an autocast_off node"),
    ([LOOKUP, call("getitem", {"node": 0}, "0")], "getitem takes a node and an int"),
    ([{"op": "aten.relu.default", "args": [{"node": 0}]}], "keys op, args and kwargs"),
])
def test_a_malformed_graph_is_refused(tmp_path, nodes, why):
    out = crafted(tmp_path, nodes)
    with pytest.raises(RefusedError, match=why):
        handover.load_program(out, CPU)


def test_the_file_names_are_data_not_code(tmp_path):
    """Weight names and string arguments from the file never become code: the rebuilt graph uses its own names,
    and a string argument is passed as a string."""
    payload = "x'); __import__('os').system('touch pwned'); ('"
    nodes = [call("aten.embedding.default", {"weight": payload}, {"input": 0}),
             call("aten.div.Tensor_mode", {"node": 0}, 2, rounding_mode=payload)]
    out = crafted(tmp_path, nodes, weights={payload: torch.ones(256, 256)})
    program = handover.load_program(out, CPU)
    assert "import" not in program.module.code.replace(repr(payload), "")  # only inside the string literal
    with pytest.raises(RuntimeError, match="rounding_mode"):  # the operator refuses the string itself
        program(bytes_batch())
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change,why", [
    (lambda doc: doc.update(format="scheduler.program/0"), "format"),
    (lambda doc: doc.update(input={"shape": [1, 1024], "dtype": "int64"}), "the program's input must be"),
    (lambda doc: doc.pop("output"), "keys format, input, weights, nodes and output"),
    (lambda doc: doc.update(output={"node": 99}), "\"output\" must be"),
    (lambda doc: doc.update(output={"weight": "emb"}), "\"output\" must be"),
    (lambda doc: doc["weights"]["emb"].update(dtype=["float32"]), "expected"),
    (lambda doc: doc["weights"]["emb"].update(shape=[256, -1]), "non-negative ints"),
])
def test_a_malformed_document_is_refused(tmp_path, change, why):
    out = crafted(tmp_path, [LOOKUP])
    doc = document(out)
    change(doc)
    write_document(out, doc)
    with pytest.raises(RefusedError, match=why):
        handover.load_program(out, CPU)


@pytest.mark.parametrize("text", ['{"format": NaN}', "[" * 100_000, "\xff\xfe", "not json"])
def test_a_program_file_that_is_not_json_is_refused(tmp_path, text):
    out = crafted(tmp_path, [LOOKUP])
    (out / protocol.PROGRAM_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(RefusedError):
        handover.load_program(out, CPU)


@pytest.mark.parametrize("tensors,why", [
    ({"emb": torch.zeros(256, 128)}, "the program declares"),
    ({"emb": torch.zeros(256, 256, dtype=torch.float64)}, "the program declares"),
    ({"emb": torch.zeros(256, 256), "extra": torch.zeros(1)}, "does not declare: \\['extra'\\]"),
    ({"other": torch.zeros(256, 256)}, "does not declare"),
    ({"emb": torch.zeros(256, 256, dtype=torch.float8_e4m3fn)}, "dtype 'F8_E4M3'"),
])
def test_weights_that_do_not_match_the_program_are_refused(tmp_path, tensors, why):
    from safetensors.torch import save_file

    out = crafted(tmp_path, [LOOKUP])
    save_file(tensors, out / protocol.WEIGHTS_FILE)
    with pytest.raises(RefusedError, match=why):
        handover.load_program(out, CPU)


# ---------------------------------------------------------------------------- files the candidate controls


class Payload:
    """Unpickling this creates `marker`: what a planted pickle would do to the trusted side."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickles(out: Path, marker: Path, files: list[str]) -> None:
    """Put the payload into each of `files` in `out`: pickled, or torch.save'd for .pt and .pt2."""
    proof = marker.with_name("proof")
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()  # the payload is live: whatever unpickles it creates its marker
    for name in files:
        path = out / name
        if name.endswith((".pt", ".pt2")):
            torch.save(Payload(marker), path)
        else:
            path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.parametrize("files", [[protocol.PROGRAM_FILE], [protocol.WEIGHTS_FILE]])
def test_a_pickle_in_place_of_the_hand_over_is_refused_and_never_runs(tmp_path, data_dir, capsys, files):
    out = handed_over(tmp_path, Table())
    marker = tmp_path / "unpickled"
    plant_pickles(out, marker, [*files, protocol.STATS_FILE, "model.pt", "model.pt2"])
    code = evaluate.main([str(out), "--result", str(tmp_path / "result.json"), "--data-dir", str(data_dir),
                          "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert code == protocol.EXIT_REFUSED and lines[-1].startswith(protocol.REFUSED_TAG), lines
    assert not marker.exists()
    assert not (tmp_path / "result.json").exists()


def test_pickles_beside_a_good_hand_over_are_ignored(tmp_path, data_dir, capsys):
    """A pickled STATS_FILE and stray .pt/.pt2 files: the evaluation scores the program and unpickles nothing."""
    out = handed_over(tmp_path, Table())
    marker = tmp_path / "unpickled"
    plant_pickles(out, marker, [protocol.STATS_FILE, "model.pt", "model.pt2", "weights.pt"])
    code = evaluate.main([str(out), "--result", str(tmp_path / "result.json"), "--data-dir", str(data_dir),
                          "--device", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0, lines
    assert not marker.exists()
    assert json.loads((tmp_path / "result.json").read_text())["val_bpc"] > 0


def test_a_symbolic_link_is_refused(tmp_path):
    out = handed_over(tmp_path, Table())
    elsewhere = tmp_path / "elsewhere.json"
    (out / protocol.PROGRAM_FILE).rename(elsewhere)
    (out / protocol.PROGRAM_FILE).symlink_to(elsewhere)
    with pytest.raises(RefusedError, match="symbolic link"):
        handover.load_program(out, CPU)
    (out / protocol.PROGRAM_FILE).unlink()
    elsewhere.rename(out / protocol.PROGRAM_FILE)
    handover.load_program(out, CPU)  # the same file, not through a link: loads
    linked = tmp_path / "linked_out"
    linked.symlink_to(out)  # the folder itself: another trial's hand-over could be pointed at
    with pytest.raises(RefusedError, match="symbolic link"):
        handover.load_program(linked, CPU)


def load_in_thread(out: Path) -> BaseException | None:
    """load_program's exception, from a thread given 20 s: a reader that blocks fails the test, not the suite."""
    caught: list[BaseException | None] = []

    def target() -> None:
        try:
            handover.load_program(out, CPU)
            caught.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            caught.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    assert caught, "load_program blocked"
    return caught[0]


@pytest.mark.parametrize("name", [protocol.PROGRAM_FILE, protocol.WEIGHTS_FILE])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, name):
    out = handed_over(tmp_path, Table())
    (out / name).unlink()
    os.mkfifo(out / name)
    error = load_in_thread(out)
    assert isinstance(error, RefusedError) and "not a regular file" in str(error)


@pytest.mark.parametrize("name,cap", [(protocol.PROGRAM_FILE, handover.MAX_PROGRAM_BYTES),
                                      (protocol.WEIGHTS_FILE, handover.MAX_WEIGHTS_BYTES)])
def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, name, cap):
    out = handed_over(tmp_path, Table())
    with open(out / name, "r+b") as file:
        file.truncate(cap + 1)  # sparse: no disk space, but its size says it all
    error = load_in_thread(out)
    assert isinstance(error, RefusedError) and "bytes; at most" in str(error)  # weights: what the program declares


def test_a_folder_in_place_of_a_file_is_refused(tmp_path):
    out = handed_over(tmp_path, Table())
    (out / protocol.WEIGHTS_FILE).unlink()
    (out / protocol.WEIGHTS_FILE).mkdir()
    assert isinstance(load_in_thread(out), RefusedError)


def test_missing_files_say_how_the_model_is_handed_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RefusedError, match="run.finish"):
        handover.load_program(out, CPU)


def test_allowed_operators_are_pure():
    """Every entry resolves to an operator that is not in-place, out=, random (but through its argument rule) or
    data-dependent; the module checks this at import, so a careless addition fails here."""
    assert len(handover.OPS) == len(handover.ALLOWED_OPS) == len(set(handover.ALLOWED_OPS))
    for name, op in handover.OPS.items():
        assert str(op) == name and not op._schema.is_mutable
    assert set(handover.ARGUMENT_RULES) <= set(handover.ALLOWED_OPS)
    assert set(handover.REBUILT_AS) <= set(handover.ALLOWED_OPS)


def test_a_copy_of_a_document_validates_the_same(tmp_path, tiny_train_source):
    """validate() is what both check_exportable and load_program apply: same document, same verdict."""
    train = tiny_train_module(tiny_train_source, tmp_path)
    doc, _ = handover.to_program(handover.trace(train.build_model(), CPU))
    first = handover.validate(json.loads(json.dumps(doc)))
    second = handover.validate(copy.deepcopy(json.loads(json.dumps(doc))))
    assert first == second and len(first.calls) == len(doc["nodes"])
