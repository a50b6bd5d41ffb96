"""The FLU layer rule compares counts of correctly probed facts, so float rounding never drops a layer."""

from __future__ import annotations

import torch

from mu_fast.localize.flu import select_flu_layers


def test_a_gain_of_exactly_min_gain_qualifies_despite_float32_rounding():
    n = 120  # 0.9583333 - 0.9083333 in float32 is 0.04999995 < 0.05
    acc_mid = torch.tensor([0.40, 109 / n, 0.95], dtype=torch.float32)
    acc_post = torch.tensor([0.60, 115 / n, 0.96], dtype=torch.float32)
    assert float(acc_post[1] - acc_mid[1]) < 0.05  # the float32 difference the old rule compared
    assert select_flu_layers(acc_mid, acc_post, n) == [0, 1]


def test_gains_below_min_gain_and_layers_after_saturation_are_dropped():
    n = 100
    acc_mid = torch.tensor([0.30, 0.50, 0.80, 0.90])
    acc_post = torch.tensor([0.50, 0.54, 0.99, 1.00])  # gains 0.20, 0.04, 0.19, 0.10; saturated at layer 2
    assert select_flu_layers(acc_mid, acc_post, n) == [0, 2]
    assert select_flu_layers(acc_mid, acc_post, n, min_gain=0.5) == [0]  # none qualifies: the largest gain


def test_saturation_threshold_is_compared_in_counts():
    n = 120
    acc_mid = torch.tensor([0.0, 0.0, 0.0])
    acc_post = torch.tensor([0.5, 114 / n, 1.0], dtype=torch.float32)  # 114/120 = 0.95 × 1.0 exactly
    assert select_flu_layers(acc_mid, acc_post, n, saturation=0.95) == [0, 1]
