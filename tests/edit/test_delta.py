"""Edit deltas: an int8/nf4-frozen edit, applied to the bf16 base, changes exactly the masked elements; deltas
round-trip bit-exactly, are written atomically, and refuse the wrong base or a quantized target."""

from __future__ import annotations

import json

import pytest
import torch

from mu_fast.edit import EditConfig, EditDelta, apply_delta, base_checksum, edit, extract_delta, snapshot
from mu_fast.edit.delta import compact, scatter_
from mu_fast.masks import Mask
from mu_fast.models import load_for_edit
from mu_fast.models.frozen import is_quantized
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model
from tests._tiny_task import tiny_task, word_tokenizer

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
CONFIG = EditConfig(steps=3, lr=1e-2, maintain_batch=8, lm_batch=4)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    model = make_tiny_model("llama", seed=11, dtype=torch.bfloat16, vocab_size=len(tokenizer), **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mask(checkpoint):
    from transformers import AutoConfig

    table = SiteTable(AutoConfig.from_pretrained(checkpoint))
    return Mask.from_components(table, [Component("attn", 1, 3), Component("mlp", 0, 9), Component("mlp.up", 1)])


_EDITS: dict = {}


def edited_delta(checkpoint, mask, tokenizer, frozen):
    """(edited model, its delta) for ``frozen``, computed once per module (tests must not modify them)."""
    key = (str(checkpoint), frozen)
    if key not in _EDITS:
        model, _, info = load_for_edit(checkpoint, mask, frozen=frozen)
        base = snapshot(model, list(mask))
        edit(model, tokenizer, tiny_task(), mask, CONFIG, progress=False)
        _EDITS[key] = model, extract_delta(model, mask, base=base, info=info, edit_config=CONFIG)
    return _EDITS[key]


@pytest.mark.parametrize("frozen", ["int8", "nf4", "bf16"])
def test_quantized_edit_applied_to_the_bf16_base_changes_exactly_the_masked_elements(frozen, checkpoint, mask, tokenizer):
    trained, delta = edited_delta(checkpoint, mask, tokenizer, frozen)
    masked_modules = {name.rsplit(".", 1)[0] for name in mask}
    for name, module in trained.named_modules():  # the edit ran against quantized frozen layers
        if isinstance(module, torch.nn.Linear) and name not in masked_modules and name != "lm_head":
            assert is_quantized(module) == (frozen != "bf16")
    base, _, _ = load_for_edit(checkpoint, mask, frozen="bf16")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    apply_delta(base, delta)
    trained_params = dict(trained.named_parameters())
    moved = 0
    for name, param in base.named_parameters():
        bits_differ = param.view(torch.int16) != before[name].view(torch.int16)
        if name not in mask:
            assert not bits_differ.any(), f"unmasked parameter {name} changed"
            continue
        active = mask.dense(name, device=param.device)
        assert not (bits_differ & ~active).any(), f"inactive elements of {name} changed"
        assert torch.equal(param[active], trained_params[name][active])  # exactly the trained values
        moved += int(bits_differ.sum())
    assert moved > 0.5 * mask.param_count()
    assert delta.provenance["trained_frozen"] == frozen and delta.provenance["base"]["frozen"] == frozen


def test_canonical_order_is_row_major_over_the_selected_elements(rng):
    shape = (6, 5)
    t = torch.randn(shape, generator=rng, dtype=torch.float64)
    dense = torch.rand(shape, generator=rng) < 0.4
    mask = Mask().add("w", shape, "rows", [4, 1]).add("c", shape, "cols", [0, 3]).add("e", shape, "elements", dense)
    mask.add("a", shape, "whole")
    for name, selection in mask.items():
        values = compact(t, selection)
        assert torch.equal(values, t[mask.dense(name)])
        target = torch.zeros(shape, dtype=torch.float64)
        scatter_(target, selection, values)
        assert torch.equal(target, torch.where(mask.dense(name), t, 0.0))


def test_save_load_round_trip_is_bit_exact_and_keeps_provenance(checkpoint, mask, tokenizer, tmp_path):
    _, delta = edited_delta(checkpoint, mask, tokenizer, "nf4")
    path = delta.save(tmp_path / "edit")
    loaded = EditDelta.load(path)
    assert loaded.mask == mask and list(loaded.values) == list(delta.values)
    for name, value in delta.values.items():
        assert loaded.values[name].dtype == value.dtype and torch.equal(loaded.values[name].view(torch.int16), value.view(torch.int16))
    assert loaded.provenance == json.loads(json.dumps(delta.provenance))
    prov = loaded.provenance
    assert prov["base"]["path"] == str(checkpoint) and prov["trained_frozen"] == "nf4" and prov["dtype"] == "bfloat16"
    assert prov["edit_config"]["steps"] == 3 and prov["versions"]["bitsandbytes"] and prov["created"]
    assert set(prov["base_checksum"]) == set(mask) and prov["config_hash"]
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        delta.save(path)
    other = EditDelta({n: v + 1 for n, v in delta.values.items()}, mask, delta.provenance)
    other.save(path, overwrite=True)
    assert all(torch.equal(EditDelta.load(path).values[n], other.values[n]) for n in mask)
    stranger = tmp_path / "not-a-delta"
    stranger.mkdir()
    (stranger / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a mu_fast delta"):
        delta.save(stranger, overwrite=True)
    assert (stranger / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit", "not-a-delta"]  # no temp dirs left
    from mu_fast.files import current_umask

    for item in [path, *path.rglob("*")]:  # as readable as any new file (mkdtemp and safetensors make 0700 / 0600)
        assert item.stat().st_mode & 0o777 == (0o777 if item.is_dir() else 0o666) & ~current_umask(), item


def test_a_crash_while_saving_leaves_no_delta_and_keeps_the_old_one(checkpoint, mask, tokenizer, tmp_path, monkeypatch):
    _, delta = edited_delta(checkpoint, mask, tokenizer, "bf16")
    old = delta.save(tmp_path / "edit")

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Mask, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        delta.save(tmp_path / "new-edit")
    changed = EditDelta({n: v + 1 for n, v in delta.values.items()}, mask, delta.provenance)
    with pytest.raises(OSError, match="disk full"):
        changed.save(old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"]
    monkeypatch.undo()
    assert all(torch.equal(EditDelta.load(old).values[n], delta.values[n]) for n in mask)


def test_apply_refuses_another_base_a_quantized_target_and_an_unchecked_delta(checkpoint, mask, tokenizer, tmp_path):
    _, delta = edited_delta(checkpoint, mask, tokenizer, "int8")
    other = make_tiny_model("llama", seed=12, dtype=torch.bfloat16, vocab_size=len(tokenizer), **TINY)
    with pytest.raises(ValueError, match=r"masked elements of 'model.layers.1.self_attn.q_proj.weight' \(and 7 more\) "
                                         r"differ from the base .*check_base=False"):
        apply_delta(other, delta)
    apply_delta(other, delta, check_base=False)
    assert torch.equal(compact(other.model.layers[1].mlp.up_proj.weight, mask["model.layers.1.mlp.up_proj.weight"]),
                       delta.values["model.layers.1.mlp.up_proj.weight"])
    quantized, _, _ = load_for_edit(checkpoint, Mask.from_components(SiteTable(other), [Component("mlp", 1)]), frozen="nf4")
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.q_proj.weight' of the target is quantized \(Linear4bit\); "
                                         "apply deltas to a full-precision model: load it with frozen='bf16'"):
        apply_delta(quantized, delta)
    gemma = make_tiny_model("gemma", dtype=torch.bfloat16, vocab_size=len(tokenizer), **TINY)
    with pytest.raises(ValueError, match="extracted from a llama model but the target is gemma"):
        apply_delta(gemma, delta)
    unchecked = EditDelta(delta.values, mask, {**delta.provenance, "base_checksum": None})
    with pytest.raises(ValueError, match="no base checksum .* check_base=False"):
        apply_delta(load_for_edit(checkpoint, mask)[0], unchecked)
    with pytest.raises(ValueError, match="hold \\(3,\\) but the mask selects"):
        EditDelta({**delta.values, "model.layers.1.mlp.up_proj.weight": torch.zeros(3)}, mask, {})


def test_apply_to_a_checkpoint_path_loads_it_in_bf16(checkpoint, mask, tokenizer, tmp_path):
    trained, delta = edited_delta(checkpoint, mask, tokenizer, "int8")
    delta.save(tmp_path / "d")
    model = apply_delta(checkpoint, tmp_path / "d")
    assert not any(is_quantized(m) for m in model.modules())
    params = dict(model.named_parameters())
    for name, selection in mask.items():
        assert torch.equal(compact(params[name], selection).cpu(), delta.values[name])
    assert base_checksum(load_for_edit(checkpoint, mask)[0], mask) == delta.provenance["base_checksum"]
