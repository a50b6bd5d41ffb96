"""The flu_attn variant: attention blocks the probe implicates, by FLU's count-based rule, and the enrichment split."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from mu_fast.localize.flu import FLUResult, enrichment_shares, select_flu_attention_layers, select_flu_layers
from mu_fast.models.sites import Component


def curves(n: int, pre0: int, steps: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 accuracies of a residual stream whose count of correctly probed facts (of ``n``) starts at
    ``pre0`` and changes by (attention, MLP) ``steps`` per layer; a layer's pre is the previous layer's post."""
    pre, mid, post = [], [], []
    count = pre0
    for attn, mlp in steps:
        pre.append(count)
        count += attn
        mid.append(count)
        count += mlp
        post.append(count)
    as_acc = lambda xs: torch.tensor([x / n for x in xs], dtype=torch.float32)  # noqa: E731
    return as_acc(pre), as_acc(mid), as_acc(post)


def test_attention_gain_of_exactly_min_gain_qualifies_despite_float32_rounding():
    n = 120
    # Layer 0's attention: 109 -> 115 of 120 is a gain of exactly 0.05 (0.04999995 in float32).
    pre, mid, post = curves(n, 109, [(6, 0), (0, 0)])
    assert float(mid[0] - pre[0]) < 0.05
    assert select_flu_attention_layers(pre, mid, post, n) == [0]
    # One fact fewer is below the rule.
    pre, mid, post = curves(n, 110, [(5, 0), (0, 0)])
    assert select_flu_attention_layers(pre, mid, post, n) == []


def reference_attention_layers(pre: list[int], mid: list[int], post: list[int], n: int, min_gain: Fraction,
                               saturation: Fraction) -> list[int]:
    """The rule in exact rationals on counts: gains >= min_gain up to the first layer reaching saturation × max."""
    top = max(post)
    last = next(l for l, c in enumerate(post) if c >= saturation * top)
    return [l for l in range(last + 1) if Fraction(mid[l] - pre[l], n) >= min_gain]


@pytest.mark.parametrize("n", [45, 120, 200])
@pytest.mark.parametrize("n_layers", [4, 8])
def test_attention_rule_matches_exact_rationals_on_random_curves(n, n_layers, rng):
    for _ in range(50):
        pre0 = int(torch.randint(0, n // 2, (1,), generator=rng))
        # Steps in facts, around the threshold (0.05 n) so that exact ties occur, some negative.
        raw = torch.randint(-2, int(0.12 * n) + 2, (n_layers, 2), generator=rng).tolist()
        steps, count = [], pre0
        for attn, mlp in raw:
            attn = max(-count, min(attn, n - count))
            mlp = max(-(count + attn), min(mlp, n - count - attn))
            steps.append((attn, mlp))
            count += attn + mlp
        pre, mid, post = curves(n, pre0, steps)
        counts = [[round(float(x) * n) for x in t] for t in (pre, mid, post)]
        want = reference_attention_layers(*counts, n, Fraction(1, 20), Fraction(19, 20))
        assert select_flu_attention_layers(pre, mid, post, n) == want, (steps, pre0)


def test_no_attention_fallback_and_mlp_rule_unchanged():
    n = 100
    pre, mid, post = curves(n, 34, [(2, 40), (1, 20), (0, 3)])
    assert select_flu_attention_layers(pre, mid, post, n) == []
    assert select_flu_layers(mid, post, n) == [0, 1]


def test_mismatched_shapes_name_the_problem():
    a = torch.zeros(3)
    with pytest.raises(ValueError, match="acc_pre/acc_mid/acc_post must be"):
        select_flu_attention_layers(a, torch.zeros(4), a, 10)


def test_enrichment_shares_telescope_to_the_rise():
    n = 120
    pre, mid, post = curves(n, 40, [(30, 20), (-4, 30), (2, 0), (0, 1)])
    shares = enrichment_shares(pre, mid, post, n)
    s = shares["saturation_layer"]
    assert s == 1  # 40+30+20-4+30 = 116 >= 0.95 * 119
    assert shares["attn_gain"] == pytest.approx([30 / n, -4 / n])
    assert shares["mlp_gain"] == pytest.approx([20 / n, 30 / n])
    assert shares["rise"] == pytest.approx(float(post[s] - pre[0]), abs=1e-6)
    assert shares["attn_share"] == pytest.approx(26 / 76)
    assert shares["attn_share"] + shares["mlp_share"] == pytest.approx(1.0)
    flat = enrichment_shares(*curves(n, 40, [(0, 0), (0, 0)]), n)
    assert flat["attn_share"] is None and flat["rise"] == 0.0


def test_components_add_implicated_attention_only_for_the_variant():
    pre, mid, post = curves(100, 30, [(20, 20), (0, 25), (0, 0)])
    base = FLUResult([0, 1], pre, mid, post, 0.34, {"n_test": 100, "saturation": 0.95}, attn_layers=[0])
    assert base.components() == [Component("mlp", 0), Component("mlp", 1)]
    variant = FLUResult([0, 1], pre, mid, post, 0.34, {"n_test": 100, "saturation": 0.95}, attn_layers=[0],
                        include_attention=True)
    assert variant.components() == [Component("attn", 0), Component("mlp", 0), Component("mlp", 1)]
    record = variant.to_dict()
    assert record["attn_layers"] == [0] and record["include_attention"] is True
    assert record["attn_gain"] == pytest.approx((mid - pre).tolist())
    assert variant.enrichment_shares()["attn_share"] == pytest.approx(20 / 65)


def test_localize_flu_attn_edits_the_implicated_attention_next_to_the_flu_mlps():
    from mu_fast.localize import METHODS, localize
    from mu_fast.models.sites import SiteTable
    from mu_fast.models.tiny import make_tiny_model

    model = make_tiny_model("llama", seed=3, num_hidden_layers=3)
    table = SiteTable(model)
    pre, mid, post = curves(100, 30, [(20, 20), (0, 25), (0, 0)])
    flu = FLUResult([0, 1], pre, mid, post, 0.34, {"n_test": 100, "saturation": 0.95}, attn_layers=[0])
    assert "flu_attn" in METHODS
    paper = localize("flu", model, flu=flu)
    variant = localize("flu_attn", model, flu=flu)
    assert paper.components == [Component("mlp", 0), Component("mlp", 1)]
    assert variant.components == [Component("attn", 0), Component("mlp", 0), Component("mlp", 1)]
    # The mask trains exactly the chosen blocks; the variant adds attention 0 on top of the same MLPs.
    assert paper.mask.param_count() == sum(table.component_size(c) for c in paper.components)
    assert variant.mask.param_count() == paper.mask.param_count() + table.component_size(Component("attn", 0))
    assert variant.info["flu"]["include_attention"] is True and paper.info["flu"]["include_attention"] is False
    # The method name decides, whatever the precomputed result says; both keep the paper's budget.
    flipped = FLUResult([0, 1], pre, mid, post, 0.34, {"n_test": 100}, attn_layers=[0], include_attention=True)
    assert localize("flu", model, flu=flipped).components == paper.components
    assert variant.budget == paper.budget
