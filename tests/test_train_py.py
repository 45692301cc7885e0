"""train.py's own machinery: the batched optimizer against the library it stands in for, and the compile path.

    python -m pytest tests/test_train_py.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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
