"""Restoring an edit through the masked elements only: bit-exact, touching nothing else, sized by the mask."""

from __future__ import annotations

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model
from mu_fast.sweep.snapshot import MaskedSnapshot, fingerprint


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32}[t.element_size()]).clone()


def _masks(model) -> dict[str, Mask]:
    table = SiteTable(model)
    name = "model.layers.1.mlp.down_proj.weight"
    shape = tuple(dict(model.named_parameters())[name].shape)
    elements = Mask()
    elements.add(name, shape, "elements", torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.1)
    return {
        "whole": Mask.from_components(table, [Component("mlp", 0)]),
        "rows_cols": Mask.from_components(table, [Component("attn", 1, 2), Component("mlp", 0, 5)]),
        "elements": elements,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["whole", "rows_cols", "elements"])
def test_restore_is_bit_exact_and_touches_only_masked_elements(kind, dtype, rng):
    model = make_tiny_model("llama", num_hidden_layers=2, dtype=dtype)
    mask = _masks(model)[kind]
    params = dict(model.named_parameters())
    before = {n: _bits(p) for n, p in params.items()}
    snap = MaskedSnapshot.take(model, mask)
    assert snap.numel == mask.param_count() < sum(p.numel() for p in params.values())  # sized by the mask
    with torch.no_grad():
        for name, p in params.items():
            noise = torch.randn(p.shape, generator=rng).to(dtype)
            if name in mask:  # the edit: masked elements get arbitrary bit patterns, -0.0 and NaN among them
                keep = mask.dense(name)
                p.copy_(torch.where(keep, noise, p))
                flat = p.view(-1)
                idx = torch.nonzero(keep.view(-1)).flatten()
                flat[idx[0]], flat[idx[-1]] = float("nan"), -0.0
            else:  # unmasked elements that change after the snapshot must be left as they are by restore
                p.view(-1)[0] = noise.view(-1)[0] + 1
    changed_outside = {n: _bits(p) for n, p in params.items()}
    snap.restore(model)
    for name, p in params.items():
        bits = _bits(p)
        if name in mask:
            keep = mask.dense(name)
            assert torch.equal(bits[keep], before[name][keep]), f"{name}: masked elements not restored bit-exactly"
            assert torch.equal(bits[~keep], changed_outside[name][~keep]), f"{name}: restore wrote unmasked elements"
        else:
            assert torch.equal(bits, changed_outside[name]), f"{name}: restore touched an unmasked parameter"


def test_fingerprint_sees_one_changed_element():
    model = make_tiny_model("llama", num_hidden_layers=2)
    base = fingerprint(model)
    assert set(base) == {n for n, _ in model.named_parameters()}
    p = dict(model.named_parameters())["model.layers.1.self_attn.o_proj.weight"]
    with torch.no_grad():
        p[3, 4] = torch.nextafter(p[3, 4], torch.tensor(10.0))  # one ulp
    assert fingerprint(model) != base
    with torch.no_grad():
        p[3, 4] = torch.nextafter(p[3, 4], torch.tensor(-10.0))
    assert fingerprint(model) == base


def test_snapshot_refuses_a_mask_of_another_model():
    small = make_tiny_model("llama", num_hidden_layers=1)
    big = make_tiny_model("llama", num_hidden_layers=3)
    mask = Mask.from_components(SiteTable(big), [Component("mlp", 2)])
    with pytest.raises(ValueError, match="the model does not have"):
        MaskedSnapshot.take(small, mask)
