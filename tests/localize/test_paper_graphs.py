"""The paper's localizations rebuilt from its committed graphs reproduce authors_repo.md §2 and §2.4."""

from __future__ import annotations

import json

import pytest
import torch

from mu_fast.localize.paper_graphs import (
    CF_RANGES,
    METHODS,
    describe_localization,
    flu_layers_from_effects,
    layer_scores,
    load_manual_results,
    load_paper_graph,
    paper_flu_layers,
    paper_localization,
    paper_localization_budget,
    paper_site_table,
)
from mu_fast.masks import Mask
from mu_fast.models.sites import Component

MODELS = ("gemma-7b", "gemma-2-9b", "llama-3-8b")


@pytest.mark.parametrize(
    "model, attn_m, mlp_m, budget_m",
    [("gemma-7b", 50.3, 226.5, 1359.0), ("gemma-2-9b", 44.0, 154.1, 770.7), ("llama-3-8b", 41.9, 176.2, 704.6)],
)
def test_parameter_counts_match_section_2(model, attn_m, mlp_m, budget_m, data_dir):
    table = paper_site_table(model)
    assert round(table.component_size(Component("attn", 0)) / 1e6, 1) == attn_m
    assert round(table.component_size(Component("mlp", 0)) / 1e6, 1) == mlp_m
    assert round(paper_localization_budget(model, "sports", data_dir=data_dir) / 1e6, 1) == budget_m


# authors_repo.md §2.4 (sports): (model, method, attention layers or count, MLP layers or count).
SPORTS_TABLE = [
    ("gemma-7b", "ap", {18, 20, 22, 25, 27}, {21, 23, 25, 26, 27}),
    ("gemma-7b", "ct", {6, 12, 13, 17, 20, 21, 25}, {21, 22, 23, 25, 27}),
    ("gemma-7b", "ap_mlps", set(), {21, 22, 23, 25, 26, 27}),
    ("gemma-7b", "ct_mlps", set(), {21, 22, 23, 25, 26, 27}),
    ("gemma-2-9b", "ap", {25, 33}, {28, 31, 33, 35, 41}),
    ("gemma-2-9b", "ct", 18, set()),
    ("gemma-2-9b", "ct_mlps", set(), {3, 4, 5, 7, 8}),
    ("llama-3-8b", "ap", {15, 21, 31}, {21, 22, 30, 31}),
    ("llama-3-8b", "ct", 17, set()),
    ("llama-3-8b", "ct_mlps", set(), {5, 6, 7, 29}),
]


@pytest.mark.parametrize("model, method, attn, mlp", SPORTS_TABLE)
def test_sports_selections_reproduce_the_table(model, method, attn, mlp, data_dir):
    got = describe_localization(model, paper_localization(model, "sports", method, data_dir=data_dir))
    assert (len(got["attn"]) if isinstance(attn, int) else set(got["attn"])) == attn
    assert set(got["mlp"]) == mlp


@pytest.mark.parametrize("method, billions", [("ap", 1.38), ("ct", 1.48)])
def test_gemma7b_sports_param_totals(method, billions, data_dir):
    got = describe_localization("gemma-7b", paper_localization("gemma-7b", "sports", method, data_dir=data_dir))
    assert round(got["params"] / 1e9, 2) == billions


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset, forget_range", [("sports", "0_16")] + [("counterfact", r) for r in CF_RANGES])
def test_budget_rule_holds_everywhere(model, dataset, forget_range, data_dir):
    table = paper_site_table(model)
    budget = paper_localization_budget(model, dataset, forget_range, data_dir)
    flu = paper_flu_layers(model, dataset, forget_range, data_dir)
    assert budget == len(flu) * table.component_size(Component("mlp", 0))
    for method in METHODS:
        comps = paper_localization(model, dataset, method, forget_range, data_dir)
        sizes = [table.component_size(c) for c in comps]
        assert len(set(comps)) == len(comps) and all(c.index is None for c in comps)
        if method == "flu":
            assert [c.layer for c in comps] == flu and sum(sizes) == budget
            continue
        if method.endswith("_mlps"):
            assert all(c.kind == "mlp" for c in comps)
        # Meets the budget and overshoots it by less than one component (no exact ties in these graphs).
        assert budget <= sum(sizes) < budget + max(sizes)
        mask = Mask.from_components(table, comps)
        assert mask.param_count() == sum(sizes)


