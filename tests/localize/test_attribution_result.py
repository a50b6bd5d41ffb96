"""AttributionResult: layer reduction, budget-matched masks, top-k, TransformerLens names, adapters."""

from __future__ import annotations

import functools

import pytest
import torch

from mu_fast.localize.adapters import unwrap_model
from mu_fast.localize.attribution import attribute
from mu_fast.localize.metrics import logit_diff
from mu_fast.masks import Mask, paper_budget
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model

V = 97


@functools.lru_cache(maxsize=None)
def tiny(arch: str = "llama"):
    return make_tiny_model(arch, seed=9, initializer_range=0.3, num_hidden_layers=3)


def result(rng, sites=("head", "mlp", "neuron")):
    model = tiny()
    clean = torch.randint(3, V, (4, 6), generator=rng)
    corrupt = clean.clone()
    corrupt[:, 1:3] = torch.randint(3, V, (4, 2), generator=rng)
    metric = logit_diff(torch.randint(3, V, (4,), generator=rng), torch.randint(3, V, (4, 2), generator=rng))
    return model, attribute(model, clean, corrupt, metric, sites=sites, direction="noise"), (clean, corrupt, metric)


def paper_rule(scores: dict, table: SiteTable, budget: int) -> set:
    ordered = sorted(scores, key=lambda c: -abs(scores[c]))
    remaining, threshold = budget, None
    for comp in ordered:
        remaining -= table.component_size(comp)
        if remaining <= 0:
            threshold = abs(scores[comp])
            break
    return set(ordered) if threshold is None else {c for c in ordered if abs(scores[c]) >= threshold}


@pytest.mark.parametrize("granularity", ["layer", "head", "neuron"])
@pytest.mark.parametrize("n_mlps", [1, 2])
def test_to_mask_follows_the_budget_rule(granularity, n_mlps, rng):
    model, res, _ = result(rng)
    table = SiteTable(model)
    budget = paper_budget(table, n_mlps)
    scores = res.component_scores(granularity)
    mask = res.to_mask(budget=budget, granularity=granularity)
    chosen = paper_rule(scores, table, budget)
    assert mask == Mask.from_components(table, chosen)
    assert sum(table.component_size(c) for c in chosen) >= min(budget, sum(table.component_size(c) for c in scores))
    top = max(scores, key=lambda c: abs(scores[c]))
    for name in table.selections(top):
        assert name in mask
    mask.validate(model)
    if granularity == "layer":
        assert set(scores) == {Component(k, L) for L in range(3) for k in ("attn", "mlp")}
        assert scores[Component("attn", 1)] == pytest.approx(float(res.heads[1].sum()))
    if granularity == "neuron":
        assert len(scores) == 3 * (table.n_heads + table.d_mlp)


def test_topk_labels_and_tl_names(rng):
    model, res, _ = result(rng, sites=("head", "mlp", "neuron", "attn", "layer", "k"))
    top = res.topk(7)
    values = [abs(s) for _, s in top]
    assert values == sorted(values, reverse=True)
    everything = sorted((abs(u[3]) for u in res.units()), reverse=True)
    assert values == everything[:7]
    heads = res.topk(3, sites="head")
    for label, score in heads:
        comp = Component.parse(label)
        assert comp.kind == "attn" and float(res.heads[comp.layer, comp.index]) == score
    names = res.to_tl_names()
    assert torch.equal(names["blocks.2.attn.hook_z"], res.heads[2])
    assert torch.equal(names["blocks.1.mlp.hook_post"], res.neurons[1])
    assert float(names["blocks.0.hook_mlp_out"]) == float(res.mlp[0])
    assert torch.equal(names["blocks.0.attn.hook_k"], res.k[0])
    assert {"blocks.2.hook_resid_post", "blocks.2.hook_attn_out"} <= set(names)
    assert len(names) == 6 * 3


def test_unwrap_refuses_unknown_models():
    class HookedTransformer(torch.nn.Module):
        pass

    with pytest.raises(TypeError, match="HookedTransformer"):
        unwrap_model(HookedTransformer())
    with pytest.raises(TypeError, match="TransformerBridge"):
        unwrap_model(torch.nn.Linear(2, 2))
    model = tiny()
    assert unwrap_model(model) is model


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t0", add_bos_token=True, name_or_path="tiny"
    )


def test_transformer_bridge_model_and_hook_names(rng):
    tl = pytest.importorskip("transformer_lens")
    model, res, (clean, corrupt, metric) = result(rng, sites=("head", "mlp", "neuron", "attn", "layer"))
    bridge = tl.TransformerBridge.boot_transformers("tiny-llama", hf_model=make_tiny_model("llama", seed=9, initializer_range=0.3, num_hidden_layers=3), tokenizer=_tokenizer())
    via_bridge = attribute(bridge, clean, corrupt, metric, sites=("head", "mlp", "neuron", "attn", "layer"), direction="noise")
    for key in res.per_prompt:
        torch.testing.assert_close(via_bridge.per_prompt[key], res.per_prompt[key])
    _, cache = bridge.run_with_cache(clean)
    assert set(res.to_tl_names()) <= set(cache.keys())


def test_nnsight_language_model(rng):
    nnsight = pytest.importorskip("nnsight")
    model, res, (clean, corrupt, metric) = result(rng)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = nnsight.LanguageModel(make_tiny_model("llama", seed=9, initializer_range=0.3, num_hidden_layers=3), tokenizer=_tokenizer())
    got = attribute(lm, clean, corrupt, metric, sites=("head", "mlp", "neuron"), direction="noise")
    for key in res.per_prompt:
        torch.testing.assert_close(got.per_prompt[key], res.per_prompt[key])
