import math

import pytest
import torch

from mu_fast.models.sites import ARCHITECTURES, Component, SiteTable
from mu_fast.models.tiny import make_config, make_tiny_model

ARCHS = sorted(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_selections_name_real_parameters_with_matching_sizes(arch):
    model = make_tiny_model(arch)
    table = SiteTable(model)
    params = dict(model.named_parameters())
    comps = [Component("attn", 1), Component("attn", 1, 3), Component("mlp", 0), Component("mlp", 0, 5), Component("attn.k", 1)]
    for comp in comps:
        total = 0
        for name, (kind, span) in table.selections(comp).items():
            assert name in params, name
            shape = params[name].shape
            assert tuple(shape) == table._shape_of_param(name)
            if kind == "whole":
                total += math.prod(shape)
            elif kind == "rows":
                total += len(span) * (shape[1] if len(shape) > 1 else 1)
            else:
                total += len(span) * shape[0]
        assert total == table.component_size(comp)


def test_gqa_head_selects_its_kv_group():
    table = SiteTable(make_config("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=4, hidden_size=32))
    sel = table.selections(Component("attn", 0, 5))
    assert sel["model.layers.0.self_attn.q_proj.weight"] == ("rows", range(20, 24))
    assert sel["model.layers.0.self_attn.k_proj.weight"] == ("rows", range(4, 8))  # head 5 -> kv head 1
    assert sel["model.layers.0.self_attn.o_proj.weight"] == ("cols", range(20, 24))


def test_unknown_architecture_is_a_clear_error():
    class Config:
        model_type = "gpt2"

    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*gemma2.*llama"):
        SiteTable(Config())


@pytest.mark.parametrize("text", ["a3", "a3.5", "m2", "m2.17", "a0.q", "m1.down"])
def test_component_string_round_trip(text):
    assert str(Component.parse(text)) == text


def test_component_errors():
    with pytest.raises(ValueError, match="cannot parse"):
        Component.parse("x3")
    with pytest.raises(ValueError, match="out of range"):
        SiteTable(make_config("llama")).selections(Component("attn", 7))
    with pytest.raises(ValueError, match="head 9 out of range"):
        SiteTable(make_config("llama")).selections(Component("attn", 0, 9))