def test_selection_is_by_absolute_summed_score(data_dir):
    """Recompute one selection from the raw graph with an independent loop: |signed layer sums|."""
    graph = load_paper_graph("llama-3-8b", "counterfact", "ap", "0_64", data_dir)
    table = paper_site_table("llama-3-8b")
    sums: dict[tuple[str, int], float] = {}
    for key, value in graph.items():
        kind = "attn" if key.startswith("a") else "mlp"
        layer = int(key[1:].split(".")[0].split("_")[0])
        sums[(kind, layer)] = sums.get((kind, layer), 0.0) + value
    ranked = sorted(sums, key=lambda k: -abs(sums[k]))
    left, picked = paper_localization_budget("llama-3-8b", "counterfact", "0_64", data_dir), []
    for key in ranked:
        picked.append(key)
        left -= table.component_size(Component(*key))
        if left <= 0:
            break
    assert sorted(Component(*k) for k in picked) == paper_localization("llama-3-8b", "counterfact", "ap", "0_64", data_dir)
    signed = sorted(sums, key=lambda k: -sums[k])[: len(picked)]
    assert set(signed) != set(picked)  # the sign matters here: |score| is the paper's rule


@pytest.mark.parametrize(
    "model, forget_range, layers",
    [("gemma-7b", "0_16", [1, 3, 4, 6, 9, 17, 18, 19]), ("gemma-7b", "0_64", [1, 3, 4, 6, 12]),
     ("gemma-2-9b", "0_16", [3, 4, 7, 8, 9]), ("gemma-2-9b", "0_64", [3, 4, 5, 7, 8, 9, 10, 17]),
     ("llama-3-8b", "0_16", [5, 6, 9, 13]), ("llama-3-8b", "0_64", [4, 5, 6, 7])],
)
def test_counterfact_flu_layers(model, forget_range, layers, data_dir):
    assert paper_flu_layers(model, "counterfact", forget_range, data_dir) == layers


def test_sports_flu_layers(data_dir):
    assert paper_flu_layers("gemma-7b", "sports", data_dir=data_dir) == [2, 3, 4, 5, 6, 7]
    assert paper_flu_layers("gemma-2-9b", "sports", data_dir=data_dir) == [2, 3, 4, 5, 6]
    assert paper_flu_layers("llama-3-8b", "sports", data_dir=data_dir) == [1, 2, 3, 4]


def test_layer_reduction_on_random_graphs(rng):
    n_layers, n_heads, n_kv = 3, 4, 2
    values = torch.randn(n_layers, n_heads, 4, generator=rng, dtype=torch.float64)
    mlp = torch.randn(n_layers, 2, generator=rng, dtype=torch.float64)
    graph = {}
    for L in range(n_layers):
        for H in range(n_heads):
            graph[f"a{L}.{H}_q"] = float(values[L, H, 0])
            graph[f"a{L}.{H}_result"] = float(values[L, H, 3])
        for H in range(n_kv):
            graph[f"a{L}.{H}_k"] = float(values[L, H, 1])
            graph[f"a{L}.{H}_v"] = float(values[L, H, 2])
        graph[f"m{L}_in"], graph[f"m{L}_out"] = float(mlp[L, 0]), float(mlp[L, 1])
    scores = layer_scores(graph, n_layers)
    for L in range(n_layers):
        expected = values[L, :, [0, 3]].sum() + values[L, :n_kv, [1, 2]].sum()
        assert scores[Component("attn", L)] == pytest.approx(float(expected), rel=1e-12)
        assert scores[Component("mlp", L)] == pytest.approx(float(mlp[L].sum()), rel=1e-12)
    old = {f"a{L}.{H}": float(values[L, H, 0]) for L in range(n_layers) for H in range(n_heads)}
    old.update({f"m{L}": float(mlp[L, 0]) for L in range(n_layers)})
    old_scores = layer_scores(old)
    assert old_scores[Component("attn", 1)] == pytest.approx(float(values[1, :, 0].sum()), rel=1e-12)
    assert old_scores[Component("mlp", 2)] == float(mlp[2, 0])
    ct = layer_scores({"a0.1_result": 0.5, "a0.2_result": -0.25, "m0_mlp_out": 0.125})
    assert ct == {Component("attn", 0): 0.25, Component("mlp", 0): 0.125}


