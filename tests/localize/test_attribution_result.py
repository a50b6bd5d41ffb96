"""AttributionResult: layer reduction, budget-matched masks, top-k, TransformerLens names, adapters."""

from __future__ import annotations

import functools

import pytest
import torch

from mu_fast.localize.adapters import unwrap_model
from mu_fast.localize.attribution import attribute
from mu_fast.localize.result import AttributionResult
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


def trained_count(table: SiteTable, comps) -> int:
    """Distinct parameters the components select, from dense boolean masks (the independent count)."""
    dense: dict[str, torch.Tensor] = {}
    for comp in comps:
        for name, (kind, span) in table.selections(comp).items():
            shape = table._shape_of_param(name)
            m = dense.setdefault(name, torch.zeros(shape, dtype=torch.bool))
            if kind == "whole":
                m[...] = True
            elif kind == "rows":
                m[span.start : span.stop] = True
            else:
                m[:, span.start : span.stop] = True
    return sum(int(m.sum()) for m in dense.values())


def paper_rule(scores: dict, table: SiteTable, budget: int) -> tuple[list, int]:
    """The paper's rule, each step costing what the mask actually gains: ``(chosen in walk order, the
    marginal size of the component that spent the budget)``."""
    ordered = sorted(scores, key=lambda c: -abs(scores[c]))
    threshold, last_step = None, 0
    for i, comp in enumerate(ordered):
        last_step = trained_count(table, ordered[: i + 1]) - trained_count(table, ordered[:i])
        if trained_count(table, ordered[: i + 1]) >= budget:
            threshold = abs(scores[comp])
            break
    chosen = ordered if threshold is None else [c for c in ordered if abs(scores[c]) >= threshold]
    return chosen, last_step


@pytest.mark.parametrize("granularity", ["layer", "head", "neuron"])
@pytest.mark.parametrize("n_mlps", [1, 2])
def test_to_mask_follows_the_budget_rule(granularity, n_mlps, rng):
    model, res, _ = result(rng)
    table = SiteTable(model)
    budget = paper_budget(table, n_mlps)
    scores = res.component_scores(granularity)
    mask = res.to_mask(budget=budget, granularity=granularity)
    chosen, _ = paper_rule(scores, table, budget)
    assert mask == Mask.from_components(table, chosen)
    assert mask.param_count() == trained_count(table, chosen) == mask.meta["trained_params"]
    assert mask.param_count() >= min(budget, trained_count(table, scores))
    top = max(scores, key=lambda c: abs(scores[c]))
    for name in table.selections(top):
        assert name in mask
    mask.validate(model)
    if granularity == "layer":
        assert set(scores) == {Component(k, L) for L in range(3) for k in ("attn", "mlp")}
        assert scores[Component("attn", 1)] == pytest.approx(float(res.heads[1].sum()))
    if granularity == "neuron":
        assert len(scores) == 3 * (table.n_heads + table.d_mlp)


@pytest.mark.parametrize("arch,kv", [("llama", 2), ("llama", 1), ("qwen2", 2)])
@pytest.mark.parametrize("n_heads_worth", [3.5, 5.5, 9.0])
@pytest.mark.parametrize("order", ["random", "kv_mates_adjacent"])
def test_to_mask_under_gqa_counts_shared_kv_rows_once(arch, kv, n_heads_worth, order, rng):
    """Heads ranked first (so the walk passes several heads of one KV group): the mask trains what the rule
    counted, reaches the budget, and overshoots it by less than the last step."""
    table = SiteTable(make_tiny_model(arch, num_key_value_heads=kv, num_hidden_layers=3))
    assert table.n_kv_heads < table.n_heads
    L, H = table.n_layers, table.n_heads
    if order == "random":
        magnitude = 1 + torch.rand(2, L, H, generator=rng, dtype=torch.float64)
    else:  # head h of layer l ranked (l·H + h)-th: query heads of one KV group follow each other
        magnitude = (2 + torch.arange(L * H, 0, -1, dtype=torch.float64).view(L, H)).expand(2, L, H)
    per_prompt = {
        "heads": magnitude * torch.sign(torch.randn(L, H, generator=rng, dtype=torch.float64)),
        "mlp": torch.rand(2, L, generator=rng, dtype=torch.float64) * 0.5,
    }
    res = AttributionResult(per_prompt, table, "atp", "noise", "logit_diff", "mean", "sum", torch.ones(2), torch.zeros(2))
    budget = int(n_heads_worth * table.component_size(Component("attn", 0, 0)))
    scores = res.component_scores("head")
    mask = res.to_mask(budget=budget, granularity="head")
    chosen, last_step = paper_rule(scores, table, budget)
    assert mask == Mask.from_components(table, chosen)
    trained = mask.param_count()
    assert trained == trained_count(table, chosen) == mask.meta["trained_params"]
    assert budget <= trained < budget + last_step
    if order == "kv_mates_adjacent":  # the case the old count got wrong: chosen heads share KV groups
        groups = [(c.layer, table.kv_head_of(c.index)) for c in chosen if c.kind == "attn"]
        assert len(groups) > len(set(groups))


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
