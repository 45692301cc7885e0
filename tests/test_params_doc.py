"""docs/adjustable_params.md must match the installed x-transformers.

If these fail after an x-transformers upgrade, run `python docs/generate_params.py`,
then describe the rows it marks "TODO: describe".
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from x_transformers import Decoder, TransformerWrapper

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load_generator() -> ModuleType:
    # docs/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("generate_params", DOCS / "generate_params.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
DOC_TEXT = gen.DOC_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def accepted() -> dict[str, dict[str, Any]]:
    """Section -> names and defaults of the installed library (probing takes a moment: once)."""
    return {section: source() for section, source in gen.SECTIONS.items()}


@pytest.mark.parametrize("section", list(gen.SECTIONS))
def test_documented_names_are_accepted(section: str, accepted: dict[str, dict[str, Any]]) -> None:
    unknown = sorted(set(gen.documented_rows(DOC_TEXT, section)) - set(accepted[section]))
    assert not unknown, f"documented in {section} but not accepted by the installed version: {unknown}"


@pytest.mark.parametrize("section", list(gen.SECTIONS))
def test_accepted_names_are_documented(section: str, accepted: dict[str, dict[str, Any]]) -> None:
    missing = sorted(set(accepted[section]) - set(gen.documented_rows(DOC_TEXT, section)))
    assert not missing, f"accepted by the installed version but not documented in {section}: {missing}"


@pytest.mark.parametrize("section", list(gen.SECTIONS))
def test_documented_defaults_match(section: str, accepted: dict[str, dict[str, Any]]) -> None:
    rows = gen.documented_rows(DOC_TEXT, section)
    wrong = {
        name: (row.default, gen.format_default(accepted[section][name]))
        for name, row in rows.items()
        if name in accepted[section] and row.default != gen.format_default(accepted[section][name])
    }
    assert not wrong, f"{section} defaults (documented, installed): {wrong}"


def test_every_row_is_described() -> None:
    undescribed = [
        name
        for section in gen.SECTIONS
        for name, row in gen.documented_rows(DOC_TEXT, section).items()
        if row.description in ("", gen.TODO_DESCRIPTION)
    ]
    assert not undescribed, f"rows without a description: {undescribed}"


def test_decoder_count_is_plausible(accepted: dict[str, dict[str, Any]]) -> None:
    # Guards the probe itself: if it silently rejected everything, or accepted
    # everything, the comparisons above would be meaningless.
    assert 150 <= len(accepted["decoder"]) <= 250
    assert "causal" not in accepted["decoder"] and "attn_heads" not in accepted["decoder"]


# A handful of documented non-default options spread over the themes; each is
# checked to be documented and non-default, then the model must build and train.
TINY_OPTIONS: dict[str, Any] = {
    "attn_dim_head": 16,
    "attn_kv_heads": 1,
    "attn_flash": True,
    "attn_qk_rmsnorm": True,
    "attn_gate_values": True,
    "rotary_pos_emb": True,
    "use_rmsnorm": True,
    "ff_glu": True,
    "ff_swish": True,
    "ff_mult": 2,
    "add_value_residual": True,
    "learned_value_residual_mix": False,  # the learned mix fails with grouped kv heads (documented)
    "shift_tokens": 1,
    "zero_init_branch_output": True,
    "verbose": False,  # no warning about the small rotary width
}


def test_tiny_decoder_with_documented_options_trains(accepted: dict[str, dict[str, Any]]) -> None:
    rows = gen.documented_rows(DOC_TEXT, "decoder")
    for name, value in TINY_OPTIONS.items():
        assert name in rows, f"{name} is not documented"
        assert value != accepted["decoder"][name], f"{name}={value!r} is its default: it proves nothing"

    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=256, max_seq_len=32, attn_layers=Decoder(dim=32, depth=2, heads=2, **TINY_OPTIONS)
    )
    tokens = torch.randint(0, 256, (2, 17))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, 16, 256)

    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("bogus", ["bogus_option", "attn_bogus_option", "ff_bogus_option", "resi_dual"])
def test_undocumented_names_are_rejected(bogus: str) -> None:
    # One name per path by which Decoder refuses: the leftover-kwargs assert,
    # and Attention / FeedForward raising TypeError on an unknown routed name.
    assert bogus not in gen.documented_rows(DOC_TEXT, "decoder")
    assert gen.decoder_rejects(**{bogus: True})
    with pytest.raises((AssertionError, TypeError)):
        Decoder(dim=32, depth=1, heads=2, **{bogus: True})


SAMPLE_DOC = """intro
<!-- params:decoder -->
| name | default | description |
|---|---|---|
| `kept` | `1` | kept's description |
| `gone` | `False` | no longer accepted |
text between tables
| name | default | description |
|---|---|---|
| `changed` | `0.1` | changed's description |
<!-- /params:decoder -->
outro
"""


def test_sync_keeps_descriptions_and_reports_changes() -> None:
    installed: dict[str, dict[str, Any]] = {"decoder": {"kept": 1, "changed": 0.2, "new": None}}
    text, messages = gen.sync(SAMPLE_DOC, installed)

    rows = gen.documented_rows(text, "decoder")
    assert list(rows) == ["kept", "changed", "new"]  # new names go to the end of the last table
    assert rows["kept"].description == "kept's description"
    assert rows["changed"].default == "`0.2`" and rows["changed"].description == "changed's description"
    assert rows["new"] == gen.Row("new", "`None`", gen.TODO_DESCRIPTION)
    assert "text between tables" in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert messages == [
        "decoder: new name `new` (added with 'TODO: describe')",
        "decoder: `gone` no longer accepted (row dropped)",
        "decoder: `changed` default `0.1` -> `0.2`",
    ]
    assert gen.sync(text, installed) == (text, [])  # idempotent


def test_doc_is_in_sync(accepted: dict[str, dict[str, Any]]) -> None:
    # Same as `python docs/generate_params.py --check`.
    assert gen.sync(DOC_TEXT, accepted) == (DOC_TEXT, [])

