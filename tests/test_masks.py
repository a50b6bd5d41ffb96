import pytest
import torch

from mu_fast.masks import Mask, Selection, budget_match, paper_budget
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model


@pytest.fixture
def model():
    return make_tiny_model("llama", num_hidden_layers=3)


def test_from_components_counts_match_dense(model):
    table = SiteTable(model)
    mask = Mask.from_components(table, [Component("attn", 0, 1), Component("mlp", 2, 7), Component("mlp", 1)])
    dense_total = sum(int(mask.dense(n).sum()) for n in mask)
    assert mask.param_count() == dense_total
    assert mask["model.layers.0.self_attn.o_proj.weight"].kind == "cols"
    assert mask["model.layers.1.mlp.up_proj.weight"].kind == "whole"
    mask.validate(model)


def test_union_intersection_against_dense(model, rng):
    names = [n for n, p in model.named_parameters() if p.ndim == 2][:4]
    params = dict(model.named_parameters())
    dense_a = {n: torch.rand(params[n].shape, generator=rng) < 0.3 for n in names[:3]}
    dense_b = {n: torch.rand(params[n].shape, generator=rng) < 0.3 for n in names[1:]}
    a, b = Mask.from_dense(dense_a), Mask.from_dense(dense_b)
    u, i = a | b, a & b
    for n in names:
        da = dense_a.get(n, torch.zeros(params[n].shape, dtype=torch.bool))
        db = dense_b.get(n, torch.zeros(params[n].shape, dtype=torch.bool))
        assert torch.equal(u.dense(n) if n in u else torch.zeros_like(da), da | db)
        assert torch.equal(i.dense(n) if n in i else torch.zeros_like(da), da & db)


def test_structure_is_inferred_and_rows_union_stays_rows(model):
    name = "model.layers.0.mlp.up_proj.weight"
    shape = dict(model.named_parameters())[name].shape
    dense = torch.zeros(shape, dtype=torch.bool)
    dense[[1, 4]] = True
    mask = Mask.from_dense({name: dense})
    assert mask[name].kind == "rows" and mask[name].index.tolist() == [1, 4]
    mask.add(name, shape, "rows", [2])
    assert mask[name].kind == "rows" and mask[name].index.tolist() == [1, 2, 4]
    mask.add(name, shape, "rows", range(shape[0]))
    assert mask[name].kind == "whole"


def test_save_load_round_trip_and_no_silent_overwrite(model, tmp_path, rng):
    table = SiteTable(model)
    mask = Mask.from_components(table, [Component("attn", 1, 2), Component("mlp", 0, 3)])
    name = "model.layers.2.self_attn.v_proj.weight"
    mask.add(name, dict(model.named_parameters())[name].shape, "elements", torch.rand(16, 32, generator=rng) < 0.2)
    path = mask.save(tmp_path / "m")
    assert path.exists() and (tmp_path / "m.json").exists()
    loaded = Mask.load(tmp_path / "m")
    assert loaded == mask and loaded.param_count() == mask.param_count()
    with pytest.raises(FileExistsError):
        mask.save(tmp_path / "m")
    assert Mask.load(tmp_path / "m.safetensors") == mask  # the untouched original is still there


def test_mask_shape_mismatch_is_a_clear_error(model):
    mask = Mask().add("model.layers.0.mlp.up_proj.weight", (4, 4))
    with pytest.raises(ValueError, match=r"has shape \(4, 4\) but the parameter has \(48, 32\)"):
        mask.validate(model)
    with pytest.raises(ValueError, match="does not have"):
        Mask().add("model.layers.9.mlp.up_proj.weight", (48, 32)).validate(model)
    with pytest.raises(ValueError, match="indices"):
        Mask().add("w", (4, 4), "rows", [7])


def test_budget_match_follows_the_paper_rule():
    sizes = {Component("mlp", i): 10 for i in range(5)} | {Component("attn", i): 4 for i in range(5)}
    scores = {Component("mlp", 0): 0.9, Component("attn", 3): -0.8, Component("mlp", 4): 0.5,
              Component("attn", 1): 0.5, Component("mlp", 2): 0.1}
    # walk: 0.9 (budget 20 -> 10), -0.8 (-> 6), 0.5 mlp4 (-> -4): threshold 0.5, ties kept.
    picked = budget_match(scores, sizes, budget=20)
    assert set(picked) == {Component("mlp", 0), Component("attn", 3), Component("mlp", 4), Component("attn", 1)}
    assert budget_match(scores, sizes, budget=10**6) == sorted(scores, key=lambda c: (-abs(scores[c]), c))
    with pytest.raises(ValueError, match="empty"):
        budget_match({}, sizes, 10)


def test_paper_budget_is_flu_layers_times_mlp_size(model):
    table = SiteTable(model)
    assert paper_budget(table, 2) == 2 * 3 * 32 * 48


@pytest.mark.parametrize("kind", ["rows", "cols"])
@pytest.mark.parametrize("index,what", [([1.7, 0.2], "torch.float32 values such as 1.7, 0.2"),
                                        (torch.tensor([1.0, 2.0], dtype=torch.float64), "torch.float64"),
                                        ([True, False], "torch.bool")])
def test_non_integer_indices_are_refused_not_truncated(kind, index, what):
    with pytest.raises(ValueError, match=rf"{'row' if kind == 'rows' else 'column'} indices for 'w' must be integers; got {what}"):
        Mask().add("w", (4, 4), kind, index)


def test_integer_indices_of_any_integer_type_are_taken():
    import numpy as np

    for index in ([2, 0], (0, 2), range(0, 3, 2), np.array([2, 0], dtype=np.int32), torch.tensor([2, 0], dtype=torch.int16)):
        assert Mask().add("w", (4, 4), "rows", index)["w"].index.tolist() == [0, 2]
    assert "w" not in Mask().add("w", (4, 4), "rows", [])  # empty: nothing selected, not a dtype error


def test_selection_kind_and_index_are_checked():
    with pytest.raises(ValueError, match=r"selection kind 'diag' is not one of \('whole', 'rows', 'cols', 'elements'\)"):
        Selection("diag", None)
    with pytest.raises(ValueError, match=r"Selection\('rows'\) needs an index"):
        Selection("rows")
    with pytest.raises(ValueError, match=r"Selection\('whole'\) takes no index"):
        Selection("whole", torch.tensor([1]))


def test_meta_tensors_are_refused_as_selections():
    with pytest.raises(ValueError, match=r"element mask for 'w' is on the meta device"):
        Mask().add("w", (4, 4), "elements", torch.ones(4, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"row index tensor for 'w' is on the meta device"):
        Mask().add("w", (4, 4), "rows", torch.tensor([1], device="meta"))