def test_bad_graphs_and_arguments(tmp_path, data_dir):
    with pytest.raises(ValueError, match="'x3' is not"):
        layer_scores({"x3": 1.0})
    with pytest.raises(ValueError, match="layer 5 of a model with 2 layers"):
        layer_scores({"m5_in": 1.0}, n_layers=2)
    with pytest.raises(ValueError, match="method='eap'"):
        paper_localization("gemma-7b", "sports", "eap", data_dir=data_dir)
    with pytest.raises(ValueError, match="forget_range='0_32'"):
        paper_localization("gemma-7b", "counterfact", "ap", "0_32", data_dir=data_dir)
    with pytest.raises(ValueError, match="dataset='zsre'"):
        paper_flu_layers("gemma-7b", "zsre", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="google_gemma-2-9b_sports_all_ap_graph.json"):
        paper_localization("gemma-2-9b", "sports", "ap", data_dir=tmp_path)
    (tmp_path / "localization_graphs").mkdir()
    (tmp_path / "localization_graphs" / "google_gemma-7b_counterfact_ct_graph_0_16.json").write_text(json.dumps(["a"]))
    with pytest.raises(ValueError, match="must map component keys to numbers"):
        load_paper_graph("gemma-7b", "counterfact", "ct", "0_16", tmp_path)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("forget_range", CF_RANGES)
def test_counterfact_flu_files_follow_the_threshold_rule(model, forget_range, data_dir):
    result = load_manual_results(model, "counterfact", "manual_layers", forget_range, data_dir)
    assert result["abs_attr_threshold"] == 0.02
    assert flu_layers_from_effects(result["original_attrs"]) == result["chosen_layers"]
    assert paper_flu_layers(model, "counterfact", forget_range, data_dir) == sorted(result["chosen_layers"])


def test_sports_probe_results(data_dir):
    probe = load_manual_results("gemma-7b", "sports", "sports_probe", data_dir=data_dir)
    assert probe["Athlete"][:5] == [0.44, 0.48, 0.63, 0.85, 0.97]  # authors_repo.md §2.1
    with pytest.raises(ValueError, match="kind='probe'"):
        load_manual_results("gemma-7b", "sports", "probe", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="meta-llama_Meta-Llama-3-8B_extraction_head_scores.json"):
        load_manual_results("llama-3-8b", "sports", "extraction_head_scores", data_dir=data_dir)


@pytest.mark.parametrize("model_key, dataset, method, forget_range", [("gemma-7b", "sports", "ap", "0_16"),
                                                                      ("llama-3-8b", "counterfact", "ct_mlps", "0_64")])
def test_localize_paper_methods(data_dir, model_key, dataset, method, forget_range):
    """localize("paper:<kind>") gives the paper's selection as a mask over a model of the paper's shapes (meta device),
    the paper model taken from the model's name_or_path, the dataset from the task."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from mu_fast.data.datadir import paper_model
    from mu_fast.localize import localize
    from mu_fast.models.shipped import shipped_config

    config = shipped_config(paper_model(model_key).shapes)
    config.num_hidden_layers = paper_site_table(model_key).n_layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.config.name_or_path = paper_model(model_key).hf_id
    task = SimpleNamespace(name=f"{dataset}_x", meta={"dataset": dataset})
    loc = localize(f"paper:{method}", model, task=task, forget_range=forget_range)
    want = paper_localization(model_key, dataset, method, forget_range, data_dir)
    assert loc.components == want and loc.method == f"paper:{method}"
    assert loc.mask.param_count() == describe_localization(model_key, want)["params"]
    loc.mask.validate(model)  # the mask names the model's own parameters with their shapes
    assert loc.budget == paper_localization_budget(model_key, dataset, forget_range, data_dir)
    with pytest.raises(ValueError, match="paper selection"):
        localize("paper:atp", model, task=task)
    with pytest.raises(ValueError, match="pass task="):
        localize(f"paper:{method}", model)
