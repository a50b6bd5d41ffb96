"""The batched edit's memory plan (mu_fast.memory.batch.plan_batch): K configurations and groups per pass."""

from __future__ import annotations

import pytest
import torch

from mu_fast.edit.batched import BatchedDeltas
from mu_fast.masks import Mask
from mu_fast.memory import BatchShape, Settings, estimate
from mu_fast.memory.batch import plan_batch, state_bytes
from mu_fast.memory.shapes import ModelShape
from mu_fast.models.shipped import shipped_config
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_config, make_tiny_model

SMALL = BatchShape(n_forget=8, n_maintain=8, fact_tokens=12, n_lm=8, lm_tokens=40)


def mlp_mask(config, layers) -> Mask:
    return Mask.from_components(SiteTable(config), [Component("mlp", layer) for layer in layers])


def neuron_mask(config, layer: int, n: int) -> Mask:
    return Mask.from_components(SiteTable(config), [Component("mlp", layer, i) for i in range(n)])


def test_state_bytes_are_the_batched_deltas_buffers_plus_a_delta_and_its_gradient():
    """``state_bytes`` is what ``BatchedDeltas`` allocates per configuration (values, base, two moments) plus the
    delta and its gradient a step makes, for a bf16 model (2 B values, fp32 moments)."""
    model = make_tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=256).to(torch.bfloat16)
    mask = mlp_mask(model.config, [1])
    deltas = BatchedDeltas(model, [mask, mask])
    n = mask.param_count()
    assert n % 256 == 0  # no 512-byte rounding in the comparison
    assert deltas.state_bytes(0) == n * (2 + 2 + 4 + 4)
    assert state_bytes(n) == deltas.state_bytes(0) + 2 * n * 2


def test_k_and_groups_fill_the_budget_and_one_more_would_not_fit():
    config = make_config("llama", num_hidden_layers=4, hidden_size=64, intermediate_size=96, head_dim=16)
    masks = [mlp_mask(config, [1]), neuron_mask(config, 0, 7), mlp_mask(config, [2, 3])] * 8
    one = plan_batch(config, masks, device_bytes=10**12, batch=SMALL)  # activations: the union of all masks
    fixed, act = one.fixed, one.activations
    states = [state_bytes(m.param_count()) for m in masks]
    for budget in (fixed + states[0] + act, fixed + sum(states[:5]) + act, fixed + sum(states[:5]) + 3 * act + 1,
                   fixed + sum(states) + 2 * act):
        p = plan_batch(config, masks, device_bytes=budget, batch=SMALL)
        assert p.fixed == fixed and p.activations == act and p.state == states
        assert fixed + sum(states[:p.k]) + p.groups_per_pass * act == p.total <= budget
        assert 1 <= p.groups_per_pass <= p.k
        if p.k < len(masks):  # the next configuration, with one group's activations, would not fit
            assert fixed + sum(states[:p.k + 1]) + act > budget and p.next_needs == states[p.k]
        if p.groups_per_pass < p.k:
            assert p.total + act > budget
    assert plan_batch(config, masks, device_bytes=10**12, batch=SMALL, k_max=5).k == 5
    assert "5 configuration(s), 5 per pass" in plan_batch(config, masks, device_bytes=10**12, batch=SMALL, k_max=5).format()


def test_activations_are_those_of_the_union_of_the_masks():
    """A configuration masked lower in the model makes every group record its graph from there."""
    config = make_config("llama", num_hidden_layers=4, hidden_size=64, intermediate_size=96, head_dim=16)
    high, low = mlp_mask(config, [3]), neuron_mask(config, 0, 5)
    alone = plan_batch(config, [high], device_bytes=10**12, batch=SMALL).activations
    mixed = plan_batch(config, [high, low], device_bytes=10**12, batch=SMALL).activations
    assert mixed > alone
    assert mixed == plan_batch(config, [high.union(low)], device_bytes=10**12, batch=SMALL).activations
    # and they are what one edit of the union adds over its weights and optimizer state, not the whole edit's peak
    e = estimate(ModelShape.from_config(config), high.union(low), Settings(frozen="bf16", compact_grads=True), SMALL)
    assert mixed < e.total - e.breakdown["frozen_weights"] - e.breakdown["masked_weights"]


def test_llama3_8b_at_the_papers_batch_trains_one_group_per_pass_on_80gb():
    """At 7-9B one group's activations are tens of GB: every configuration's state fits, one group per pass."""
    config = shipped_config("llama-3-8b", num_hidden_layers=32)
    table = SiteTable(config)
    mask = Mask.from_components(table, [Component("mlp", 2, i) for i in range(0, 1400)]
                                + [Component("attn", 3, h) for h in range(4)])
    p = plan_batch(config, [mask] * 16, device_bytes="80GB")
    assert p.k == 16 and p.groups_per_pass == 1
    assert p.activations > 10e9 and max(p.state) < 1e9


def test_clear_errors():
    config = make_config("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=96, head_dim=16)
    mask = mlp_mask(config, [0])
    with pytest.raises(ValueError, match=r"needs .* GB .* budget is"):
        plan_batch(config, [mask], device_bytes=1000, batch=SMALL)
    with pytest.raises(ValueError, match="device_bytes"):
        plan_batch(config, [mask])
    with pytest.raises(ValueError, match="give a unit|unit"):
        plan_batch(config, [mask], device_bytes="24")
    with pytest.raises(ValueError, match="non-empty Mask"):
        plan_batch(config, [Mask()], device_bytes="1GB")
    with pytest.raises(ValueError, match="k_max"):
        plan_batch(config, [mask], device_bytes="1GB", k_max=0)
